/* Kernel-only helpers of proc.bpf.c: event reservation, loss counting, process context
 * (with ident.bpf.h's identities), the exec'ing task's stdio. Included by proc.bpf.c
 * after its maps, which these use. */
#ifndef SWARM_PROC_BPF_H
#define SWARM_PROC_BPF_H

#include "ident.bpf.h"

static __always_inline void count_loss(void)
{
	__u32 zero = 0;
	__u64 *n = bpf_map_lookup_elem(&losses, &zero);

	if (n)
		*n += 1;	/* per-CPU slot: no atomic needed */
}

static __always_inline int is_agent(void)
{
	return proc_cfg.agent_tgid && (bpf_get_current_pid_tgid() >> 32) == proc_cfg.agent_tgid;
}

/* Whether the current task is this agent's to report (README, "Running it"): an agent
 * owns the processes of its own network namespace; the host agent (host_scope, in the
 * initial namespace) also those of every namespace no other live agent owns. A task
 * whose namespace cannot be read (0) is only the host agent's. */
static __always_inline int owned(void)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	__u32 ino = BPF_CORE_READ(task, nsproxy, net_ns, ns.inum);

	if (ino && ino == proc_cfg.netns_ino)
		return 1;
	return proc_cfg.host_scope && !bpf_map_lookup_elem(&foreign_netns, &ino);
}

static __always_inline struct work *work(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&scratch, &zero);
}

/* ZERO_LEN zero bytes (an array map's only entry: NULL never happens, but is checked). */
static __always_inline void *zeroed(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&zeroes, &zero);
}

/* Reserves a zeroed event (padding must not leak kernel memory) or counts a loss. */
static __always_inline void *reserve(__u32 size, __u32 kind)
{
	struct event_header *h = bpf_ringbuf_reserve(&events, size, 0);
	void *z;

	if (!h) {
		count_loss();
		return NULL;
	}
	/* clang expands memset only up to a size (and merges pieces): copy from a zeroed
	 * map value instead, which the verifier bounds by ZERO_LEN. */
	z = zeroed();
	if (!z || size > ZERO_LEN || bpf_probe_read_kernel(h, size, z)) {
		bpf_ringbuf_discard(h, 0);
		count_loss();
		return NULL;
	}
	h->kind = kind;
	h->size = size;
	h->ts_ns = bpf_ktime_get_ns();
	return h;
}

static __always_inline void fill_proc(struct proc_ctx *p, struct task_struct *task)
{
	struct task_struct *parent = BPF_CORE_READ(task, real_parent);
	__u64 id = bpf_get_current_pid_tgid();

	p->cgroup_id = bpf_get_current_cgroup_id();
	p->pid = id >> 32;
	p->tid = (__u32)id;
	p->ppid = BPF_CORE_READ(parent, tgid);
	p->uid = BPF_CORE_READ(task, cred, uid.val);
	p->euid = BPF_CORE_READ(task, cred, euid.val);
	bpf_get_current_comm(p->comm, sizeof(p->comm));
	bpf_core_read_str(p->parent_comm, sizeof(p->parent_comm), &parent->comm);
	exe_id(task, &p->exe);
	p->loginuid = 0xFFFFFFFF;
	p->sessionid = 0xFFFFFFFF;
	if (bpf_core_field_exists(task->loginuid)) {	/* CONFIG_AUDIT */
		p->loginuid = BPF_CORE_READ(task, loginuid.val);
		p->sessionid = BPF_CORE_READ(task, sessionid);
	}
	if (bpf_map_lookup_elem(&service_cgroups, &p->cgroup_id))
		p->flags |= CTX_SERVICE_CGROUP;
	/* fork records the parent's exec counter; reparenting to a reaper keeps it */
	if (BPF_CORE_READ(task, parent_exec_id) != BPF_CORE_READ(parent, self_exec_id))
		p->flags |= CTX_REPARENTED;
}

