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
	EVENT_STDIO_DUP = 11,
	EVENT_PROC_STDIO = 12,
	EVENT_GPU_OPEN = 13,
	EVENT_FLOW_CONNECT = 14,
	EVENT_FLOW_CLOSE = 15,
	EVENT_FLOW_LISTEN = 16,
	EVENT_EXEC_NEW = 17,
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

/* A window's counters are reset in place by one CPU (net.bpf.c window_entry): while it
 * does, window_start_ns holds WINDOW_RESETTING, never a real start; readers skip such an
 * entry. `alerted` holds the bits (1 << reason) of the alerts raised, below
 * ALERT_TAG_SHIFT, and above it the window they were raised in
 * (window_start_ns >> ALERT_TAG_SHIFT): bits of an earlier window do not count. */
#define WINDOW_RESETTING 0xFFFFFFFFFFFFFFFFULL
#define ALERT_TAG_SHIFT 12

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
	__u64 alerted;		/* alert bits and their window (ALERT_TAG_SHIFT) */
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
	__u32 drop_unparsable;	/* 1: XDP_DROP what the parser cannot follow (net.bpf.c) */
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

#define NAME_LEN 64		/* one path component in map keys (longer names: no match) */
#define ANCESTORS 8		/* real_parent levels whose executable each event carries */

/* Values of map `watched_exes` (key struct file_id): why exec of that executable matters.
 * The agent fills it from the executables it stat()s on the host, by (dev, ino). */
enum exe_flag {
	EXE_PROGRAM = 1,	/* a shell or interpreter: its exec is always emitted */
	EXE_SERVICE = 2,	/* a network-facing service: execs below it are emitted */
	EXE_MANAGER = 4,	/* a service manager (systemd): what it starts is a service */
	EXE_PACKAGER = 8,	/* a package manager: its exec and exit are emitted (binaries
				 * may have changed: user space re-resolves at its exit) */
};

/* proc_exec_event.reason bits: why the kernel emitted the exec. */
enum exec_reason {
	EXEC_PROGRAM = 1,
	EXEC_SERVICE_CHILD = 2,
	EXEC_SOCKET_STDIO = 4,	/* fd 0, 1 or 2 is an AF_INET/AF_INET6 socket */
	EXEC_ALL = 8,		/* proc_config.all_execs */
	EXEC_SERVICE_CGROUP = 16,	/* runs in a service cgroup (map service_cgroups) */
	EXEC_PACKAGE_MANAGER = 32,	/* a package manager (EXE_PACKAGER) */
	EXEC_POLICY = 64,	/* map exec_policy is on: exec policy rules judge every exec */
};

/* Values of map exec_policy: which execs the exec policy's rules need. */
enum exec_policy_mode {
	EXEC_POLICY_OFF = 0,
	EXEC_POLICY_ALL = 1,		/* every exec (a deny list is filled) */
	EXEC_POLICY_WRITABLE = 2,	/* only execs of files a workload may have written:
					 * unlinked, on tmpfs/ramfs, on a device in map
					 * writable_devs, or with a "tmp" directory or mount
					 * point on their path (a superset: user space decides) */
};

/* proc_exec_event.exe_nature bits: what the kernel knows of the executed file. */
enum exe_nature {
	EXE_UNLINKED = 1,	/* i_nlink == 0: deleted after exec, a memfd, an O_TMPFILE */
	EXE_MEMFD = 2,		/* a memfd_create() file: a pseudo dentry "memfd:..." */
	EXE_IN_WRITABLE = 4,	/* a directory of map writable_dirs (the host's /tmp...) is
				 * among its ancestors within its filesystem, however mounted */
	EXE_DEEP = 8,		/* more than WRITABLE_DIR_DEPTH directories deep */
};

/* proc_exec_event.stdio_family: 0 fd not open, STDIO_NOT_SOCKET, else the socket family */
#define STDIO_NOT_SOCKET 0xFFFF

/* Values of the watch maps: how a matched pattern filters opens. */
enum path_flag {
	PATH_EXACT = 1,		/* the name must be exactly `len` bytes (no prefix match) */
	PATH_READS = 2,		/* emit read-only opens too, not only writes */
	PATH_CREATIONS = 4,	/* emit only files this open created (a directory holding
				 * watched files: a later rename over one is attributed) */
};

/* path_rule.id of the PATH_CREATIONS entries (no pattern of the config). */
#define CREATIONS_ID 0xFFFFFFFF

