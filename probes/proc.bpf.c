// SPDX-License-Identifier: GPL-2.0
/* Process probe: exec and exit, opens of watched files, module loads, ptrace attaches
 * and BPF program loads, pushed one by one through the `events` ring buffer.
 *
 * These tracepoints are host-global. Identities come from the kernel, never from what a
 * process says of itself (comm, argv): every event carries the executable's (dev, ino)
 * and those of ANCESTORS real_parent levels (ident.bpf.h). The kernel filters so that the
 * ring buffer carries only what the breach rules read:
 * - exec: the new executable is a watched program (shell/interpreter, by (dev, ino) in
 *   watched_exes), or an ancestor's is a watched service, or the task runs in a service
 *   cgroup, or fd 0/1/2 is an inet socket (reverse-shell shape); every exec with
 *   proc_cfg.all_execs. Exits only of processes whose exec was emitted. A service
 *   manager's start of a service executable outside a login session marks its cgroup
 *   as a service cgroup.
 * - open: at the syscall's exit, the file behind the returned fd: its (dev, ino) is a
 *   watched file, or its directory's (dev, ino) and its name match a watched directory
 *   pattern, or its directory's name and its name a "*\/dir/name" pattern; opened for
 *   writing or created, or read too where the pattern says so. Files created in a
 *   directory holding watched files too (PATH_CREATIONS): user space attributes a later
 *   rename of one over a watched file (useradd, vipw, sed -i) to its creator. Any spelling of the path
 *   counts (relative, dirfd, "//", ".", symlinks, hard links); the event has the path
 *   the kernel resolved.
 * - module loads, ptrace attach/seize (at syscall exit, with the tracee), BPF_PROG_LOAD:
 *   all of them (rare), except the agent's own (proc_cfg.agent_tgid).
 * All of it only for processes this agent owns (owned(): README, "Running it").
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include "events.h"

char LICENSE[] SEC("license") = "GPL";

#define S_IFMT 00170000
#define S_IFSOCK 0140000
#define AF_INET 2
#define AF_INET6 10
#define FMODE_WRITE 0x2
#define FMODE_CREATED 0x100000
#define PTRACE_ATTACH 16
#define PTRACE_SEIZE 0x4206
#define BPF_PROG_LOAD_CMD 5
#define ROOT_CGROUP_ID 1

const volatile struct proc_config proc_cfg = {};

#include "proc.maps.bpf.h"
#include "proc.bpf.h"
#include "files.bpf.h"

SEC("tracepoint/sched/sched_process_exec")
int handle_sched_process_exec(struct trace_event_raw_sched_process_exec *ctx)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **fds = BPF_CORE_READ(fdt, fd);
	__u32 max_fds = BPF_CORE_READ(fdt, max_fds);
	struct proc_exec_event *e;
	struct work *w;
	void *z;
	__u32 self, above, tgid, off;
	__u16 fam[3];
	__u16 reason = 0;
	__u64 start, end, n;

	if (is_agent())
		return 0;
	if (!owned())
		return 0;
	w = work();
	z = zeroed();
	if (!w || !z)
		return 0;
	bpf_probe_read_kernel(&w->ctx, sizeof(w->ctx), z);
	fill_proc(&w->ctx, task);
	above = fill_ancestry(&w->ctx, task);	/* the path walk waits for the verdict */
	self = exe_flags(&w->ctx.exe);
	/* A service executable started by a service manager (its real child, not an orphan
	 * it reaped) outside a login session, in a cgroup of its own: that cgroup is a
	 * service's from now on, so a double fork that reparents to init is still seen. */
	if ((self & EXE_SERVICE) && (exe_flags(&w->ctx.ancestors[0]) & EXE_MANAGER) &&
	    !(w->ctx.flags & (CTX_REPARENTED | CTX_SERVICE_CGROUP)) &&
	    w->ctx.loginuid == 0xFFFFFFFF && w->ctx.cgroup_id > ROOT_CGROUP_ID)
		bpf_map_update_elem(&service_cgroups, &w->ctx.cgroup_id, &(__u8){1}, BPF_ANY);
	fam[0] = fd_family(fds, max_fds, 0);
	fam[1] = fd_family(fds, max_fds, 1);
	fam[2] = fd_family(fds, max_fds, 2);
	if (self & EXE_PROGRAM)
		reason |= EXEC_PROGRAM;
	if (above & EXE_SERVICE)
		reason |= EXEC_SERVICE_CHILD;
	if (w->ctx.flags & CTX_SERVICE_CGROUP)
		reason |= EXEC_SERVICE_CGROUP;
	if (self & EXE_PACKAGER)
		reason |= EXEC_PACKAGE_MANAGER;
	if (is_inet(fam[0]) || is_inet(fam[1]) || is_inet(fam[2]))
		reason |= EXEC_SOCKET_STDIO;
	if (proc_cfg.all_execs)
		reason |= EXEC_ALL;
	if (exec_policy_wants(task))
		reason |= EXEC_POLICY;
	if (!reason)
		return 0;

	e = reserve(sizeof(*e), EVENT_PROC_EXEC);
	if (!e)
		return 0;
	fill_exe_path(&w->ctx, task);
	bpf_probe_read_kernel(&e->proc, sizeof(e->proc), &w->ctx);
	e->stdio_family[0] = fam[0];
	e->stdio_family[1] = fam[1];
	e->stdio_family[2] = fam[2];
	e->reason = reason;
	off = ctx->__data_loc_filename & 0xFFFF;	/* __data_loc: offset in the low half */
	n = bpf_probe_read_kernel_str(e->filename, sizeof(e->filename), (void *)ctx + off);
	e->filename_len = n > 0 ? n - 1 : 0;
	/* argv only, up to arg_end: the environment that follows may hold secrets. The new
	 * stack was just written by exec, so these user pages are present. */
	start = BPF_CORE_READ(task, mm, arg_start);
	end = BPF_CORE_READ(task, mm, arg_end);
	n = end > start ? end - start : 0;
	e->args_total = n;
	if (n > ARGS_LEN)
		n = ARGS_LEN;
	if (n && !bpf_probe_read_user(e->args, n, (void *)start))
		e->args_len = n;
	e->start_ns = BPF_CORE_READ(task, group_leader, start_boottime);
	exe_nature(task, e);
	tgid = e->proc.pid;
	bpf_ringbuf_submit(e, 0);
	bpf_map_update_elem(&tracked, &tgid, &(__u8){1}, BPF_ANY);
	return 0;
}

