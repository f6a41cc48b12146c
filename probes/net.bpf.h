/* Packet parsing for the XDP program: Ethernet (one optional VLAN tag), IPv4 and IPv6
 * (no extension headers), TCP and UDP. Kernel-only. */
#ifndef SWARM_NET_BPF_H
#define SWARM_NET_BPF_H

#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define ETH_P_8021Q 0x8100
#define AF_INET 2
#define AF_INET6 10
#define IP_OFFSET_MASK 0x1FFF

struct pkt {
	struct addr_key src;
	__u64 len;
	__u16 dport;	/* host order; 0 when not TCP/UDP */
	__u8 proto;	/* IPPROTO_TCP, IPPROTO_UDP, or 0 for anything else */
	__u8 syn;	/* SYN without ACK */
};

/* Every pointer is checked against data_end right before use: the verifier tracks
 * packet bounds per pointer, not per offset. */
static __always_inline int parse_l4(void *l4, void *end, __u8 proto, struct pkt *p)
{
	if (proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;

		if ((void *)(th + 1) > end)
			return 0;
		p->proto = IPPROTO_TCP;
		p->dport = bpf_ntohs(th->dest);
		p->syn = th->syn && !th->ack;
	} else if (proto == IPPROTO_UDP) {
		struct udphdr *uh = l4;

		if ((void *)(uh + 1) > end)
			return 0;
		p->proto = IPPROTO_UDP;
		p->dport = bpf_ntohs(uh->dest);
	}
	return 0;
}

static __always_inline int parse_ipv4(void *l3, void *end, struct pkt *p)
{
	struct iphdr *ip = l3;
	__u32 hlen;

	if ((void *)(ip + 1) > end)
		return -1;
	hlen = ip->ihl * 4;
	if (hlen < sizeof(*ip))
		return -1;
	p->src.family = AF_INET;
	__builtin_memcpy(p->src.addr, &ip->saddr, 4);
	/* A non-first fragment carries no L4 header: count the packet, not its "ports". */
	if (ip->frag_off & bpf_htons(IP_OFFSET_MASK))
		return 0;
	return parse_l4(l3 + hlen, end, ip->protocol, p);
}

static __always_inline int parse_ipv6(void *l3, void *end, struct pkt *p)
{
	struct ipv6hdr *ip6 = l3;

	if ((void *)(ip6 + 1) > end)
		return -1;
	p->src.family = AF_INET6;
	__builtin_memcpy(p->src.addr, &ip6->saddr, 16);
	return parse_l4(ip6 + 1, end, ip6->nexthdr, p);
}

static __always_inline int parse_packet(struct xdp_md *ctx, struct pkt *p)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
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
	p->len = end - data;
	if (proto == bpf_htons(ETH_P_IP))
		return parse_ipv4(l3, end, p);
	if (proto == bpf_htons(ETH_P_IPV6))
		return parse_ipv6(l3, end, p);
	return -1;
}

#endif