/* file_open_event.match: which watch map the opened file matched. */
enum open_match {
	MATCH_FILE = 1,		/* its (dev, ino) is a watched file (map watched_files) */
	MATCH_DIR = 2,		/* its directory's (dev, ino) + its name (map watched_dirs) */
	MATCH_NAME = 3,		/* its directory's name + its name (map watched_names) */
};

/* Flags of a path the kernel resolved by walking dentries (*_path_flags). */
enum walk_flag {
	WALK_COMPLETE = 1,	/* reached the root: the path is whole */
	WALK_TRUNCATED = 2,	/* too deep or too long: never to be trusted */
};

/* proc_ctx.flags */
enum ctx_flag {
	CTX_SERVICE_CGROUP = 1,	/* the task's cgroup is in map service_cgroups */
	CTX_REPARENTED = 2,	/* real_parent is not who forked it (orphan: double fork) */
};

/* Which syscall a file_open_event came from. */
enum open_syscall {
	OPEN_OPENAT = 1,
	OPEN_OPENAT2 = 2,
	OPEN_OPEN = 3,
	OPEN_CREAT = 4,
	OPEN_BY_HANDLE = 5,	/* open_by_handle_at(2): no path at all */
	OPEN_IO_URING = 6,	/* IORING_OP_OPENAT/OPENAT2, at its completion */
};

/* Set in .rodata before load. */
struct proc_config {
	__u32 agent_tgid;	/* never report this process (the agent itself); 0: none */
	__u32 all_execs;	/* 1: emit every exec (benchmarks), 0: only what rules need */
	__u32 netns_ino;	/* the agent's network namespace: its processes are the agent's */
	__u32 host_scope;	/* 1: also those of every namespace not in map foreign_netns */
	__u32 gpu_major;	/* opens of character devices of this major (NVIDIA's: 195) are
				 * gpu_open_events; 0: none */
};
_Static_assert(sizeof(struct proc_config) == 20, "proc_config size");

/* A file's identity: the kernel's dev_t of its superblock (MAJOR << 20 | MINOR) and its
 * inode number. Key of watched_exes and watched_files. */
struct file_id {
	__u64 ino;
	__u32 dev;
	__u32 pad0;
};
_Static_assert(sizeof(struct file_id) == 16, "file_id size");

/* Key of the LPM trie `watched_dirs`: a directory's identity and a name (prefix) in it.
 * prefixlen is in bits and covers at least the whole directory id (128 bits). */
struct dir_key {
	__u32 prefixlen;
	__u32 pad0;
	struct file_id dir;
	__u8 name[NAME_LEN];
};
_Static_assert(sizeof(struct dir_key) == 88, "dir_key size");

/* Key of the hash `watched_names`: the names of a file's directory and of the file
 * ("*\/.ssh/authorized_keys": dir ".ssh", name "authorized_keys"), zero padded. */
struct name_key {
	__u8 dir[NAME_LEN];
	__u8 name[NAME_LEN];
};
_Static_assert(sizeof(struct name_key) == 128, "name_key size");

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
	__u8 comm[COMM_LEN];	/* display only: the process sets it (prctl) */
	__u8 parent_comm[COMM_LEN];
	struct file_id exe;	/* mm->exe_file: what the task runs, as the kernel knows it */
	__u32 loginuid;		/* audit login uid; 0xFFFFFFFF: not from a login */
	__u32 sessionid;	/* audit session id; 0xFFFFFFFF: none */
	__u32 flags;		/* enum ctx_flag */
	__u32 ancestor_count;	/* entries used in ancestors */
	struct file_id ancestors[ANCESTORS];	/* exe of real_parent, its real_parent, ... */
	__u16 exe_path_len;	/* bytes used in exe_path */
	__u16 exe_path_flags;	/* enum walk_flag */
	__u32 pad1;
	/* exe's path as the kernel resolved it (mm->exe_file's dentries): its components
	 * leaf first, each NUL terminated ("sh\0bin\0usr\0" is /usr/bin/sh) */
	__u8 exe_path[PATH_LEN];
};
_Static_assert(sizeof(struct proc_ctx) == 488, "proc_ctx size");

