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

#endif
