// SPDX-License-Identifier: GPL-2.0
/* Network probe: per-source and per-service counters at ingress (XDP or tc, whichever the
 * loader attached to each link), passive TCP connections and sent resets from
 * tracepoints. Threshold crossings are pushed to the `alerts` ring buffer at once, at
 * most once per window per subject per reason.
 *
 * Volume alone is never an attack: the ingress counters see only UNSOLICITED packets, those
 * outside a flow this host accepted or started. A TCP segment other than a bare SYN that
 * belongs to a socket (established, connecting, request or time-wait) is solicited; so is
 * a UDP datagram to a connected socket, or from a peer (address and port) this host sent
 * to from that local port within EXCHANGE_TTL_NS (the `exchanges` table, written by the
 * tc egress program). SYNs, datagrams to closed ports or from strangers, stray segments
 * and everything else are counted. Bulk transfers on accepted connections, tunnels and
 * UDP exchanges therefore never reach a flood threshold, at any rate.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>
#include "events.h"
#include "net.bpf.h"
#include "flow.bpf.h"

char LICENSE[] SEC("license") = "GPL";

/* Set by the loader before load (window length, own network namespace). */
const volatile struct net_config net_cfg = {};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);	/* Probes.map_entries, set before load */
	__type(key, struct addr_key);
	__type(value, struct source_stats);
} sources SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct service_key);
	__type(value, struct service_stats);
} services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct addr_key);
	__type(value, struct remote_stats);
} remotes SEC(".maps");

/* Resets drawn by handshakes that a SYN proxy verified, per remote: their own windows, so
 * a source challenged in the middle of a window is judged on what came after. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct addr_key);
	__type(value, struct remote_stats);
} verified SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct net_thresholds);
} thresholds SEC(".maps");

/* Packets seen at ingress (handle_xdp, handle_tc_ingress): [0] solicited (not counted),
 * [1] unsolicited (counted). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} verdicts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} alerts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} losses SEC(".maps");

/* Packets by why the parser could not follow them (enum parse_failure). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, PARSE_FAILURES);
	__type(key, __u32);
	__type(value, __u64);
} unparsed SEC(".maps");

/* Adds `by` to slot `index` of a per-CPU u64 array (no atomic needed: the CPU's own). */
static __always_inline void bump_by(void *map, __u32 index, __u64 by)
{
	__u64 *n = bpf_map_lookup_elem(map, &index);

	if (n)
		*n += by;
}

static __always_inline void bump(void *map, __u32 index)
{
	bump_by(map, index, 1);
}

static __always_inline void count_loss(void)
{
	bump(&losses, 0);
}

static __always_inline struct net_thresholds *get_thresholds(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&thresholds, &zero);
}

/* True the first time `reason` is claimed in the window that started at `start` (what the
 * caller's window_entry() saw); atomic so two CPUs crossing the same threshold together
 * raise one alert. The claimed bits carry their window (ALERT_TAG_SHIFT): bits of an
 * earlier window are ignored, so a new window needs no reset of them, and a claim for a
 * window already over (a CPU that saw it just before another CPU started the next) is
 * refused instead of landing in the next window. Each failed compare-and-swap means another
 * claim succeeded, and a window has at most one per reason: the loop cannot run out while
 * a claim is still possible (CLAIM_TRIES leaves room for a window change on the way). */
#define REASON_BITS ((1ULL << ALERT_TAG_SHIFT) - 1)
#define CLAIM_TRIES 16
static __always_inline int claim(__u64 *alerted, __u64 start, __u32 reason)
{
	__u64 bit = 1ULL << reason, tag = start & ~REASON_BITS, old, base;
	__u32 i;

	if (start == WINDOW_RESETTING)
		return 0;	/* counters are being reset: the next packet decides */
	for (i = 0; i < CLAIM_TRIES; i++) {
		old = *(volatile __u64 *)alerted;
		if ((old & ~REASON_BITS) > tag)
			return 0;		/* a later window has begun */
		base = (old & ~REASON_BITS) == tag ? old : tag;
		if (base & bit)
			return 0;
		if (__sync_val_compare_and_swap(alerted, old, base | bit) == old)
			return 1;
	}
	return 0;
}