struct proc_exec_event {
	struct event_header hdr;
	struct proc_ctx proc;
	__u16 stdio_family[3];	/* fds 0, 1, 2 */
	__u16 reason;		/* enum exec_reason bits */
	__u32 filename_len;	/* bytes in filename, without the NUL */
	__u32 args_len;		/* bytes of argv copied into args (NUL separated) */
	__u32 args_total;	/* bytes of the whole argv */
	__u32 pad0;
	__u8 filename[PATH_LEN];	/* as the caller spelled it */
	__u8 args[ARGS_LEN];
	/* the exec policy's facts (added at the end: older readers ignore them) */
	__u64 start_ns;		/* the thread group leader's start_boottime (pins it) */
	__u64 exe_magic;	/* the executable's superblock s_magic (TMPFS_MAGIC...) */
	__u32 exe_nlink;	/* its i_nlink when exec'd */
	__u16 exe_nature;	/* enum exe_nature bits */
	__u16 pad1;
};
_Static_assert(sizeof(struct proc_exec_event) == 1064, "proc_exec_event size");

struct proc_exit_event {
	struct event_header hdr;
	struct proc_ctx proc;
	__u32 exit_code;	/* wait(2) status: exit status << 8, or the signal */
	__u32 pad0;
};
_Static_assert(sizeof(struct proc_exit_event) == 512, "proc_exit_event size");

/* Raised when an open returns: the file is the one the returned fd refers to, so any
 * spelling of its path (relative, dirfd, "//", ".", symlinks, hard links) counts. */
struct file_open_event {
	struct event_header hdr;
	struct proc_ctx proc;
	__u32 flags;		/* file->f_flags (O_CREAT, O_EXCL, O_TRUNC already cleared) */
	__u32 rule_id;		/* path_rule.id of the matched pattern */
	__u16 path_len;		/* bytes used in path */
	__u16 syscall;		/* enum open_syscall */
	__u16 rule_flags;	/* path_rule.flags */
	__u16 path_flags;	/* enum walk_flag */
	__u32 fmode;		/* file->f_mode: FMODE_WRITE 0x2, FMODE_CREATED 0x100000 */
	__u32 match;		/* enum open_match */
	struct file_id file;
	struct file_id dir;	/* the directory the file was opened in (its dentry's parent) */
	__u8 path[PATH_LEN];	/* resolved path, components leaf first (see proc_ctx) */
};
_Static_assert(sizeof(struct file_open_event) == 816, "file_open_event size");

struct module_load_event {
	struct event_header hdr;
	struct proc_ctx proc;
	__u32 taints;
	__u32 pad0;
	__u8 name[MODULE_NAME_LEN];
};
_Static_assert(sizeof(struct module_load_event) == 576, "module_load_event size");

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
_Static_assert(sizeof(struct ptrace_event) == 552, "ptrace_event size");

struct bpf_prog_load_event {
	struct event_header hdr;
	struct proc_ctx proc;
	__u32 prog_type;	/* enum bpf_prog_type */
	__u32 insn_cnt;
	__u8 prog_name[COMM_LEN];
};
_Static_assert(sizeof(struct bpf_prog_load_event) == 528, "bpf_prog_load_event size");

/* --- network probe, parser (net.bpf.h) --------------------------------------------- */

/* Why the XDP parser could not follow a packet: the index of per-CPU map `unparsed`.
 * Such a packet still counts to its source whenever the source address was read. */
enum parse_failure {
	PARSE_TRUNCATED = 1,		/* a header runs past the end of the packet */
	PARSE_CHAIN_TOO_LONG = 2,	/* more IPv6 extension headers than the parser follows */
	PARSE_UNKNOWN_HEADER = 3,	/* an IPv6 next header neither followed nor an upper layer */
	PARSE_VLAN_DEPTH = 4,		/* more than two VLAN tags */
	PARSE_BAD_HEADER = 5,		/* wrong IP version, IPv4 header length below 20 */
};
#define PARSE_FAILURES 6		/* entries of map `unparsed` (index 0 unused) */

/* --- reverse shells however they are wired (proc.bpf.c, end) ----------------------- */

/* Which syscall put a socket on a standard stream (stdio_dup_event.syscall). */
enum dup_syscall {
	DUP_DUP = 1,
	DUP_DUP2 = 2,
	DUP_DUP3 = 3,
	DUP_FCNTL = 4,		/* F_DUPFD / F_DUPFD_CLOEXEC */
};

