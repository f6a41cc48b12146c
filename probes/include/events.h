/* The kernel/user ABI of swarm-agent's probes: the one header shared with Python.
 *
 * agent/sources/abi.py mirrors every struct here with ctypes; tests/unit/test_abi.py
 * compares both through the BTF of abi.bpf.o, so drift fails the build.
 * Rules: fixed-width types only, explicit padding (the BPF side zeroes it), no bool,
 * pointers or bitfields, every event starts with struct event_header, every size is
 * asserted. Addresses are network order, IPv4 in the first 4 bytes of addr[16].
 */
#ifndef SWARM_EVENTS_H
#define SWARM_EVENTS_H

#ifndef __VMLINUX_H__
#include <linux/types.h>
#endif

enum event_kind {
	EVENT_NET_SOURCE = 1,
	EVENT_NET_SERVICE = 2,
	EVENT_TCP_ESTABLISHED = 3,
	EVENT_TCP_RESET = 4,
	EVENT_PROC_EXEC = 5,
	EVENT_PROC_EXIT = 6,
	EVENT_FILE_OPEN = 7,
	EVENT_MODULE_LOAD = 8,
	EVENT_PTRACE = 9,
	EVENT_BPF_PROG_LOAD = 10,
};

/* Why an alert fired; bit (1 << reason) marks "already alerted in this window". */
enum alert_reason {
	REASON_SYNS = 1,
	REASON_PACKETS = 2,
	REASON_UDP = 3,
	REASON_PORTS = 4,
	REASON_SVC_SYNS = 5,
	REASON_SVC_PACKETS = 6,
	REASON_SVC_UDP = 7,
	REASON_CONNS = 8,
	REASON_RESETS = 9,
	/* resets drawn by handshakes a SYN proxy verified (SYN looped back from the proxy) */
	REASON_VERIFIED_RESETS = 10,
};

/* Distinct-value estimates are hashed bitmaps of this many bits (linear counting). */
#define DISTINCT_BITS 1024
#define DISTINCT_WORDS (DISTINCT_BITS / 64)

struct event_header {
	__u32 kind;
	__u32 size;
	__u64 ts_ns;		/* bpf_ktime_get_ns() when the alert was raised */
};
_Static_assert(sizeof(struct event_header) == 16, "event_header size");

/* Map key for per-address maps. family is AF_INET (2) or AF_INET6 (10). */
struct addr_key {
	__u8 addr[16];
	__u32 family;
};
_Static_assert(sizeof(struct addr_key) == 20, "addr_key size");

/* Map key for per-service maps: protocol (6 tcp, 17 udp) and host-order port. */
struct service_key {
	__u16 dport;
	__u8 proto;
	__u8 pad0;
};
_Static_assert(sizeof(struct service_key) == 4, "service_key size");

/* Per-source counters of one window (value of map `sources`). */
struct source_stats {
	__u64 window_start_ns;	/* first packet of the window */
	__u64 packets;
	__u64 bytes;
	__u64 syns;		/* SYN without ACK */
	__u64 udp;
	__u64 alerted;		/* bit (1 << reason) set once alerted this window */
	__u64 port_bits[DISTINCT_WORDS];
	__u32 ports;		/* bits set in port_bits */
	__u16 dport;		/* last destination port */
	__u8 proto;		/* last L4 protocol */
	__u8 pad0;
};
_Static_assert(sizeof(struct source_stats) == 184, "source_stats size");

/* Per-service counters of one window (value of map `services`). */
struct service_stats {
	__u64 window_start_ns;
	__u64 packets;
	__u64 syns;
	__u64 udp;
	__u64 alerted;
	__u64 source_bits[DISTINCT_WORDS];
	__u32 sources;		/* bits set in source_bits */
	__u32 pad0;
};
_Static_assert(sizeof(struct service_stats) == 176, "service_stats size");

/* Per-remote TCP counters (value of map `remotes`). */
struct remote_stats {
	__u64 window_start_ns;
	__u64 conns;
	__u64 resets;
	__u64 alerted;
};
_Static_assert(sizeof(struct remote_stats) == 32, "remote_stats size");

