/* The process probe's maps (proc.bpf.c): ring buffer, loss counter, the watch sets the
 * agent fills (executables, files, directories, service cgroups), per-syscall pending state
 * and per-CPU scratch. Kernel-only; included by proc.bpf.c after proc_cfg. */
#ifndef SWARM_PROC_MAPS_BPF_H
#define SWARM_PROC_MAPS_BPF_H


struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1024 * 1024);	/* ProcProbe(ring_bytes=...) before load */
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} losses SEC(".maps");

#define ZERO_LEN 2048

/* Never written: what reserve() clears events with. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u8[ZERO_LEN]);
} zeroes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct file_id);
	__type(value, __u32);			/* enum exe_flag bits */
} watched_exes SEC(".maps");

/* cgroup ids of services: configured by the agent, or marked here at a service's exec. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u8);
} service_cgroups SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct file_id);
	__type(value, struct path_rule);
} watched_files SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);	/* required for LPM tries */
	__type(key, struct dir_key);
	__type(value, struct path_rule);
} watched_dirs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, struct name_key);
	__type(value, struct path_rule);
} watched_names SEC(".maps");

/* Prefilters, so that most opens cost two hash lookups: the directories with entries in
 * watched_dirs, and the lengths (bit n: n bytes) of the names in watched_names. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct file_id);
	__type(value, __u8);
} watched_dir_ids SEC(".maps");

/* The system's executable directories (breach.system_exec_dirs: a literal directory
 * and a star), by the directory's (dev, ino): an executable below none of them that is
 * exec'd with piped stdio goes to user space as a shell would (a copied shell in a
 * pipeline). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, struct file_id);
	__type(value, __u8);
} system_dirs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} watched_name_lens SEC(".maps");

/* Processes whose exec was emitted, so that their exit is too. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, __u8);
} tracked SEC(".maps");

struct ptrace_pending {
	__u32 request;
	__u32 pid;
};

/* ptrace requests between syscall entry and exit, per thread. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, struct ptrace_pending);
} pending_ptrace SEC(".maps");

struct work {
	struct proc_ctx ctx;
	struct dir_key dir;
	struct name_key names;
	__u8 path[2 * PATH_LEN];	/* walk_path's buffer */
};

/* More than the 512-byte BPF stack holds: per-CPU scratch instead. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct work);
} scratch SEC(".maps");

/* One host, several agents (README, "Running it"): network namespaces whose processes
 * another live agent owns (netns inode -> its tgid), and the same by owner (tgid -> netns
 * inode). Written by user space from the agents' registrations; an owner's entries go
 * the moment it exits (handle_agent_exit), so a dead agent never blinds this one. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u32);
} foreign_netns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u32);
} foreign_agents SEC(".maps");

/* The exec policy's switch, set by user space: nonzero while a loaded rule judges every
 * exec (a policy_violation rule on proc.exec), zero when a reload removed the last one. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} exec_policy SEC(".maps");

/* Superblock devices of the host's /tmp, /var/tmp and /dev/shm where they are their own
 * filesystems (EXEC_POLICY_WRITABLE: a bind mount of them elsewhere counts too). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8);
	__type(key, __u32);
	__type(value, __u8);
} writable_devs SEC(".maps");

/* The host's world-writable directories (/tmp, /var/tmp, /dev/shm, /run/lock) by (dev,
 * ino): an executable below one of them, within its filesystem, is EXE_IN_WRITABLE
 * whatever mount (a bind mount in a user's own mount namespace) it was run through. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, struct file_id);
	__type(value, __u8);
} writable_dirs SEC(".maps");

#endif /* SWARM_PROC_MAPS_BPF_H */