/* What one standard stream is (stdio_fd.kind). */
enum stdio_kind {
	STDIO_CLOSED = 0,
	STDIO_FILE = 1,		/* regular file, directory, anything not below */
	STDIO_PIPE = 2,		/* anonymous pipe (pipefs); ino identifies it */
	STDIO_FIFO = 3,		/* named pipe; dev + ino identify it */
	STDIO_PTY = 4,		/* a pty slave /dev/pts/N; rdev gives N */
	STDIO_PTMX = 5,		/* a pty master */
	STDIO_TTY = 6,		/* another terminal: console, /dev/ttyN, serial */
	STDIO_CHAR = 7,		/* another character device (/dev/null) */
	STDIO_UNIX = 8,		/* AF_UNIX socket; ino is its PEER's inode (0: none) */
	STDIO_INET = 9,		/* AF_INET/AF_INET6 socket; ino is its own inode */
	STDIO_SOCKET = 10,	/* a socket of another family (see family) */
};

/* One standard stream of an exec'ing process, read from its fd table in the kernel. */
struct stdio_fd {
	__u64 ino;		/* the file's inode number (unix sockets: the peer's) */
	__u32 dev;		/* the inode's superblock device, kernel encoding (major << 20 | minor) */
	__u32 rdev;		/* character devices: the device number, kernel encoding */
	__u16 kind;		/* enum stdio_kind */
	__u16 family;		/* sockets: AF_* */
	__u32 flags;		/* the open file's f_flags (O_ACCMODE: which end of a pipe) */
};
_Static_assert(sizeof(struct stdio_fd) == 24, "stdio_fd size");

/* An AF_INET/AF_INET6 socket duplicated onto fd 0, 1 or 2 (dup, dup2, dup3, fcntl
 * F_DUPFD), raised at the syscall's exit from the fd it returned. */
struct stdio_dup_event {
	struct event_header hdr;
	struct proc_ctx proc;
	__u64 exe_ino;		/* the task's executable (mm->exe_file), as the kernel holds it */
	__u32 exe_dev;		/* its superblock device, kernel encoding */
	__u32 newfd;		/* 0, 1 or 2 */
	__u16 syscall;		/* enum dup_syscall */
	__u16 family;		/* AF_INET or AF_INET6 */
	__u16 dport;		/* the socket's remote port, host order (0: not connected) */
	__u16 sport;		/* its local port, host order */
	__u8 daddr[16];		/* its remote address, network order */
	__u64 sock_ino;		/* the socket's inode (socket:[ino] in /proc/PID/fd) */
};
_Static_assert(sizeof(struct stdio_dup_event) == 552, "stdio_dup_event size");

/* Exec of a watched program (EXE_PROGRAM) whose stdin and stdout or stderr are pipes,
 * fifos, ptys or sockets: the shape user space correlates with the other ends. */
struct proc_stdio_event {
	struct event_header hdr;
	struct proc_ctx proc;
	struct stdio_fd fd[3];	/* fds 0, 1, 2 */
	__u64 exe_ino;
	__u32 exe_dev;
	__u32 pad0;
};
_Static_assert(sizeof(struct proc_stdio_event) == 592, "proc_stdio_event size");

/* An open of a GPU character device (/dev/nvidia0.., /dev/nvidiactl: major
 * proc_config.gpu_major), raised when the open returned a file: judged by the device
 * number, whatever the node's path or inode (a container's /dev has its own nodes). The
 * process is pinned for the response by its start time. */
struct gpu_open_event {
	struct event_header hdr;
	struct proc_ctx proc;
	__u64 start_ns;		/* the thread group leader's start_boottime */
	__u32 major;
	__u32 minor;		/* /dev/nvidiaN: N; nvidiactl 255, nvidia-modeset 254 */
	__u32 flags;		/* file->f_flags */
	__u16 syscall;		/* enum open_syscall */
	__u16 pad0;
};
_Static_assert(sizeof(struct gpu_open_event) == 528, "gpu_open_event size");

/* --- activity probe (activity.bpf.c): what the anomaly models learn from ---------------- */

/* flow_event.outcome */
enum flow_outcome {
	FLOW_ESTABLISHED = 1,	/* SYN_SENT -> ESTABLISHED */
	FLOW_REFUSED = 2,	/* SYN_SENT -> CLOSE with sk_err ECONNREFUSED (a RST to the SYN) */
	FLOW_FAILED = 3,	/* SYN_SENT -> CLOSE otherwise (timeout, unreachable, closed) */
	FLOW_CLOSED = 4,	/* an established outbound connection reached CLOSE */
	FLOW_LISTENING = 5,	/* a socket entered LISTEN */
};

