/* Reverse shells however they are wired: the stdio helpers of proc.bpf.c's dup and
 * exec-stdio handlers (classify an fd, find a socket duplicated onto fd 0-2). Kernel-only;
 * included by proc.bpf.c after its maps and proc.bpf.h. */
#ifndef SWARM_STDIO_BPF_H
#define SWARM_STDIO_BPF_H

#include <bpf/bpf_endian.h>

#define S_IFIFO 0010000
#define S_IFCHR 0020000
#define AF_UNIX 1
#define PIPEFS_MAGIC 0x50495045
#define F_DUPFD 0
#define F_DUPFD_CLOEXEC 1030

/* fcntl(F_DUPFD*, arg <= 2) between syscall entry and exit, per thread. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, __u8);
} pending_dupfd SEC(".maps");

static __always_inline struct file *task_fd(struct task_struct *task, __u32 fd)
{
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **fds = BPF_CORE_READ(fdt, fd);
	struct file *f = NULL;

	if (fd >= BPF_CORE_READ(fdt, max_fds))
		return NULL;
	bpf_core_read(&f, sizeof(f), &fds[fd]);
	return f;
}

static __always_inline void classify_fd(struct file *f, struct stdio_fd *out)
{
	struct inode *inode;
	struct socket *sock;
	struct sock *sk, *peer;
	__u32 major, minor;
	__u16 mode;

	if (!f)
		return;		/* STDIO_CLOSED */
	inode = BPF_CORE_READ(f, f_inode);
	mode = BPF_CORE_READ(inode, i_mode) & S_IFMT;
	out->ino = BPF_CORE_READ(inode, i_ino);
	out->dev = BPF_CORE_READ(inode, i_sb, s_dev);
	out->flags = BPF_CORE_READ(f, f_flags);
	out->kind = STDIO_FILE;
	if (mode == S_IFSOCK) {
		sock = BPF_CORE_READ(f, private_data);
		sk = BPF_CORE_READ(sock, sk);
		out->family = BPF_CORE_READ(sk, __sk_common.skc_family);
		if (out->family == AF_UNIX) {
			out->kind = STDIO_UNIX;
			peer = BPF_CORE_READ((struct unix_sock *)sk, peer);
			out->ino = peer ? BPF_CORE_READ(peer, sk_socket, file, f_inode, i_ino) : 0;
		} else {
			out->kind = is_inet(out->family) ? STDIO_INET : STDIO_SOCKET;
		}
	} else if (mode == S_IFIFO) {
		out->kind = BPF_CORE_READ(inode, i_sb, s_magic) == PIPEFS_MAGIC ? STDIO_PIPE
									       : STDIO_FIFO;
	} else if (mode == S_IFCHR) {
		out->rdev = BPF_CORE_READ(inode, i_rdev);
		major = out->rdev >> 20;
		minor = out->rdev & 0xFFFFF;
		if (major >= 136 && major <= 143)		/* UNIX98_PTY_SLAVE_MAJOR */
			out->kind = STDIO_PTY;
		else if (major == 5 && minor == 2)		/* /dev/ptmx, /dev/pts/ptmx */
			out->kind = STDIO_PTMX;
		else if (major == 4 || (major == 5 && minor < 2) || major == 204 || major == 229)
			out->kind = STDIO_TTY;
		else
			out->kind = STDIO_CHAR;
	}
}

#define SYSTEM_DEPTH 8

/* The executable lies below a directory of system_dirs (its parents, up to SYSTEM_DEPTH
 * of them, by (dev, ino): d_parent never leaves the superblock, and a directory that is
 * a mount point (/usr on its own filesystem) is that filesystem's root, whose identity
 * stat() gave). Deeper, or unknown: not a system file, and user space judges the path. */
static __always_inline int in_system_dir(struct task_struct *task)
{
	struct file *exe = BPF_CORE_READ(task, mm, exe_file);
	struct dentry *d = BPF_CORE_READ(exe, f_path.dentry), *parent;
	struct file_id id = {};
	int i;

	if (!exe)
		return 0;
	id.dev = BPF_CORE_READ(exe, f_inode, i_sb, s_dev);
	for (i = 0; i < SYSTEM_DEPTH; i++) {
		parent = BPF_CORE_READ(d, d_parent);
		if (!parent || parent == d)
			return 0;
		d = parent;
		id.ino = BPF_CORE_READ(d, d_inode, i_ino);
		if (bpf_map_lookup_elem(&system_dirs, &id))
			return 1;
	}
	return 0;
}

static __always_inline int is_channel(__u16 kind)
{
	return kind == STDIO_PIPE || kind == STDIO_FIFO || kind == STDIO_PTY || kind == STDIO_UNIX;
}

static __always_inline int check_dup(long ret, __u16 syscall)
{
	struct task_struct *task;
	struct stdio_dup_event *e;
	struct socket *sock;
	struct file *f;
	struct sock *sk;
	__u32 daddr4;
	__u16 family;

	if (ret < 0 || ret > 2 || is_agent())
		return 0;
	if (!owned())
		return 0;
	task = (struct task_struct *)bpf_get_current_task();
	f = task_fd(task, ret);
	if (!f || (BPF_CORE_READ(f, f_inode, i_mode) & S_IFMT) != S_IFSOCK)
		return 0;
	/* Already on another standard fd (a socket-activated service's `2>&1`, a shell
	 * restoring a saved stdout): the socket did not just arrive on stdio. */
	if ((ret != 0 && task_fd(task, 0) == f) || (ret != 1 && task_fd(task, 1) == f) ||
	    (ret != 2 && task_fd(task, 2) == f))
		return 0;
	sock = BPF_CORE_READ(f, private_data);
	sk = BPF_CORE_READ(sock, sk);
	family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (!is_inet(family))
		return 0;
	e = reserve(sizeof(*e), EVENT_STDIO_DUP);
	if (!e)
		return 0;
	fill_proc_ancestry(&e->proc, task);
	e->exe_ino = e->proc.exe.ino;	/* fill_proc_ancestry read it (exe_id) */
	e->exe_dev = e->proc.exe.dev;
	e->newfd = ret;
	e->syscall = syscall;
	e->family = family;
	e->dport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	e->sport = BPF_CORE_READ(sk, __sk_common.skc_num);
	if (family == AF_INET) {
		daddr4 = BPF_CORE_READ(sk, __sk_common.skc_daddr);
		__builtin_memcpy(e->daddr, &daddr4, sizeof(daddr4));
	} else
		BPF_CORE_READ_INTO(&e->daddr, sk, __sk_common.skc_v6_daddr);
	e->sock_ino = BPF_CORE_READ(f, f_inode, i_ino);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

#endif /* SWARM_STDIO_BPF_H */