/* Sets the hashed bit for `h`; returns 1 if it was new. */
static __always_inline int mark_distinct(__u64 *bits, __u32 h)
{
	__u32 idx = (h * 0x9E3779B1u) >> 22;	/* Fibonacci hash to 10 bits */
	__u64 bit = 1ULL << (idx & 63);

	return !(__sync_fetch_and_or(&bits[(idx >> 6) & (DISTINCT_WORDS - 1)], bit) & bit);
}

static __always_inline __u32 hash_addr(const struct addr_key *k)
{
	const __u32 *w = (const __u32 *)k->addr;

	return ((w[0] * 0x85EBCA6Bu ^ w[1]) * 0xC2B2AE35u ^ w[2]) * 0x27D4EB2Fu ^ w[3] ^ k->family;
}

static __always_inline int over(__u64 value, __u64 limit)
{
	return limit && value >= limit;
}

static __always_inline void emit_source(const struct addr_key *k, struct source_stats *s,
					__u64 start, __u32 reason, __u64 now)
{
	struct net_source_event *e;

	if (!claim(&s->alerted, start, reason))
		return;
	e = bpf_ringbuf_reserve(&alerts, sizeof(*e), 0);
	if (!e) {
		count_loss();
		return;
	}
	__builtin_memset(e, 0, sizeof(*e));	/* padding must not leak kernel memory */
	e->hdr.kind = EVENT_NET_SOURCE;
	e->hdr.size = sizeof(*e);
	e->hdr.ts_ns = now;
	__builtin_memcpy(e->addr, k->addr, 16);
	e->family = k->family;
	e->reason = reason;
	e->window_start_ns = start;
	e->packets = s->packets;
	e->bytes = s->bytes;
	e->syns = s->syns;
	e->udp = s->udp;
	e->port_bits = s->ports;
	e->dport = s->dport;
	e->proto = s->proto;
	bpf_ringbuf_submit(e, 0);
}