/* The executable's path as the kernel resolves it (uses the scratch path buffer). `p`
 * is zeroed: a reserved event, or the exec handler's cleared scratch context. */
static __always_inline void fill_exe_path(struct proc_ctx *p, struct task_struct *task)
{
	struct file *exe = BPF_CORE_READ(task, mm, exe_file);
	struct work *w = work();

	if (exe && w) {
		p->exe_path_len = walk_path(BPF_CORE_READ(exe, f_path.dentry),
					    BPF_CORE_READ(exe, f_path.mnt), w->path,
					    &p->exe_path_flags);
		copy_walked(p->exe_path, w->path, p->exe_path_len);
	}
}

/* The whole process context: identity, executable path, ancestry; returns the
 * ancestors' watched_exes flags. */
static __always_inline __u32 fill_proc_ancestry(struct proc_ctx *p, struct task_struct *task)
{
	fill_proc(p, task);
	fill_exe_path(p, task);
	return fill_ancestry(p, task);
}

/* --- the exec'ing task's stdio ------------------------------------------------------- */

/* What fd `fd` of the exec'ing task is: read through the fd table with CO-RE. Safe in
 * the exec tracepoint: the task is current and single-threaded after de_thread(), so
 * nobody swaps its table; every read is a checked probe read anyway. */
static __always_inline __u16 fd_family(struct file **fds, __u32 max_fds, __u32 fd)
{
	struct file *f = NULL;
	struct socket *sock;
	__u16 mode;

	if (fd >= max_fds)
		return 0;
	bpf_core_read(&f, sizeof(f), &fds[fd]);
	if (!f)
		return 0;
	mode = BPF_CORE_READ(f, f_inode, i_mode);
	if ((mode & S_IFMT) != S_IFSOCK)
		return STDIO_NOT_SOCKET;
	sock = BPF_CORE_READ(f, private_data);	/* a socket file's private_data */
	return BPF_CORE_READ(sock, sk, __sk_common.skc_family);
}

static __always_inline int is_inet(__u16 family)
{
	return family == AF_INET || family == AF_INET6;
}

/* --- the exec policy ------------------------------------------------------------------ */

#define TMPFS_MAGIC 0x01021994
#define RAMFS_MAGIC 0x858458f6
#define WRITABLE_DEPTH 16

static __always_inline int is_tmp_name(struct dentry *d)
{
	char name[4] = {};

	if (bpf_probe_read_kernel(name, sizeof(name), BPF_CORE_READ(d, d_name.name)))
		return 0;
	return name[0] == 't' && name[1] == 'm' && name[2] == 'p' && name[3] == 0;
}

/* Whether a directory named "tmp" is on the way from `d` up to `root` (`d` itself
 * too unless skip_first: the file's own name does not count). */
static __always_inline int tmp_on_chain(struct dentry *d, struct dentry *root, int skip_first)
{
	struct dentry *parent;
	__u32 i;

	for (i = 0; i < WRITABLE_DEPTH; i++) {
		parent = BPF_CORE_READ(d, d_parent);
		if (d == root || !parent || parent == d)
			return 0;
		if ((i || !skip_first) && is_tmp_name(d))
			return 1;
		d = parent;
	}
	return 0;
}

#define WRITABLE_DIR_DEPTH 48

/* EXE_IN_WRITABLE or EXE_DEEP for the file `d` (its parents within its filesystem, up to
 * the filesystem's root: mounts are not followed, so a bind mount of a directory below
 * /tmp is still below /tmp), else 0. */
static __always_inline __u16 writable_dir_above(struct dentry *d)
{
	struct file_id id = {};
	struct dentry *parent;
	__u32 i;

	id.dev = BPF_CORE_READ(d, d_sb, s_dev);
	for (i = 0; i < WRITABLE_DIR_DEPTH; i++) {
		parent = BPF_CORE_READ(d, d_parent);
		if (!parent || parent == d)
			return 0;
		id.ino = BPF_CORE_READ(parent, d_inode, i_ino);
		if (bpf_map_lookup_elem(&writable_dirs, &id))
			return EXE_IN_WRITABLE;
		d = parent;
	}
	return EXE_DEEP;
}

