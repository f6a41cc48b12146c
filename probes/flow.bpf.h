/* Solicited or not: socket lookups for the XDP program and the table of peers the tc egress
 * program records, both on what parse_packet() (net.bpf.h) read. A packet is solicited
 * when it belongs to a flow this host accepted or started; only unsolicited packets count
 * towards flood thresholds. Kernel-only; included once, by net.bpf.c. */
#ifndef SWARM_FLOW_BPF_H
#define SWARM_FLOW_BPF_H

/* Peers this host sent to: (peer address, peer port, local port, protocol) -> last send,
 * ns. UDP datagrams, and TCP segments of established flows (ACK without SYN or RST) that
 * no local socket owns: those of containers and other namespaces this host forwards for.
 * Kernel-only (written by handle_tc_egress, read by handle_xdp); LRU keeps it bounded. */
struct exchange_key {
	__u8 addr[16];
	__u32 family;
	__u16 peer_port;	/* network order */
	__u16 local_port;	/* network order */
	__u8 proto;
	__u8 pad0[3];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);	/* Probes.map_entries, set before load */
	__type(key, struct exchange_key);
	__type(value, __u64);
} exchanges SEC(".maps");

#define TCP_ESTABLISHED 1
#define TCP_LISTEN 10
#define EXCHANGE_TTL_NS (60ULL * 1000000000ULL)	/* ~ conntrack's UDP stream timeout */
#define EXCHANGE_REFRESH_NS 1000000000ULL	/* rewrite a live entry at most once a second */
#define TC_ACT_UNSPEC -1
#define TC_ACT_OK 0
#define TC_ACT_SHOT 2

/* The socket-lookup tuple of a received packet: its source is the peer. The helpers want
 * network-order ports; struct pkt keeps them in host order for the counters. */
static __always_inline __u32 tuple_of(const struct pkt *p, struct bpf_sock_tuple *t)
{
	if (p->src.family == AF_INET6) {
		__builtin_memcpy(t->ipv6.saddr, p->src.addr, 16);
		__builtin_memcpy(t->ipv6.daddr, p->dst, 16);
		t->ipv6.sport = bpf_htons(p->sport);
		t->ipv6.dport = bpf_htons(p->dport);
		return sizeof(t->ipv6);
	}
	__builtin_memcpy(&t->ipv4.saddr, p->src.addr, 4);
	__builtin_memcpy(&t->ipv4.daddr, p->dst, 4);
	t->ipv4.sport = bpf_htons(p->sport);
	t->ipv4.dport = bpf_htons(p->dport);
	return sizeof(t->ipv4);
}

/* The exchanges key of a packet: received (peer = its source) or sent (peer = its
 * destination). */
static __always_inline void exchange_of(const struct pkt *p, int sent, struct exchange_key *k)
{
	__builtin_memcpy(k->addr, sent ? p->dst : p->src.addr, 16);
	k->family = p->src.family;
	k->peer_port = bpf_htons(sent ? p->dport : p->sport);
	k->local_port = bpf_htons(sent ? p->sport : p->dport);
	k->proto = p->proto;
}

static __always_inline int exchanged(const struct pkt *p, __u64 now)
{
	struct exchange_key k = {};
	__u64 *last;

	exchange_of(p, 0, &k);
	last = bpf_map_lookup_elem(&exchanges, &k);
	return last && now - *last <= EXCHANGE_TTL_NS;
}

/* 1 when the packet belongs to a flow this host accepted or started. `p` is what
 * parse_packet() read from a packet it parsed whole: a bare SYN, or anything without a
 * TCP or UDP header read (a non-first fragment, a packet that failed to parse: proto 0),
 * is never solicited. The lookups run in the namespace of the receiving device
 * (BPF_F_CURRENT_NETNS); `ctx` is the xdp_md or __sk_buff of the hook. */
static __always_inline int solicited(void *ctx, const struct pkt *p, __u64 now)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	__u32 size;
	int ok = 0;

	if (p->syn || !p->proto)
		return 0;
	size = tuple_of(p, &t);
	if (p->proto == IPPROTO_TCP) {
		sk = bpf_skc_lookup_tcp(ctx, &t, size, BPF_F_CURRENT_NETNS, 0);
		if (sk) {
			/* A listener matches any peer: only a connection's own socket vouches. */
			ok = sk->state != TCP_LISTEN;
			bpf_sk_release(sk);
		}
	} else {
		sk = bpf_sk_lookup_udp(ctx, &t, size, BPF_F_CURRENT_NETNS, 0);
		if (sk) {
			ok = sk->state == TCP_ESTABLISHED;	/* a connect()ed UDP socket */
			bpf_sk_release(sk);
		}
	}
	return ok || exchanged(p, now);
}

/* Records a packet this host sends, so the peer's answers count as an exchange: UDP, and
 * TCP segments of established flows (never SYNs or resets: answering a forged SYN must
 * not vouch for the forger's next packets). */
static __always_inline void record_exchange(const struct pkt *p, __u64 now)
{
	struct exchange_key k = {};
	__u64 *last;

	if (!p->proto)
		return;
	if (p->proto == IPPROTO_TCP &&
	    (p->tcp_flags & (TCPF_SYN | TCPF_RST | TCPF_ACK)) != TCPF_ACK)
		return;
	exchange_of(p, 1, &k);
	last = bpf_map_lookup_elem(&exchanges, &k);
	if (!last || now - *last > EXCHANGE_REFRESH_NS)
		bpf_map_update_elem(&exchanges, &k, &now, BPF_ANY);
}

#endif