/* Thresholds per window (map `thresholds`, one entry). 0 disables that signal.
 * Distinct counts are in bits of the hashed bitmap, not in values. */
struct net_thresholds {
	__u64 syns;
	__u64 packets;
	__u64 udp;
	__u64 port_bits;
	__u64 conns;
	__u64 resets;
	__u64 svc_syns;
	__u64 svc_packets;
	__u64 svc_udp;
	__u64 svc_source_bits;	/* minimum for any service alert; 0: no minimum */
};
_Static_assert(sizeof(struct net_thresholds) == 80, "net_thresholds size");

/* Set in .rodata before load. */
struct net_config {
	__u64 window_ns;
	__u32 netns_ino;	/* only count tracepoint events of this network namespace */
	__u32 pad0;
};
_Static_assert(sizeof(struct net_config) == 16, "net_config size");

struct net_source_event {
	struct event_header hdr;
	__u8 addr[16];
	__u32 family;
	__u32 reason;
	__u64 window_start_ns;
	__u64 packets;
	__u64 bytes;
	__u64 syns;
	__u64 udp;
	__u32 port_bits;
	__u16 dport;
	__u8 proto;
	__u8 pad0;
};
_Static_assert(sizeof(struct net_source_event) == 88, "net_source_event size");

struct net_service_event {
	struct event_header hdr;
	__u64 window_start_ns;
	__u64 packets;
	__u64 syns;
	__u64 udp;
	__u32 source_bits;
	__u32 reason;
	__u16 dport;
	__u8 proto;
	__u8 pad0[5];
};
_Static_assert(sizeof(struct net_service_event) == 64, "net_service_event size");

/* tcp.established and tcp.reset: count per remote address in the window.
 * dport is the local port the remote addressed (its destination port). */
struct tcp_remote_event {
	struct event_header hdr;
	__u8 addr[16];
	__u32 family;
	__u32 reason;
	__u64 window_start_ns;
	__u64 count;
	__u16 dport;
	__u8 pad0[6];
};
_Static_assert(sizeof(struct tcp_remote_event) == 64, "tcp_remote_event size");

/* --- process probe (proc.bpf.c) ------------------------------------------------------ */

#define COMM_LEN 16
#define PATH_LEN 256		/* also the LPM trie's data size (its maximum) */
#define ARGS_LEN 256
#define MODULE_NAME_LEN 64

/* Values of map `watched_comms` (key struct comm_key): why exec of that comm matters. */
enum comm_flag {
	COMM_PROGRAM = 1,	/* a shell or interpreter: its exec is always emitted */
	COMM_SERVICE = 2,	/* a network-facing service: every exec it starts is emitted */
};

/* proc_exec_event.reason bits: why the kernel emitted the exec. */
enum exec_reason {
	EXEC_PROGRAM = 1,
	EXEC_SERVICE_CHILD = 2,
	EXEC_SOCKET_STDIO = 4,	/* fd 0, 1 or 2 is an AF_INET/AF_INET6 socket */
	EXEC_ALL = 8,		/* proc_config.all_execs */
};

/* proc_exec_event.stdio_family: 0 fd not open, STDIO_NOT_SOCKET, else the socket family */
#define STDIO_NOT_SOCKET 0xFFFF

/* Values of the path tries: how a matched pattern filters opens. */
enum path_flag {
	PATH_EXACT = 1,		/* the path must be exactly `len` bytes (no prefix match) */
	PATH_READS = 2,		/* emit read-only opens too, not only writes */
};

/* Which syscall a file_open_event came from. */
enum open_syscall {
	OPEN_OPENAT = 1,
	OPEN_OPENAT2 = 2,
	OPEN_OPEN = 3,
	OPEN_CREAT = 4,
};

/* Set in .rodata before load. */
struct proc_config {
	__u32 agent_tgid;	/* never report this process (the agent itself); 0: none */
	__u32 all_execs;	/* 1: emit every exec (benchmarks), 0: only what rules need */
};
_Static_assert(sizeof(struct proc_config) == 8, "proc_config size");