/* Set in .rodata before load. */
struct activity_config {
	__u64 window_ns;	/* the per-cgroup caps count per window of this length */
	__u32 agent_tgid;	/* never report this process (the agent itself); 0: none */
	__u32 netns_ino;	/* the agent's network namespace: its processes are the agent's */
	__u32 host_scope;	/* 1: also those of every namespace not in map foreign_netns */
	__u32 flow_cap;		/* flow.connect/close per cgroup per window (at SYN_SENT); 0: no cap */
	__u32 exec_new_cap;	/* exec_new events per cgroup per window; 0: no cap */
	__u32 listen_cap;	/* flow.listen events per cgroup per window (its own: a connect
				 * storm must not hide a new listener); 0: no cap */
};
_Static_assert(sizeof(struct activity_config) == 32, "activity_config size");

/* Who acted: read in process context (connect, listen, exec), never from the process's
 * claims but comm (display only). */
struct act_proc {
	__u64 cgroup_id;	/* cgroup v2 id of the task */
	__u32 pid;		/* tgid, init pid namespace */
	__u32 uid;
	struct file_id exe;	/* mm->exe_file */
	__u8 comm[COMM_LEN];
};
_Static_assert(sizeof(struct act_proc) == 48, "act_proc size");

/* flow.connect (kind EVENT_FLOW_CONNECT), flow.close, flow.listen: one outbound TCP
 * connection's outcome or end, or a new listener. Addresses network order (IPv4 in the
 * first 4 bytes), ports host order. */
struct flow_event {
	struct event_header hdr;
	struct act_proc proc;	/* the connecting (listening) task, recorded at SYN_SENT */
	__u64 start_ns;		/* SYN_SENT (listen: the event time) */
	__u64 established_ns;	/* ESTABLISHED; 0: never */
	__u64 bytes_acked;	/* flow.close: tcp_sock.bytes_acked (sent and acknowledged) */
	__u64 bytes_received;	/* flow.close: tcp_sock.bytes_received */
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport;
	__u16 dport;
	__u16 family;		/* AF_INET 2, AF_INET6 10 */
	__u16 outcome;		/* enum flow_outcome */
	__u32 err;		/* sk_err at the outcome (ECONNREFUSED, ETIMEDOUT, ...) */
	__u32 pad0;
};
_Static_assert(sizeof(struct flow_event) == 144, "flow_event size");

/* activity.exec_new: the first exec of a file (dev, ino) in a cgroup (LRU map seen). */
struct exec_new_event {
	struct event_header hdr;
	struct act_proc proc;	/* after the exec: exe is the new executable */
	__u16 exe_path_len;	/* bytes used in exe_path */
	__u16 exe_path_flags;	/* enum walk_flag */
	__u32 pad0;
	__u8 exe_path[PATH_LEN];	/* components leaf first (see proc_ctx) */
};
_Static_assert(sizeof(struct exec_new_event) == 328, "exec_new_event size");

/* Key of the per-CPU LRU map flow_bytes: bytes a cgroup sent to one destination. An
 * unconnected UDP socket's destination is unknown here (all zero). */
struct flow_bytes_key {
	__u64 cgroup_id;
	__u8 daddr[16];
	__u16 dport;		/* host order */
	__u8 proto;		/* 6 tcp, 17 udp */
	__u8 family;		/* AF_INET 2, AF_INET6 10 */
	__u32 pad0;
};
_Static_assert(sizeof(struct flow_bytes_key) == 32, "flow_bytes_key size");

struct flow_bytes {
	__u64 bytes;		/* cumulative, this CPU's */
	__u64 sends;
};
_Static_assert(sizeof(struct flow_bytes) == 16, "flow_bytes size");

/* The per-cgroup caps (index of cgroup_activity.dropped and .in_window). */
enum activity_cap {
	CAP_FLOWS = 0,		/* activity_config.flow_cap */
	CAP_EXEC_NEW = 1,	/* exec_new_cap */
	CAP_LISTENS = 2,	/* listen_cap */
};
#define ACTIVITY_CAPS 3

/* Value of the LRU map cgroups (key: cgroup id): cumulative counters, and the window the
 * per-cgroup caps count in. */
struct cgroup_activity {
	__u64 execs;
	__u64 connects;		/* SYN_SENT, over the cap too */
	__u64 listens;		/* sockets entering LISTEN, over the cap too */
	__u64 dropped[ACTIVITY_CAPS];	/* events not sent, over each cap */
	__u64 window_start_ns;
	__u32 in_window[ACTIVITY_CAPS];	/* events sent in this window, per cap */
	__u32 pad0;
};
_Static_assert(sizeof(struct cgroup_activity) == 72, "cgroup_activity size");


#endif
