/* The activity probe's maps (activity.bpf.c): ring buffer and loss counter, outbound
 * connections in flight, bytes per destination, per-cgroup counters, the (cgroup, file)
 * pairs seen exec'd, scratch, and the other agents' namespaces. Kernel-only; included by
 * activity.bpf.c after act_cfg. */
#ifndef SWARM_ACTIVITY_MAPS_BPF_H
#define SWARM_ACTIVITY_MAPS_BPF_H

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);	/* ActivityProbe(ring_bytes=...) before load */
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} losses SEC(".maps");

/* An outbound connection between SYN_SENT and CLOSE, keyed by the socket's address. */
struct flow_rec {
	struct act_proc proc;
	__u64 start_ns;
	__u64 established_ns;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);		/* ActivityProbe(flows=...) before load */
	__type(key, __u64);
	__type(value, struct flow_rec);
} flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__uint(max_entries, 8192);		/* ActivityProbe(bytes_entries=...) before load */
	__type(key, struct flow_bytes_key);
	__type(value, struct flow_bytes);
} flow_bytes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);		/* ActivityProbe(cgroup_entries=...) before load */
	__type(key, __u64);
	__type(value, struct cgroup_activity);
} cgroups SEC(".maps");

struct seen_key {
	__u64 cgroup_id;
	struct file_id exe;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);		/* ActivityProbe(seen_entries=...) before load */
	__type(key, struct seen_key);
	__type(value, __u8);
} seen SEC(".maps");

/* walk_path's buffer (2 * PATH_LEN: more than the stack holds). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u8[2 * PATH_LEN]);
} scratch SEC(".maps");

/* Never written: what reserve() clears events with (clang expands memset only so far). */
#define ZERO_LEN 512
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u8[ZERO_LEN]);
} zeroes SEC(".maps");

/* As proc.bpf.c's: namespaces another live agent owns, kept by user space from the
 * agents' registrations, and forgotten here the moment their agent exits. */
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

/* A listen() on a socket never bound: the kernel picks its port after the state change
 * (inet_csk_listen_start), so the listener is reported at the syscall's exit instead,
 * keyed by thread. */
struct pending_listen {
	struct flow_rec r;
	__u64 sk;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, struct pending_listen);
} pending_listen SEC(".maps");

/* [0]: 1 once user space attached handle_activity_listen_exit (else such a listener is
 * reported at once, with port 0). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} listen_exit_on SEC(".maps");

#endif /* SWARM_ACTIVITY_MAPS_BPF_H */
