/* Packet parsing for the XDP and tc programs, the one parser of the probe: Ethernet with up
 * to two VLAN tags (802.1Q, 802.1ad), IPv4 with options and fragments, IPv6 with its
 * extension-header chain (hop-by-hop, routing, fragment, destination options, AH), TCP and
 * UDP. The counters and the socket lookups (flow.bpf.h) read the same struct pkt, so a
 * packet the counters see into is one the lookups see into. Kernel-only.
 *
 * A packet is judged by what it carries, not by how it is wrapped: a SYN behind a chain
 * of extension headers is a SYN. What the parser cannot follow is never passed silently:
 * parse_packet says why (enum parse_failure), and the caller counts that and still counts
 * the packet to its source when the source address was read. */
#ifndef SWARM_NET_BPF_H
#define SWARM_NET_BPF_H

#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define ETH_P_8021Q 0x8100
#define ETH_P_8021AD 0x88A8
#define AF_INET 2
#define AF_INET6 10
#define IP_OFFSET_MASK 0x1FFF
#define IP6_OFFSET_MASK 0xFFF8	/* fragment offset bits of the fragment header's frag_off */
#define MAX_VLAN_TAGS 2
#define MAX_EXT_HEADERS 8	/* extension headers followed before PARSE_CHAIN_TOO_LONG */

/* IPv6 next-header values (IANA). */
#define NEXTHDR_HOP 0
#define NEXTHDR_ROUTING 43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_AUTH 51
#define NEXTHDR_DEST 60

struct pkt {
	struct addr_key src;
	__u8 dst[16];	/* destination address, family as src */
	__u64 len;	/* bytes: the frame's, or at tc the skb's (all its segments) */
	__u32 segs;	/* wire packets it stands for: 1, or a GRO/GSO skb's segments at tc */
	__u16 sport;	/* host order; 0 when not TCP/UDP */
	__u16 dport;	/* host order; 0 when not TCP/UDP */
	__u8 proto;	/* IPPROTO_TCP, IPPROTO_UDP, or 0 for anything else */
	__u8 syn;	/* SYN without ACK */
	__u8 tcp_flags;	/* the TCP header's flags byte (CWR..FIN); 0 when not TCP */
};

#define TCPF_SYN 0x02
#define TCPF_RST 0x04
#define TCPF_ACK 0x10

/* The first four bytes every extension header (and AH) starts with; frag_off is only
 * meaningful in a fragment header. */
struct ext_hdr {
	__u8 nexthdr;
	__u8 hdrlen;
	__be16 frag_off;
};

/* Every pointer is checked against data_end right before use: the verifier tracks
 * packet bounds per pointer, not per offset. */