SEC("tracepoint/sched/sched_process_exit")
int handle_sched_process_exit(void *ctx)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct proc_exit_event *e;

	/* The whole process is gone when its last thread exits: signal->live reaches 0
	 * before this tracepoint (do_exit), whichever thread is last. */
	if (BPF_CORE_READ(task, signal, live.counter) != 0)
		return 0;
	if (!bpf_map_lookup_elem(&tracked, &tgid))
		return 0;
	bpf_map_delete_elem(&tracked, &tgid);
	e = reserve(sizeof(*e), EVENT_PROC_EXIT);
	if (!e)
		return 0;
	fill_proc_ancestry(&e->proc, task);
	e->exit_code = BPF_CORE_READ(task, exit_code);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

/* --- opens of watched files (files.bpf.h) ----------------------------------------------- */

SEC("tracepoint/syscalls/sys_exit_openat")
int handle_sys_exit_openat(struct trace_event_raw_sys_exit *ctx)
{
	return check_open(ctx->ret, OPEN_OPENAT);
}

SEC("tracepoint/syscalls/sys_exit_openat2")
int handle_sys_exit_openat2(struct trace_event_raw_sys_exit *ctx)
{
	return check_open(ctx->ret, OPEN_OPENAT2);
}

/* open(2) and creat(2) exist on x86-64 but not on arm64: their attach may fail. */
SEC("tracepoint/syscalls/sys_exit_open")
int handle_sys_exit_open(struct trace_event_raw_sys_exit *ctx)
{
	return check_open(ctx->ret, OPEN_OPEN);
}

