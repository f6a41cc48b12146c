/* Solicited or not: socket lookups and the table of UDP peers for the XDP program. A packet
 * is solicited when it belongs to a flow this host accepted or started; only unsolicited
 * packets count towards flood thresholds. Kernel-only; included once, by net.bpf.c. */
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
#define IP_MF 0x2000
#define TC_ACT_OK 0
#define TCPF_SYN 0x02
#define TCPF_RST 0x04
#define TCPF_ACK 0x10

/* The parts of a packet a socket lookup needs (addresses and ports in network order),
 * read after parse_packet() accepted it. Only the plain layouts are followed (one VLAN
 * tag, IPv4 without fragmentation, IPv6 without extension headers): for anything else
 * read_flow fails and the packet counts as unsolicited, which errs towards counting. */
struct flow {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 v6;
	__u8 tcp_flags;
	__u8 pad0;
};

static __always_inline int read_l4(void *l4, void *end, __u8 proto, struct flow *f)
{
	if (proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;

		if ((void *)(th + 1) > end)
			return -1;
		f->sport = th->source;
		f->dport = th->dest;
		f->tcp_flags = ((__u8 *)th)[13];
	} else if (proto == IPPROTO_UDP) {
		struct udphdr *uh = l4;

		if ((void *)(uh + 1) > end)
			return -1;
		f->sport = uh->source;
		f->dport = uh->dest;
	} else {
		return -1;
	}
	f->proto = proto;
	return 0;
}

static __always_inline int read_flow(void *data, void *end, struct flow *f)
{
	struct ethhdr *eth = data;
	void *l3 = eth + 1;
	__u16 proto;

	if (l3 > end)
		return -1;
	proto = eth->h_proto;
	if (proto == bpf_htons(ETH_P_8021Q)) {
		struct vlan_hdr *vh = l3;

		if ((void *)(vh + 1) > end)
			return -1;
		proto = vh->h_vlan_encapsulated_proto;
		l3 = vh + 1;
	}
	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = l3;
		__u32 hlen;

		if ((void *)(ip + 1) > end)
			return -1;
		hlen = ip->ihl * 4;
		if (hlen < sizeof(*ip) || ip->frag_off & bpf_htons(IP_MF | IP_OFFSET_MASK))
			return -1;
		__builtin_memcpy(f->saddr, &ip->saddr, 4);
		__builtin_memcpy(f->daddr, &ip->daddr, 4);
		return read_l4(l3 + hlen, end, ip->protocol, f);
	}
	if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = l3;

		if ((void *)(ip6 + 1) > end)
			return -1;
		f->v6 = 1;
		__builtin_memcpy(f->saddr, &ip6->saddr, 16);
		__builtin_memcpy(f->daddr, &ip6->daddr, 16);
		return read_l4(ip6 + 1, end, ip6->nexthdr, f);
	}
	return -1;
}

static __always_inline __u32 tuple_of(const struct flow *f, struct bpf_sock_tuple *t)
{
	if (f->v6) {
		__builtin_memcpy(t->ipv6.saddr, f->saddr, 16);
		__builtin_memcpy(t->ipv6.daddr, f->daddr, 16);
		t->ipv6.sport = f->sport;
		t->ipv6.dport = f->dport;
		return sizeof(t->ipv6);
	}
	__builtin_memcpy(&t->ipv4.saddr, f->saddr, 4);
	__builtin_memcpy(&t->ipv4.daddr, f->daddr, 4);
	t->ipv4.sport = f->sport;
	t->ipv4.dport = f->dport;
	return sizeof(t->ipv4);
}

static __always_inline int exchanged(const struct flow *f, __u64 now)
{
	struct exchange_key k = {};
	__u64 *last;

	__builtin_memcpy(k.addr, f->saddr, 16);
	k.family = f->v6 ? AF_INET6 : AF_INET;
	k.peer_port = f->sport;
	k.local_port = f->dport;
	k.proto = f->proto;
	last = bpf_map_lookup_elem(&exchanges, &k);
	return last && now - *last <= EXCHANGE_TTL_NS;
}

/* 1 when the packet belongs to a flow this host accepted or started. The lookups run in
 * the namespace of the receiving device (BPF_F_CURRENT_NETNS). */
static __always_inline int solicited(struct xdp_md *ctx, const struct pkt *p, __u64 now)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct bpf_sock_tuple t = {};
	struct flow f = {};
	struct bpf_sock *sk;
	__u32 size;
	int ok = 0;

	if (p->syn || read_flow(data, end, &f) < 0)
		return 0;
	size = tuple_of(&f, &t);
	if (f.proto == IPPROTO_TCP) {
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
	return ok || exchanged(&f, now);
}

#endif