static __always_inline void emit_service(const struct service_key *k, struct service_stats *s,
					 __u64 start, __u32 reason, __u64 now)
{
	struct net_service_event *e;

	if (!claim(&s->alerted, start, reason))
		return;
	e = bpf_ringbuf_reserve(&alerts, sizeof(*e), 0);
	if (!e) {
		count_loss();
		return;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->hdr.kind = EVENT_NET_SERVICE;
	e->hdr.size = sizeof(*e);
	e->hdr.ts_ns = now;
	e->window_start_ns = start;
	e->packets = s->packets;
	e->syns = s->syns;
	e->udp = s->udp;
	e->source_bits = s->sources;
	e->reason = reason;
	e->dport = k->dport;
	e->proto = k->proto;
	bpf_ringbuf_submit(e, 0);
}

/* Returns the entry for `key` and in *seen the start of its window, starting a new window
 * when the current one is over. Every CPU counts into the same entry at once, so:
 * - An entry is created once (BPF_NOEXIST: of CPUs creating it together one value wins
 *   and all count into it) and never replaced: replacing it (BPF_ANY) would leave the CPUs
 *   holding the old value counting into a freed element, which the LRU map hands to
 *   another key.
 * - A window is over when `now` is more than window_ns past its start. `now` is signed
 *   against the start: a CPU whose clock read precedes another CPU's new start sees a
 *   current window, not one 584 years old.
 * - Of CPUs that see it over, the one whose compare-and-swap of window_start_ns to
 *   WINDOW_RESETTING succeeds zeroes the counters in place, then publishes the new start
 *   (an atomic exchange: ordered after the zeroing). Meanwhile the others count on and
 *   raise no alert (claim() refuses WINDOW_RESETTING); what they add before the zeroing
 *   goes with the old window. The alert bits (word `alerted`) are left alone: they carry
 *   their window (claim()), and zeroing them would let a late claim for the old window
 *   alert twice.
 * `size` is the value's size: every stats struct starts with window_start_ns and is made
 * of u64 words (the _Static_asserts in events.h). */
static __always_inline void *window_entry(void *map, const void *key, void *fresh, __u32 size,
					  __u32 alerted, __u64 now, __u64 *seen)
{
	__u64 *start = bpf_map_lookup_elem(map, key), *word;
	__u32 i;

	if (!start) {
		*(__u64 *)fresh = now;
		bpf_map_update_elem(map, key, fresh, BPF_NOEXIST);
		start = bpf_map_lookup_elem(map, key);
		if (start)
			*seen = *(volatile __u64 *)start;
		return start;
	}
	*seen = *(volatile __u64 *)start;
	if (*seen == WINDOW_RESETTING || (__s64)(now - *seen) <= (__s64)net_cfg.window_ns)
		return start;
	if (__sync_val_compare_and_swap(start, *seen, WINDOW_RESETTING) != *seen) {
		*seen = WINDOW_RESETTING;	/* another CPU starts the next window */
		return start;
	}
	for (i = 1; i < size / 8; i++) {
		if (i == alerted / 8)
			continue;
		word = start + i;
		*(volatile __u64 *)word = 0;
	}
	__sync_lock_test_and_set(start, now);
	*seen = now;
	return start;
}

/* Counts one unsolicited skb to its source; returns 1 when it must be dropped: a UDP
 * GSO/GRO skb (segs > 1: a local sender's UDP_SEGMENT burst at tc, up to 64 datagrams)
 * from a source already over its udp threshold in this window. nftables counts skbs, not
 * datagrams, so such a burst would pass a challenged source's per-source limit
 * (enforce.challenge_rate_limit) 64 datagrams per token; here it stops at the threshold.
 * Plain datagrams, solicited flows and sources under the threshold are never dropped. */
static __always_inline int count_source(const struct pkt *p, struct net_thresholds *t, __u64 now)
{
	struct source_stats fresh = {}, *s;
	__u64 start;

	s = window_entry(&sources, &p->src, &fresh, sizeof(fresh),
			 __builtin_offsetof(struct source_stats, alerted), now, &start);
	if (!s)
		return 0;
	/* A GRO/GSO skb is one flow: each of its segments is a packet, a datagram or a SYN
	 * of that flow, in every counter. */
	__sync_fetch_and_add(&s->packets, p->segs);
	__sync_fetch_and_add(&s->bytes, p->len);
	if (p->syn)
		__sync_fetch_and_add(&s->syns, p->segs);
	if (p->proto == IPPROTO_UDP)
		__sync_fetch_and_add(&s->udp, p->segs);
	if (p->proto && mark_distinct(s->port_bits, p->dport + 1))
		__sync_fetch_and_add(&s->ports, 1);
	s->dport = p->dport;
	s->proto = p->proto;
	if (over(s->syns, t->syns))
		emit_source(&p->src, s, start, REASON_SYNS, now);
	if (over(s->packets, t->packets))
		emit_source(&p->src, s, start, REASON_PACKETS, now);
	if (over(s->udp, t->udp))
		emit_source(&p->src, s, start, REASON_UDP, now);
	if (over(s->ports, t->port_bits))
		emit_source(&p->src, s, start, REASON_PORTS, now);
	return p->proto == IPPROTO_UDP && p->segs > 1 && over(s->udp, t->udp);
}

static __always_inline void count_service(const struct pkt *p, struct net_thresholds *t, __u64 now)
{
	struct service_key k = { .dport = p->dport, .proto = p->proto };
	struct service_stats fresh = {}, *s;
	__u64 start;

	s = window_entry(&services, &k, &fresh, sizeof(fresh),
			 __builtin_offsetof(struct service_stats, alerted), now, &start);
	if (!s)
		return;
	__sync_fetch_and_add(&s->packets, p->segs);
	if (p->syn)
		__sync_fetch_and_add(&s->syns, p->segs);
	if (p->proto == IPPROTO_UDP)
		__sync_fetch_and_add(&s->udp, p->segs);
	if (mark_distinct(s->source_bits, hash_addr(&p->src)))
		__sync_fetch_and_add(&s->sources, 1);
	if (s->sources < t->svc_source_bits)
		return;
	if (over(s->syns, t->svc_syns))
		emit_service(&k, s, start, REASON_SVC_SYNS, now);
	if (over(s->packets, t->svc_packets))
		emit_service(&k, s, start, REASON_SVC_PACKETS, now);
	if (over(s->udp, t->svc_udp))
		emit_service(&k, s, start, REASON_SVC_UDP, now);
}

/* The verdict on one packet parse_packet() read (`parsed`: its return), the same at every
 * hook the loader may attach to (native or generic XDP, tc ingress): counts it unless it
 * is solicited, and returns 1 when it must be dropped (probes.drop_unparsable, or a UDP
 * GSO burst past its source's udp threshold: count_source()), else 0.
 * `ctx` is the hook's own context, for the socket lookups. */
static __always_inline int judge(void *ctx, struct pkt *p, int parsed)
{
	struct net_thresholds *t = get_thresholds();
	__u64 now;
	int drop;

	if (!t || parsed < 0)
		return 0;
	if (parsed > 0) {
		bump(&unparsed, parsed);
		/* What the kernel would still deliver but the parser cannot see into would hide
		 * a flood from every rule: a chain longer than the parser follows, a tiny first
		 * fragment (RFC 1858), a malformed header. Unknown upper layers and deep VLAN
		 * stacks carry no TCP/UDP the kernel would read here: they pass. */
		if (net_cfg.drop_unparsable && (parsed == PARSE_CHAIN_TOO_LONG ||
						parsed == PARSE_TRUNCATED || parsed == PARSE_BAD_HEADER))
			return 1;
		if (!p->src.family)
			return 0;	/* counted by reason; no source to count it to */
		p->proto = 0;	/* what it carries is unknown: no ports, no service */
		p->syn = 0;
	}
	now = bpf_ktime_get_ns();
	if (!parsed && solicited(ctx, p, now)) {
		bump_by(&verdicts, 0, p->segs);
		return 0;
	}
	bump_by(&verdicts, 1, p->segs);
	drop = count_source(p, t, now);
	if (p->proto)
		count_service(p, t, now);
	return drop;	/* else observe only: enforcement is nftables' job */
}

/* Native (driver) or generic XDP: the whole frame is in [data, data_end). */
SEC("xdp")
int handle_xdp(struct xdp_md *ctx)
{
	struct pkt p = {};
	int parsed = parse_packet((void *)(long)ctx->data, (void *)(long)ctx->data_end, &p);

	return judge(ctx, &p, parsed) ? XDP_DROP : XDP_PASS;
}

/* Headers a tc program may pull into the skb's linear part to read them: more than any
 * standard MTU's worth, so what XDP sees whole is seen whole here too. */
#define PULL_MAX_BYTES 4096

/* tc (clsact or tcx) ingress: the same verdicts on the skb. Only the linear part is in
 * [data, data_end): where a header runs past it (a driver that split the headers, a
 * paged skb) the headers are pulled in and parsed again; the packet's length and, for a
 * GRO/GSO skb, its number of segments come from the skb, so a merged burst counts as the
 * packets it was on the wire. Passing returns TC_ACT_UNSPEC (the next filter or tcx
 * program still runs: this one only observes), dropping TC_ACT_SHOT. */
SEC("tc")
int handle_tc_ingress(struct __sk_buff *skb)
{
	int hw_tags = skb->vlan_present ? 1 : 0;
	struct pkt p = {};
	int parsed = parse_frame((void *)(long)skb->data, (void *)(long)skb->data_end, &p, hw_tags);
	__u32 len = skb->len;

	if (parsed == PARSE_TRUNCATED && len > skb->data_end - skb->data) {
		bpf_skb_pull_data(skb, len < PULL_MAX_BYTES ? len : PULL_MAX_BYTES);
		__builtin_memset(&p, 0, sizeof(p));
		parsed = parse_frame((void *)(long)skb->data, (void *)(long)skb->data_end, &p,
				     hw_tags);
	}
	p.len = len;
	p.segs = skb->gso_segs > 1 ? skb->gso_segs : 1;
	return judge(skb, &p, parsed) ? TC_ACT_SHOT : TC_ACT_UNSPEC;
}

/* Records the peers this host sends to (record_exchange), parsed as XDP parses what comes
 * back: a flow wrapped in extension headers, options or VLAN tags is recorded too. Returns
 * TC_ACT_UNSPEC: it only observes, and TC_ACT_OK would end the chain (tcx: TCX_PASS, and
 * the clsact filters behind it are skipped too), hiding the packet from every program
 * after ours (a CNI's, a firewall's). */
SEC("tc")
int handle_tc_egress(struct __sk_buff *skb)
{
	struct pkt p = {};

	if (parse_packet((void *)(long)skb->data, (void *)(long)skb->data_end, &p) == 0)
		record_exchange(&p, bpf_ktime_get_ns());
	return TC_ACT_UNSPEC;
}

/* --- TCP tracepoints ---------------------------------------------------------------
 * Tracepoints fire for every namespace; several agents (and the tests) run side by side
 * in different namespaces, so each object keeps only events of net_cfg.netns_ino. */

#define TCP_SYN_RECV 3
#define IFF_LOOPBACK 0x8

/* tcp_send_reset before Linux 6.10 had separate port/family/address fields; the
 * current layout stores two sockaddrs. CO-RE picks whichever this kernel has. */
struct trace_event_raw_tcp_send_reset___v1 {
	const void *skaddr;
	__u16 sport;
	__u16 family;
	__u8 daddr[4];
	__u8 daddr_v6[16];
} __attribute__((preserve_access_index));

static __always_inline int own_netns(const struct sock *sk, const struct sk_buff *skb)
{
	__u32 ino = 0;

	/* sock_common is shared by full, request and timewait sockets, so skc_net is valid
	 * for all three. A reset for a packet with no socket uses the device's netns. */
	if (sk)
		ino = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
	else if (skb)
		ino = BPF_CORE_READ(skb, dev, nd_net.net, ns.inum);
	return ino && ino == net_cfg.netns_ino;
}

static __always_inline void emit_remote(const struct addr_key *k, struct remote_stats *r,
					__u64 start, __u32 kind, __u32 reason, __u64 count,
					__u16 dport, __u64 now)
{
	struct tcp_remote_event *e;

	if (!claim(&r->alerted, start, reason))
		return;
	e = bpf_ringbuf_reserve(&alerts, sizeof(*e), 0);
	if (!e) {
		count_loss();
		return;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->hdr.kind = kind;
	e->hdr.size = sizeof(*e);
	e->hdr.ts_ns = now;
	__builtin_memcpy(e->addr, k->addr, 16);
	e->family = k->family;
	e->reason = reason;
	e->window_start_ns = start;
	e->count = count;
	e->dport = dport;
	bpf_ringbuf_submit(e, 0);
}

static __always_inline int is_zero_addr(const __u8 *a)
{
	__u64 hi, lo;

	__builtin_memcpy(&hi, a, 8);
	__builtin_memcpy(&lo, a + 8, 8);
	return !hi && !lo;
}

static __always_inline void count_remote(const struct addr_key *k, __u16 dport, int reset)
{
	struct net_thresholds *t = get_thresholds();
	struct remote_stats fresh = {}, *r;
	__u64 now = bpf_ktime_get_ns(), n, start;

	if (!t)
		return;
	r = window_entry(reset == 2 ? (void *)&verified : (void *)&remotes, k, &fresh,
			 sizeof(fresh), __builtin_offsetof(struct remote_stats, alerted), now,
			 &start);
	if (!r)
		return;
	if (reset) {
		n = __sync_add_and_fetch(&r->resets, 1);
		if (over(n, t->resets))
			emit_remote(k, r, start, EVENT_TCP_RESET,
				    reset == 2 ? REASON_VERIFIED_RESETS : REASON_RESETS, n, dport, now);
	} else {
		n = __sync_add_and_fetch(&r->conns, 1);
		if (over(n, t->conns))
			emit_remote(k, r, start, EVENT_TCP_ESTABLISHED, REASON_CONNS, n, dport, now);
	}
}

SEC("tracepoint/sock/inet_sock_set_state")
int handle_inet_sock_set_state(struct trace_event_raw_inet_sock_set_state *ctx)
{
	struct addr_key k = {};

	/* A passive open: the child socket leaves SYN_RECV for ESTABLISHED. */
	if (ctx->protocol != IPPROTO_TCP || ctx->oldstate != TCP_SYN_RECV ||
	    ctx->newstate != TCP_ESTABLISHED)
		return 0;
	if (!own_netns(ctx->skaddr, NULL))
		return 0;
	k.family = ctx->family;
	/* Arrays in a CO-RE-relocated ctx are read with bpf_core_read: a wide load of a
	 * __u8 array is rejected as a mismatched field access. */
	if (k.family == AF_INET)
		bpf_core_read(k.addr, 4, &ctx->daddr);
	else
		bpf_core_read(k.addr, 16, &ctx->daddr_v6);
	count_remote(&k, ctx->sport, 0);	/* sport: the local port, host order */
	return 0;
}

#define NFCT_PTRMASK (~7UL)

/* 1 when the packet's conntrack entry was made from a SYN proxy's template (it carries
 * the NF_CT_EXT_SYNPROXY extension). 0 without conntrack or that extension. */
static __always_inline int synproxy_conn(struct sk_buff *skb)
{
	struct nf_conn *ct;
	struct nf_ct_ext *ext;
	__u32 id;
	__u8 off = 0;

	if (!bpf_core_field_exists(skb->_nfct) ||
	    !bpf_core_enum_value_exists(enum nf_ct_ext_id, NF_CT_EXT_SYNPROXY))
		return 0;
	ct = (struct nf_conn *)(BPF_CORE_READ(skb, _nfct) & NFCT_PTRMASK);
	if (!ct)
		return 0;
	ext = BPF_CORE_READ(ct, ext);
	if (!ext)
		return 0;
	id = bpf_core_enum_value(enum nf_ct_ext_id, NF_CT_EXT_SYNPROXY);
	if (id >= 32)
		return 0;
	bpf_probe_read_kernel(&off, 1, (__u8 *)ext + bpf_core_field_offset(struct nf_ct_ext, offset) + id);
	return off != 0;
}

/* 1 when the reset answers a SYN that a SYN proxy sent on behalf of a client whose cookie
 * it checked: such SYNs reach the stack through the loopback device with the client's
 * address, which an off-path sender cannot do. Kernels whose tracepoint lacks the skb
 * (before 6.10) give 0: a connect scan is then challenged, never blocked. */
static __always_inline int from_syn_proxy(struct trace_event_raw_tcp_send_reset *ctx)
{
	struct sk_buff *skb;
	unsigned int flags;

	if (!bpf_core_field_exists(ctx->skbaddr) || ctx->skaddr)
		return 0;
	skb = (struct sk_buff *)ctx->skbaddr;
	if (!skb)
		return 0;
	flags = BPF_CORE_READ(skb, dev, flags);
	if (!(flags & IFF_LOOPBACK))
		return 0;
	/* The loopback device alone proves nothing: any local user may bind a socket to any
	 * IPv6 address (IPV6_FREEBIND needs no privilege) and send SYNs from it through lo.
	 * The proxy's SYN carries the proxy's conntrack template, so its connection has the
	 * SYNPROXY extension; a socket's own SYN never does. */
	return synproxy_conn(skb);
}

SEC("tracepoint/tcp/tcp_send_reset")
int handle_tcp_send_reset(struct trace_event_raw_tcp_send_reset *ctx)
{
	struct trace_event_raw_tcp_send_reset___v1 *old = (void *)ctx;
	struct addr_key k = {};
	__u16 dport;

	if (!own_netns(ctx->skaddr, ctx->skbaddr))
		return 0;
	if (bpf_core_field_exists(old->family)) {
		k.family = old->family;
		dport = old->sport;
		if (k.family == AF_INET)
			bpf_core_read(k.addr, 4, &old->daddr);
		else
			bpf_core_read(k.addr, 16, &old->daddr_v6);
	} else {
		/* daddr is the reset's destination, the remote; sockaddr ports are network order */
		__u8 sa[24];
		__u16 sport;

		bpf_core_read(sa, sizeof(sa), &ctx->daddr);
		bpf_core_read(&sport, sizeof(sport), &ctx->saddr[2]);
		k.family = *(__u16 *)sa;
		dport = bpf_ntohs(sport);
		if (k.family == AF_INET)
			__builtin_memcpy(k.addr, sa + 4, 4);
		else
			__builtin_memcpy(k.addr, sa + 8, 16);
	}
	if (k.family != AF_INET && k.family != AF_INET6)
		return 0;
	/* A reset sent on behalf of a listening socket (e.g. to a stray ACK) is recorded
	 * with the listener's own addresses, and a dual-stack listener has no peer: the
	 * "remote" is :: then. Counting it would blame the unspecified address. */
	if (is_zero_addr(k.addr))
		return 0;
	count_remote(&k, dport, 1);
	if (from_syn_proxy(ctx))
		count_remote(&k, dport, 2);
	return 0;
}