SEC("tracepoint/syscalls/sys_exit_creat")
int handle_sys_exit_creat(struct trace_event_raw_sys_exit *ctx)
{
	return check_open(ctx->ret, OPEN_CREAT);
}

/* open_by_handle_at(2) (CAP_DAC_READ_SEARCH) opens a file by its handle, with no path:
 * the fd it returns is judged like any other. */
SEC("tracepoint/syscalls/sys_exit_open_by_handle_at")
int handle_sys_exit_open_by_handle_at(struct trace_event_raw_sys_exit *ctx)
{
	return check_open(ctx->ret, OPEN_BY_HANDLE);
}

/* --- module loads ----------------------------------------------------------------------- */

/* module:module_load's layout (include/trace/events/module.h), stable since 2.6; not in
 * vmlinux.h on kernels built without modules, where the attach fails instead. */
struct module_load_args {
	__u64 common;
	__u32 taints;
	__u32 data_loc_name;
};

SEC("tracepoint/module/module_load")
int handle_module_load(struct module_load_args *ctx)
{
	struct module_load_event *e;
	__u32 off;

	if (is_agent())
		return 0;
	if (!owned())
		return 0;
	e = reserve(sizeof(*e), EVENT_MODULE_LOAD);
	if (!e)
		return 0;
	fill_proc_ancestry(&e->proc, (struct task_struct *)bpf_get_current_task());
	e->taints = ctx->taints;
	off = ctx->data_loc_name & 0xFFFF;
	bpf_probe_read_kernel_str(e->name, sizeof(e->name), (void *)ctx + off);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

/* --- ptrace ------------------------------------------------------------------------------ */

SEC("tracepoint/syscalls/sys_enter_ptrace")
int handle_sys_enter_ptrace(struct trace_event_raw_sys_enter *ctx)
{
	struct ptrace_pending p = { .request = ctx->args[0], .pid = ctx->args[1] };
	__u64 id = bpf_get_current_pid_tgid();

	if ((p.request != PTRACE_ATTACH && p.request != PTRACE_SEIZE) || is_agent())
		return 0;
	if (!owned())
		return 0;	/* the exit handler reports only what entry kept */
	bpf_map_update_elem(&pending_ptrace, &id, &p, BPF_ANY);
	return 0;
}

/* The attach's outcome, with the tracee a successful one linked (entry state: request, pid). */
static __always_inline int report_ptrace(__u64 request, __u64 pid, long ret)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct task_struct *tracee;
	struct ptrace_event *e;
	struct list_head *first;

	e = reserve(sizeof(*e), EVENT_PTRACE);
	if (!e)
		return 0;
	fill_proc_ancestry(&e->proc, task);
	e->request = request;
	e->target_pid = pid;
	e->result = ret;
	/* A successful attach links the tracee at the head of the tracer's ptraced list
	 * (__ptrace_link: list_add), so the newest tracee is ptraced.next. */
	first = BPF_CORE_READ(task, ptraced.next);
	if (e->result == 0 && first && first != &task->ptraced) {
		tracee = (void *)first - bpf_core_field_offset(struct task_struct, ptrace_entry);
		e->target_tgid = BPF_CORE_READ(tracee, tgid);
		e->target_tid = BPF_CORE_READ(tracee, pid);
		e->target_uid = BPF_CORE_READ(tracee, real_cred, uid.val);
		e->target_euid = BPF_CORE_READ(tracee, real_cred, euid.val);
		bpf_core_read_str(e->target_comm, sizeof(e->target_comm), &tracee->comm);
	}
	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_ptrace")
int handle_sys_exit_ptrace(struct trace_event_raw_sys_exit *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct ptrace_pending *p = bpf_map_lookup_elem(&pending_ptrace, &id);
	struct ptrace_pending q;

	if (!p)
		return 0;
	q = *p;
	bpf_map_delete_elem(&pending_ptrace, &id);
	return report_ptrace(q.request, q.pid, ctx->ret);
}

/* --- bpf() ------------------------------------------------------------------------------- */

static __always_inline int report_bpf(__u64 cmd, const void *uattr, __u32 size)
{
	struct bpf_prog_load_event *e;
	__u32 name_off = __builtin_offsetof(union bpf_attr, prog_name);

	if (cmd != BPF_PROG_LOAD_CMD || is_agent())
		return 0;
	if (!owned())
		return 0;
	e = reserve(sizeof(*e), EVENT_BPF_PROG_LOAD);
	if (!e)
		return 0;
	fill_proc_ancestry(&e->proc, (struct task_struct *)bpf_get_current_task());
	/* union bpf_attr is UAPI: fixed offsets, no CO-RE needed. Read no further than the
	 * caller's size: the rest of its buffer is not ours to interpret. */
	if (size >= 8) {
		bpf_probe_read_user(&e->prog_type, 4, uattr);
		bpf_probe_read_user(&e->insn_cnt, 4, uattr + 4);
	}
	if (size >= name_off + COMM_LEN)
		bpf_probe_read_user(e->prog_name, COMM_LEN, uattr + name_off);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_bpf")
int handle_sys_enter_bpf(struct trace_event_raw_sys_enter *ctx)
{
	return report_bpf(ctx->args[0], (const void *)ctx->args[1], ctx->args[2]);
}

/* --- several agents ------------------------------------------------------------------ */

/* Forgets another agent the moment its last thread exits: its namespace is the host
 * agent's again. (handle_sched_process_exit, on the same tracepoint, only reports.) */
SEC("tracepoint/sched/sched_process_exit")
int handle_agent_exit(void *ctx)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u32 *ino = bpf_map_lookup_elem(&foreign_agents, &tgid);
	__u32 netns;

	if (!ino || BPF_CORE_READ(task, signal, live.counter) != 0)
		return 0;
	netns = *ino;
	bpf_map_delete_elem(&foreign_netns, &netns);
	bpf_map_delete_elem(&foreign_agents, &tgid);
	return 0;
}
/* --- reverse shells however they are wired ---------------------------------------------
 * 1. A network socket duplicated onto a standard stream: dup/dup2/dup3/fcntl(F_DUPFD)
 *    whose result is fd 0, 1 or 2 and now an AF_INET/AF_INET6 socket (what Falco's
 *    "Redirect STDOUT/STDIN to Network Connection" watches). Read at the syscall's exit
 *    from the fd it returned, so only a duplication that happened is reported, and only
 *    when that socket is on no other standard fd yet (its arrival on stdio, once).
 * 2. A watched program (shell/interpreter), or an executable below none of the system's
 *    executable directories (system_dirs), exec'd with its stdin and its stdout or stderr
 *    on pipes, fifos, ptys or unix sockets: each stream's kind and identity (pipe inode,
 *    fifo dev+inode, pty number, unix peer's inode) go to user space, which looks for the
 *    processes at the other ends and whether they hold a network connection
 *    (agent/sources/stdio.py): the kernel cannot see "the other end of a pipe". */

#include "stdio.bpf.h"

SEC("tracepoint/sched/sched_process_exec")
int handle_exec_stdio(void *ctx)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct stdio_fd fd0 = {}, fd1 = {}, fd2 = {};
	struct proc_stdio_event *e;
	struct file_id exe;

	if (is_agent())
		return 0;
	if (!owned())
		return 0;
	classify_fd(task_fd(task, 0), &fd0);
	if (!is_channel(fd0.kind))
		return 0;
	classify_fd(task_fd(task, 1), &fd1);
	classify_fd(task_fd(task, 2), &fd2);
	if (!(is_channel(fd1.kind) || is_channel(fd2.kind)))
		return 0;
	/* a shell or interpreter by what it runs, not by its comm; or any executable that
	 * is no system file (a copied shell) */
	exe_id(task, &exe);
	if (!(exe_flags(&exe) & EXE_PROGRAM) && in_system_dir(task))
		return 0;
	e = reserve(sizeof(*e), EVENT_PROC_STDIO);
	if (!e)
		return 0;
	fill_proc_ancestry(&e->proc, task);
	e->fd[0] = fd0;
	e->fd[1] = fd1;
	e->fd[2] = fd2;
	e->exe_ino = exe.ino;	/* read once above (exe_id) */
	e->exe_dev = exe.dev;
	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_dup")
int handle_sys_exit_dup(struct trace_event_raw_sys_exit *ctx)
{
	return check_dup(ctx->ret, DUP_DUP);
}

/* dup2(2) exists on x86-64 but not on arm64 (glibc uses dup3 there): its attach may fail. */
SEC("tracepoint/syscalls/sys_exit_dup2")
int handle_sys_exit_dup2(struct trace_event_raw_sys_exit *ctx)
{
	return check_dup(ctx->ret, DUP_DUP2);
}

SEC("tracepoint/syscalls/sys_exit_dup3")
int handle_sys_exit_dup3(struct trace_event_raw_sys_exit *ctx)
{
	return check_dup(ctx->ret, DUP_DUP3);
}

/* fcntl(fd, F_DUPFD, 0) gives the lowest free fd >= 0: fd 0 once stdin is closed. The
 * command is only known at entry; other commands may return 0-2 too (F_GETFL). */
SEC("tracepoint/syscalls/sys_enter_fcntl")
int handle_sys_enter_fcntl(struct trace_event_raw_sys_enter *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();

	if ((ctx->args[1] != F_DUPFD && ctx->args[1] != F_DUPFD_CLOEXEC) || ctx->args[2] > 2)
		return 0;
	bpf_map_update_elem(&pending_dupfd, &id, &(__u8){1}, BPF_ANY);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_fcntl")
int handle_sys_exit_fcntl(struct trace_event_raw_sys_exit *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();

	if (!bpf_map_lookup_elem(&pending_dupfd, &id))
		return 0;
	bpf_map_delete_elem(&pending_dupfd, &id);
	return check_dup(ctx->ret, DUP_FCNTL);
}

/* --- opens through io_uring --------------------------------------------------------------- */

#define IORING_OP_OPENAT 18
#define IORING_OP_OPENAT2 28

struct io_kiocb___open {
	__u8 opcode;
} __attribute__((preserve_access_index));

/* io_uring's IORING_OP_OPENAT/OPENAT2 open a file with no open syscall: judged at the
 * request's completion like a syscall's exit. The completion runs in a thread of the
 * submitting process (the submitter, or one of its io-wq workers: same thread group,
 * same fd table), so the fd in the completion's result is looked up as any other. A
 * request that put the file in the ring's fixed-file table instead returns 0, not an fd:
 * such a file cannot be ioctl'd as a device, and fd 0 judged then is at worst a second
 * look at what fd 0 holds. tp_btf: this fires for every io_uring completion of the host,
 * so it returns after two loads unless the request is an open. A kernel without io_uring
 * lacks the tracepoint: this program alone is refused (status says so). */
SEC("tp_btf/io_uring_complete")
int handle_io_uring_complete(__u64 *ctx)
{
	struct io_kiocb___open *req = (void *)ctx[1];	/* (ring, req, cqe) */
	struct io_uring_cqe *cqe = (void *)ctx[2];
	__u8 op = BPF_CORE_READ(req, opcode);

	if (op != IORING_OP_OPENAT && op != IORING_OP_OPENAT2)
		return 0;
	return check_open(BPF_CORE_READ(cqe, res), OPEN_IO_URING);
}

#include "compat.bpf.h"