/* Whether the executable may be a file a workload wrote where it may write (the
 * EXEC_POLICY_WRITABLE prefilter; a superset of user space's exe_location, which
 * decides): unlinked, on tmpfs or ramfs (/dev/shm, a tmpfs /tmp, memfds), on a device
 * of writable_devs, or a directory named "tmp" on its path within its filesystem or on
 * the path of that filesystem's mount point in the mount above (one level: a mount on
 * a mount below /tmp is not seen). */
static __always_inline int writable_candidate(struct task_struct *task)
{
	struct file *exe = BPF_CORE_READ(task, mm, exe_file);
	struct vfsmount *vmnt;
	struct mount *mnt, *up;
	__u64 magic, mnt_off;
	__u32 dev;

	if (!exe)
		return 0;
	if (!BPF_CORE_READ(exe, f_inode, i_nlink))
		return 1;
	magic = BPF_CORE_READ(exe, f_inode, i_sb, s_magic);
	if (magic == TMPFS_MAGIC || magic == RAMFS_MAGIC)
		return 1;
	dev = BPF_CORE_READ(exe, f_inode, i_sb, s_dev);
	if (bpf_map_lookup_elem(&writable_devs, &dev))
		return 1;
	if (writable_dir_above(BPF_CORE_READ(exe, f_path.dentry)))
		return 1;
	vmnt = BPF_CORE_READ(exe, f_path.mnt);
	if (tmp_on_chain(BPF_CORE_READ(exe, f_path.dentry), BPF_CORE_READ(vmnt, mnt_root), 1))
		return 1;
	mnt_off = bpf_core_field_offset(struct mount, mnt);
	mnt = (void *)vmnt - mnt_off;
	up = BPF_CORE_READ(mnt, mnt_parent);
	if (!up || up == mnt)
		return 0;
	return tmp_on_chain(BPF_CORE_READ(mnt, mnt_mountpoint),
			    BPF_CORE_READ(&up->mnt, mnt_root), 0);
}

/* Whether the exec policy needs this exec (map exec_policy's mode). */
static __always_inline int exec_policy_wants(struct task_struct *task)
{
	__u32 zero = 0;
	__u32 *mode = bpf_map_lookup_elem(&exec_policy, &zero);

	if (!mode || *mode == EXEC_POLICY_OFF)
		return 0;
	return *mode == EXEC_POLICY_ALL || writable_candidate(task);
}

/* The executed file's nature, from its inode and dentry (the process can name the file
 * anything it likes, but not change these): unlinked (i_nlink 0), a memfd (memfd_create
 * makes a pseudo dentry that is its own parent, named "memfd:<name>"; a file merely
 * named so lives in a directory), and its filesystem's magic. */
static __always_inline void exe_nature(struct task_struct *task, struct proc_exec_event *e)
{
	struct file *exe = BPF_CORE_READ(task, mm, exe_file);
	struct dentry *d;
	char name[6] = {};

	if (!exe)
		return;
	e->exe_nlink = BPF_CORE_READ(exe, f_inode, i_nlink);
	e->exe_magic = BPF_CORE_READ(exe, f_inode, i_sb, s_magic);
	if (!e->exe_nlink)
		e->exe_nature |= EXE_UNLINKED;
	d = BPF_CORE_READ(exe, f_path.dentry);
	if (d)
		e->exe_nature |= writable_dir_above(d);
	if (d && BPF_CORE_READ(d, d_parent) == d &&
	    bpf_probe_read_kernel(name, sizeof(name), BPF_CORE_READ(d, d_name.name)) == 0 &&
	    name[0] == 'm' && name[1] == 'e' && name[2] == 'm' && name[3] == 'f' &&
	    name[4] == 'd' && name[5] == ':')
		e->exe_nature |= EXE_MEMFD;
}

#endif /* SWARM_PROC_BPF_H */