static __always_inline int parse_l4(void *l4, void *end, __u8 proto, struct pkt *p)
{
	struct udphdr *uh = l4;	/* a TCP header starts with the same two ports */
	struct tcphdr *th = l4;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return 0;
	if ((void *)(uh + 1) > end)
		return PARSE_TRUNCATED;
	if (proto == IPPROTO_TCP) {
		if ((void *)(th + 1) > end)
			return PARSE_TRUNCATED;
		p->tcp_flags = ((__u8 *)th)[13];
		p->syn = (p->tcp_flags & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN;
	}
	p->proto = proto;
	p->sport = bpf_ntohs(uh->source);
	p->dport = bpf_ntohs(uh->dest);
	return 0;
}

/* Protocols that end an IPv6 chain: what follows is not an extension header. Anything
 * else that is not an extension header we follow is PARSE_UNKNOWN_HEADER (Mobility, HIP,
 * Shim6, experimental values: the stack may follow them, we cannot). */
static __always_inline int upper_layer(__u8 nh)
{
	switch (nh) {
	case 4:		/* IPv4 in IPv6 */
	case IPPROTO_TCP:
	case IPPROTO_UDP:
	case 41:	/* IPv6 in IPv6 */
	case 47:	/* GRE */
	case 50:	/* ESP: the rest is encrypted */
	case 58:	/* ICMPv6 */
	case 59:	/* no next header */
	case 103:	/* PIM */
	case 112:	/* VRRP */
	case 115:	/* L2TP */
	case 132:	/* SCTP */
	case 136:	/* UDP-Lite */
	case 137:	/* MPLS in IP */
	case 143:	/* Ethernet */
		return 1;
	}
	return 0;
}

/* Follows the headers from `cur` (first one `nh`) to the upper layer. IPv6 follows its
 * extension headers; IPv4 only AH (the one "extension" it has). A non-first fragment
 * stops the walk: it carries no L4 header, so it counts to its source without ports. */
static __always_inline int parse_chain(void *cur, void *end, __u8 nh, int v6, struct pkt *p)
{
	struct ext_hdr *h;
	__u32 len;
	int i;

	for (i = 0; i < MAX_EXT_HEADERS; i++) {
		if (nh == NEXTHDR_AUTH) {
			h = cur;
			if ((void *)(h + 1) > end)
				return PARSE_TRUNCATED;
			len = ((__u32)h->hdrlen + 2) * 4;	/* AH counts 4-byte words, less 2 */
		} else if (!v6) {
			return parse_l4(cur, end, nh, p);
		} else if (nh == NEXTHDR_HOP || nh == NEXTHDR_ROUTING || nh == NEXTHDR_DEST) {
			h = cur;
			if ((void *)(h + 1) > end)
				return PARSE_TRUNCATED;
			len = ((__u32)h->hdrlen + 1) * 8;	/* 8-byte units, less the first */
		} else if (nh == NEXTHDR_FRAGMENT) {
			h = cur;
			if ((void *)(h + 1) > end)
				return PARSE_TRUNCATED;
			if (h->frag_off & bpf_htons(IP6_OFFSET_MASK))
				return 0;
			len = 8;
		} else if (upper_layer(nh)) {
			return parse_l4(cur, end, nh, p);
		} else {
			return PARSE_UNKNOWN_HEADER;
		}
		nh = h->nexthdr;
		cur += len;
	}
	if (nh == NEXTHDR_AUTH || (v6 && !upper_layer(nh)))
		return PARSE_CHAIN_TOO_LONG;
	return parse_l4(cur, end, nh, p);
}

static __always_inline int parse_ipv4(void *l3, void *end, struct pkt *p)
{
	struct iphdr *ip = l3;
	__u32 hlen;

	if ((void *)(ip + 1) > end)
		return PARSE_TRUNCATED;
	if (ip->version != 4)
		return PARSE_BAD_HEADER;
	p->src.family = AF_INET;
	__builtin_memcpy(p->src.addr, &ip->saddr, 4);
	__builtin_memcpy(p->dst, &ip->daddr, 4);
	hlen = ip->ihl * 4;	/* options included */
	if (hlen < sizeof(*ip))
		return PARSE_BAD_HEADER;
	if (l3 + hlen > end)
		return PARSE_TRUNCATED;
	/* A non-first fragment carries no L4 header: count the packet, not its "ports". */
	if (ip->frag_off & bpf_htons(IP_OFFSET_MASK))
		return 0;
	return parse_chain(l3 + hlen, end, ip->protocol, 0, p);
}

static __always_inline int parse_ipv6(void *l3, void *end, struct pkt *p)
{
	struct ipv6hdr *ip6 = l3;

	if ((void *)(ip6 + 1) > end)
		return PARSE_TRUNCATED;
	if (ip6->version != 6)
		return PARSE_BAD_HEADER;
	p->src.family = AF_INET6;
	__builtin_memcpy(p->src.addr, &ip6->saddr, 16);
	__builtin_memcpy(p->dst, &ip6->daddr, 16);
	return parse_chain(ip6 + 1, end, ip6->nexthdr, 1, p);
}

/* Parses the frame [data, end): an xdp_md's or a __sk_buff's packet pointers (in tc only
 * the linear part, where the stack puts every header it builds), `hw_tags` VLAN tags
 * already taken out of it into the skb (tc: the stack moves the outer tag there before
 * tc ingress runs, so a frame with one tag too many is the same PARSE_VLAN_DEPTH at
 * every hook). Returns -1 for a frame
 * that is not IP (nothing to count), 0 for a parsed packet, or the enum parse_failure it
 * stopped at; p->src.family is non-zero when the source address was read all the same.
 * p->proto is non-zero only when the TCP or UDP header was read: the socket lookups rely
 * on that (a non-first fragment, or a packet that failed to parse, is no flow's).
 *
 * VLAN tags: a tag still in the frame is skipped here. With generic XDP, native XDP on a
 * veth and tc, a tag the sender or NIC put in the skb's hwaccel field (a vlan device on
 * a veth, VLAN rx offload) is not in the frame at all: the program sees the untagged
 * packet, which parses the same way. */
static __always_inline int parse_frame(void *data, void *end, struct pkt *p, int hw_tags)
{
	struct ethhdr *eth = data;
	void *l3 = eth + 1;
	__u16 proto;
	int i;

	if (l3 > end)
		return -1;
	p->len = end - data;
	p->segs = 1;
	proto = eth->h_proto;
	for (i = 0; i < MAX_VLAN_TAGS; i++) {
		struct vlan_hdr *vh = l3;

		if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
			break;
		if (i + hw_tags >= MAX_VLAN_TAGS)
			return PARSE_VLAN_DEPTH;
		if ((void *)(vh + 1) > end)
			return PARSE_TRUNCATED;
		proto = vh->h_vlan_encapsulated_proto;
		l3 = vh + 1;
	}
	if (proto == bpf_htons(ETH_P_IP))
		return parse_ipv4(l3, end, p);
	if (proto == bpf_htons(ETH_P_IPV6))
		return parse_ipv6(l3, end, p);
	if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD))
		return PARSE_VLAN_DEPTH;
	return -1;
}

/* XDP: every tag the program can know of is in the frame. */
static __always_inline int parse_packet(void *data, void *end, struct pkt *p)
{
	return parse_frame(data, end, p, 0);
}

#endif
