/* 32-bit syscalls of any process (x86-64 ia32 emulation: `int $0x80`, or a 32-bit
 * binary's sysenter/syscall): the syscalls:sys_enter_* and sys_exit_* tracepoints never
 * fire for them (the kernel's syscall tracer skips compat syscalls), so an open, dup2,
 * fcntl, ptrace or bpf issued that way would pass unseen. One BTF raw tracepoint on
 * raw_syscalls:sys_exit, which fires for every syscall of the host, returns at once unless
 * the syscall number is one of the i386 numbers below AND the task is in a compat syscall
 * (thread_info.status & TS_COMPAT, set at a 32-bit syscall's entry and cleared on the way
 * back to user space, after this tracepoint), and hands the rest to the same checks as
 * the 64-bit tracepoints. The arguments are read from the saved registers (the kernel
 * leaves bx/cx/dx of a syscall untouched), so no entry handler is needed.
 * x86 only (CO-RE flavors: on another architecture the relocation fails, the kernel
 * refuses the program and status() reports it degraded). Included by proc.bpf.c last. */
#ifndef SWARM_COMPAT_BPF_H
#define SWARM_COMPAT_BPF_H

#define TS_COMPAT 0x0002

/* arch/x86/entry/syscalls/syscall_32.tbl */
#define NR32_OPEN 5
#define NR32_CREAT 8
#define NR32_PTRACE 26
#define NR32_DUP 41
#define NR32_FCNTL 55
#define NR32_DUP2 63
#define NR32_FCNTL64 221
#define NR32_OPENAT 295
#define NR32_DUP3 330
#define NR32_OPEN_BY_HANDLE_AT 342
#define NR32_BPF 357
#define NR32_OPENAT2 437

struct pt_regs___x86 {
	unsigned long bx;
	unsigned long cx;
	unsigned long dx;
	unsigned long orig_ax;
} __attribute__((preserve_access_index));

struct thread_info___x86 {
	__u32 status;
} __attribute__((preserve_access_index));

struct task_struct___x86 {
	struct thread_info___x86 thread_info;
} __attribute__((preserve_access_index));

static __always_inline int compat_nr(long nr)
{
	switch (nr) {
	case NR32_OPEN: case NR32_CREAT: case NR32_PTRACE: case NR32_DUP: case NR32_FCNTL:
	case NR32_DUP2: case NR32_FCNTL64: case NR32_OPENAT: case NR32_DUP3:
	case NR32_OPEN_BY_HANDLE_AT: case NR32_BPF: case NR32_OPENAT2:
		return 1;
	}
	return 0;
}

/* tp_btf: the tracepoint's arguments and the task are BTF pointers, read by plain loads
 * (no helper call): this runs on every syscall of the host. */
SEC("tp_btf/sys_exit")
int handle_compat_sys_exit(__u64 *ctx)
{
	struct pt_regs___x86 *regs = (void *)ctx[0];
	struct task_struct___x86 *task;
	long ret = ctx[1];
	long nr = regs->orig_ax;
	__u32 a1, a2, a3;

	if (!compat_nr(nr))
		return 0;
	task = (void *)bpf_get_current_task_btf();
	if (!(task->thread_info.status & TS_COMPAT))
		return 0;
	/* i386 arguments: ebx, ecx, edx (32 bits: a 64-bit value in them is truncated) */
	a1 = regs->bx;
	a2 = regs->cx;
	a3 = regs->dx;
	switch (nr) {
	case NR32_OPEN:
		return check_open(ret, OPEN_OPEN);
	case NR32_CREAT:
		return check_open(ret, OPEN_CREAT);
	case NR32_OPENAT:
		return check_open(ret, OPEN_OPENAT);
	case NR32_OPENAT2:
		return check_open(ret, OPEN_OPENAT2);
	case NR32_OPEN_BY_HANDLE_AT:
		return check_open(ret, OPEN_BY_HANDLE);
	case NR32_DUP:
		return check_dup(ret, DUP_DUP);
	case NR32_DUP2:
		return check_dup(ret, DUP_DUP2);
	case NR32_DUP3:
		return check_dup(ret, DUP_DUP3);
	case NR32_FCNTL:
	case NR32_FCNTL64:
		if ((a2 != F_DUPFD && a2 != F_DUPFD_CLOEXEC) || a3 > 2)
			return 0;
		return check_dup(ret, DUP_FCNTL);
	case NR32_PTRACE:
		if ((a1 != PTRACE_ATTACH && a1 != PTRACE_SEIZE) || is_agent() || !owned())
			return 0;
		return report_ptrace(a1, a2, ret);
	case NR32_BPF:
		return report_bpf(a1, (const void *)(unsigned long)a2, a3);
	}
	return 0;
}

#endif /* SWARM_COMPAT_BPF_H */