struct comm_key {
	__u8 comm[COMM_LEN];
};
_Static_assert(sizeof(struct comm_key) == 16, "comm_key size");

/* Key of the LPM tries `watched_prefixes` and `watched_suffixes` (the latter holds
 * patterns reversed). prefixlen is in bits. */
struct path_key {
	__u32 prefixlen;
	__u8 path[PATH_LEN];
};
_Static_assert(sizeof(struct path_key) == 260, "path_key size");

struct path_rule {
	__u16 flags;		/* enum path_flag */
	__u16 len;		/* pattern length in bytes */
	__u32 id;		/* index of the pattern in user space's list */
};
_Static_assert(sizeof(struct path_rule) == 8, "path_rule size");

/* Who did it: the current task when the event was raised. */
struct proc_ctx {
	__u64 cgroup_id;	/* cgroup v2 id (the cgroup directory's inode) */
	__u32 pid;		/* tgid, as the init pid namespace sees it */
	__u32 tid;
	__u32 ppid;		/* tgid of real_parent */
	__u32 uid;
	__u32 euid;
	__u32 pad0;
	__u8 comm[COMM_LEN];
	__u8 parent_comm[COMM_LEN];
};
_Static_assert(sizeof(struct proc_ctx) == 64, "proc_ctx size");

struct proc_exec_event {
	struct event_header hdr;
	struct proc_ctx proc;
	__u16 stdio_family[3];	/* fds 0, 1, 2 */
	__u16 reason;		/* enum exec_reason bits */
	__u32 filename_len;	/* bytes in filename, without the NUL */
	__u32 args_len;		/* bytes of argv copied into args (NUL separated) */
	__u32 args_total;	/* bytes of the whole argv */
	__u32 pad0;
	__u8 filename[PATH_LEN];
	__u8 args[ARGS_LEN];
};
_Static_assert(sizeof(struct proc_exec_event) == 616, "proc_exec_event size");

struct proc_exit_event {
	struct event_header hdr;
	struct proc_ctx proc;
	__u32 exit_code;	/* wait(2) status: exit status << 8, or the signal */
	__u32 pad0;
};
_Static_assert(sizeof(struct proc_exit_event) == 88, "proc_exit_event size");

struct file_open_event {
	struct event_header hdr;
	struct proc_ctx proc;
	__u32 flags;		/* open(2) flags */
	__u32 rule_id;		/* path_rule.id of the matched pattern */
	__u16 path_len;
	__u16 syscall;		/* enum open_syscall */
	__u16 rule_flags;	/* path_rule.flags */
	__u16 pad0;
	__u32 mode;
	__u32 pad1;
	__u8 path[PATH_LEN];
};
_Static_assert(sizeof(struct file_open_event) == 360, "file_open_event size");

struct module_load_event {
	struct event_header hdr;
	struct proc_ctx proc;
	__u32 taints;
	__u32 pad0;
	__u8 name[MODULE_NAME_LEN];
};
_Static_assert(sizeof(struct module_load_event) == 152, "module_load_event size");

/* Raised when ptrace(PTRACE_ATTACH | PTRACE_SEIZE) returns; the tracee is read from the
 * tracer's ptraced list, so it is the global task even across pid namespaces. */
struct ptrace_event {
	struct event_header hdr;
	struct proc_ctx proc;
	__s64 result;		/* the syscall's return value */
	__u32 request;
	__u32 target_pid;	/* as passed by the tracer (its pid namespace) */
	__u32 target_tgid;	/* global; 0 when the attach failed */
	__u32 target_tid;
	__u32 target_uid;
	__u32 target_euid;
	__u8 target_comm[COMM_LEN];
};
_Static_assert(sizeof(struct ptrace_event) == 128, "ptrace_event size");

struct bpf_prog_load_event {
	struct event_header hdr;
	struct proc_ctx proc;
	__u32 prog_type;	/* enum bpf_prog_type */
	__u32 insn_cnt;
	__u8 prog_name[COMM_LEN];
};
_Static_assert(sizeof(struct bpf_prog_load_event) == 104, "bpf_prog_load_event size");

#endif
