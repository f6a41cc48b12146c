// SPDX-License-Identifier: GPL-2.0
/* Activity probe: what the anomaly models learn a machine's normal from
 * (agent/sources/activity.py, CONTRACT11 "Events").
 *
 * - Outbound TCP connections (sock:inet_sock_set_state): at SYN_SENT, in the connecting
 *   task's context, who connects (cgroup, pid, uid, executable) is recorded in the LRU
 *   map `flows` keyed by the socket; the outcome (ESTABLISHED, or CLOSE: refused when
 *   the kernel set sk_err to ECONNREFUSED, i.e. a RST answered the SYN, else failed) and
 *   the end of an established one (CLOSE, with tcp_sock's byte counters) are reported
 *   from that record, whatever context they happen in (softirq, a timer). A socket
 *   entering LISTEN, in the listening task's context, is reported too.
 * - Bytes sent (sock:sock_send_length, kernels >= 6.3) per (cgroup, destination, port,
 *   protocol) in the per-CPU LRU map `flow_bytes`, read by user space every poll.
 * - Execs (sched:sched_process_exec): a per-cgroup counter (map `cgroups`) and the first
 *   exec of each file (dev, ino) in each cgroup (LRU map `seen`) as an event.
 *
 * Bounded: ring buffer size, LRU map sizes, and per cgroup and window at most
 * activity_config.flow_cap connections, listen_cap listeners and exec_new_cap exec_new
 * events (the excess is counted in `cgroups`, a failed reserve in `losses`): one
 * workload's connect or exec storm fills neither the ring buffer nor the agent's queue
 * for the others, and caps of their own keep one kind of storm from hiding another.
 * Only the processes this agent owns (owned(): README, "Running it"), never its own.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "events.h"

char LICENSE[] SEC("license") = "GPL";

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define ECONNREFUSED 111
#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT 2
#define TCP_CLOSE 7
#define TCP_LISTEN 10

const volatile struct activity_config act_cfg = {};

#include "activity.maps.bpf.h"

#define IDENT_NO_ANCESTRY
#include "ident.bpf.h"

static __always_inline void count_loss(void)
{
	__u32 zero = 0;
	__u64 *n = bpf_map_lookup_elem(&losses, &zero);

	if (n)
		*n += 1;	/* per-CPU slot: no atomic needed */
}

/* Whether the current task is this agent's to report, and not the agent itself (the
 * same rule as proc.bpf.h owned()). */
static __always_inline int owned(void)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	__u32 ino;

	if (act_cfg.agent_tgid && (bpf_get_current_pid_tgid() >> 32) == act_cfg.agent_tgid)
		return 0;
	ino = BPF_CORE_READ(task, nsproxy, net_ns, ns.inum);
	if (ino && ino == act_cfg.netns_ino)
		return 1;
	return act_cfg.host_scope && !bpf_map_lookup_elem(&foreign_netns, &ino);
}

static __always_inline void *reserve(__u32 size, __u32 kind)
{
	struct event_header *h = bpf_ringbuf_reserve(&events, size, 0);
	__u32 zero = 0;
	void *z;

	if (!h) {
		count_loss();
		return NULL;
	}
	z = bpf_map_lookup_elem(&zeroes, &zero);
	if (!z || size > ZERO_LEN || bpf_probe_read_kernel(h, size, z)) {
		bpf_ringbuf_discard(h, 0);
		count_loss();
		return NULL;
	}
	h->kind = kind;
	h->size = size;
	h->ts_ns = bpf_ktime_get_ns();
	return h;
}

/* The cgroup's counters, created on first use (NULL only when the map refuses). */
static __always_inline struct cgroup_activity *cgroup_of(__u64 id)
{
	struct cgroup_activity zero = {}, *c = bpf_map_lookup_elem(&cgroups, &id);

	if (c)
		return c;
	bpf_map_update_elem(&cgroups, &id, &zero, BPF_NOEXIST);
	return bpf_map_lookup_elem(&cgroups, &id);
}

/* Whether one more event of this cgroup fits its window's cap `which` (enum
 * activity_cap, a constant at every call); counts it, or counts the drop. Two CPUs may
 * both start a new window: the cap is then off by a few, never unbounded. */
static __always_inline int within_cap(struct cgroup_activity *c, int which, __u64 now)
{
	__u32 cap = which == CAP_FLOWS ? act_cfg.flow_cap :
		    which == CAP_EXEC_NEW ? act_cfg.exec_new_cap : act_cfg.listen_cap;

	if (!cap)
		return 1;
	if (now - c->window_start_ns >= act_cfg.window_ns) {
		c->window_start_ns = now;
		c->in_window[CAP_FLOWS] = 0;
		c->in_window[CAP_EXEC_NEW] = 0;
		c->in_window[CAP_LISTENS] = 0;
	}
	if (__sync_fetch_and_add(&c->in_window[which], 1) < cap)
		return 1;
	__sync_fetch_and_add(&c->dropped[which], 1);
	return 0;
}

static __always_inline void fill_act(struct act_proc *p, struct task_struct *task, __u64 cgid)
{
	p->cgroup_id = cgid;
	p->pid = bpf_get_current_pid_tgid() >> 32;
	p->uid = BPF_CORE_READ(task, cred, uid.val);
	exe_id(task, &p->exe);
	bpf_get_current_comm(p->comm, sizeof(p->comm));
}

/* --- TCP connections and listeners ------------------------------------------------------ */

static __always_inline void addresses(struct trace_event_raw_inet_sock_set_state *ctx,
				      struct flow_event *e)
{
	e->family = ctx->family;
	e->sport = ctx->sport;		/* host order in this tracepoint */
	e->dport = ctx->dport;
	/* ctx arrays are read with bpf_core_read (a wide load of a __u8 array in a CO-RE
	 * relocated ctx is rejected) */
	if (ctx->family == AF_INET) {
		bpf_core_read(e->saddr, 4, &ctx->saddr);
		bpf_core_read(e->daddr, 4, &ctx->daddr);
	} else {
		bpf_core_read(e->saddr, 16, &ctx->saddr_v6);
		bpf_core_read(e->daddr, 16, &ctx->daddr_v6);
	}
}

static __always_inline int report_flow(struct trace_event_raw_inet_sock_set_state *ctx,
				       struct flow_rec *r, __u32 kind, __u16 outcome,
				       const struct sock *sk)
{
	struct flow_event *e = reserve(sizeof(*e), kind);

	if (!e)
		return 0;
	e->proc = r->proc;
	e->start_ns = r->start_ns;
	e->established_ns = r->established_ns;
	addresses(ctx, e);
	e->outcome = outcome;
	e->err = BPF_CORE_READ(sk, sk_err);
	if (outcome == FLOW_CLOSED) {
		struct tcp_sock *tp = (struct tcp_sock *)sk;

		e->bytes_acked = BPF_CORE_READ(tp, bytes_acked);
		e->bytes_received = BPF_CORE_READ(tp, bytes_received);
	}
	bpf_ringbuf_submit(e, 0);
	return 0;
}

static __always_inline int on_syn_sent(__u64 key)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	__u64 cgid = bpf_get_current_cgroup_id(), now = bpf_ktime_get_ns();
	struct cgroup_activity *c;
	struct flow_rec r = {};

	if (!owned())
		return 0;
	c = cgroup_of(cgid);
	if (c) {
		__sync_fetch_and_add(&c->connects, 1);
		if (!within_cap(c, CAP_FLOWS, now))
			return 0;
	}
	fill_act(&r.proc, task, cgid);
	r.start_ns = now;
	bpf_map_update_elem(&flows, &key, &r, BPF_ANY);
	return 0;
}

static __always_inline int listen_exit_attached(void)
{
	__u32 zero = 0, *on = bpf_map_lookup_elem(&listen_exit_on, &zero);

	return on && *on;
}

static __always_inline int on_listen(struct trace_event_raw_inet_sock_set_state *ctx)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	__u64 cgid = bpf_get_current_cgroup_id(), now = bpf_ktime_get_ns();
	struct cgroup_activity *c;
	struct flow_rec r = {};

	if (!owned())
		return 0;
	c = cgroup_of(cgid);
	if (c) {
		__sync_fetch_and_add(&c->listens, 1);
		if (!within_cap(c, CAP_LISTENS, now))
			return 0;
	}
	fill_act(&r.proc, task, cgid);
	r.start_ns = now;
	if (!ctx->sport && listen_exit_attached()) {
		struct pending_listen p = {.r = r, .sk = (__u64)(unsigned long)ctx->skaddr};
		__u64 tid = bpf_get_current_pid_tgid();

		bpf_map_update_elem(&pending_listen, &tid, &p, BPF_ANY);
		return 0;
	}
	return report_flow(ctx, &r, EVENT_FLOW_LISTEN, FLOW_LISTENING, ctx->skaddr);
}

SEC("tracepoint/sock/inet_sock_set_state")
int handle_activity_sock_state(struct trace_event_raw_inet_sock_set_state *ctx)
{
	const struct sock *sk = ctx->skaddr;
	__u64 key = (__u64)(unsigned long)sk;
	struct flow_rec *r;

	if (ctx->protocol != IPPROTO_TCP)
		return 0;
	if (ctx->newstate == TCP_SYN_SENT)
		return on_syn_sent(key);
	if (ctx->newstate == TCP_LISTEN)
		return on_listen(ctx);
	if (ctx->newstate != TCP_ESTABLISHED && ctx->newstate != TCP_CLOSE)
		return 0;
	r = bpf_map_lookup_elem(&flows, &key);
	if (!r)
		return 0;	/* not an outbound connection of ours (or over the cap) */
	if (ctx->oldstate == TCP_SYN_SENT && ctx->newstate == TCP_ESTABLISHED) {
		r->established_ns = bpf_ktime_get_ns();
		return report_flow(ctx, r, EVENT_FLOW_CONNECT, FLOW_ESTABLISHED, sk);
	}
	if (ctx->newstate != TCP_CLOSE)
		return 0;
	if (ctx->oldstate == TCP_SYN_SENT)
		/* tcp_reset() stores ECONNREFUSED in sk_err before tcp_done() sets CLOSE */
		report_flow(ctx, r, EVENT_FLOW_CONNECT,
			    BPF_CORE_READ(sk, sk_err) == ECONNREFUSED ? FLOW_REFUSED : FLOW_FAILED, sk);
	else if (r->established_ns)
		report_flow(ctx, r, EVENT_FLOW_CLOSE, FLOW_CLOSED, sk);
	bpf_map_delete_elem(&flows, &key);
	return 0;
}

/* The listener whose port the kernel picked during listen(): reported now, with it. (An
 * io_uring listen has no syscall exit: its entry waits for the thread's next listen()
 * or the LRU.) */
SEC("tracepoint/syscalls/sys_exit_listen")
int handle_activity_listen_exit(struct trace_event_raw_sys_exit *ctx)
{
	__u64 tid = bpf_get_current_pid_tgid();
	struct pending_listen *p = bpf_map_lookup_elem(&pending_listen, &tid);
	const struct sock *sk;
	struct flow_event *e;

	if (!p)
		return 0;
	if (ctx->ret != 0)
		goto done;
	sk = (const struct sock *)(unsigned long)p->sk;
	e = reserve(sizeof(*e), EVENT_FLOW_LISTEN);
	if (!e)
		goto done;
	e->proc = p->r.proc;
	e->start_ns = p->r.start_ns;
	e->family = BPF_CORE_READ(sk, __sk_common.skc_family);
	e->sport = bpf_ntohs(BPF_CORE_READ((struct inet_sock *)sk, inet_sport));
	if (e->family == AF_INET)
		bpf_core_read(e->saddr, 4, &sk->__sk_common.skc_rcv_saddr);
	else
		bpf_core_read(e->saddr, 16, &sk->__sk_common.skc_v6_rcv_saddr);
	e->outcome = FLOW_LISTENING;
	bpf_ringbuf_submit(e, 0);
done:
	bpf_map_delete_elem(&pending_listen, &tid);
	return 0;
}

/* --- bytes sent --------------------------------------------------------------------------- */

SEC("tracepoint/sock/sock_send_length")
int handle_activity_send(struct trace_event_raw_sock_msg_length *ctx)
{
	struct flow_bytes_key k = {};
	struct flow_bytes one = {}, *v;
	const struct sock *sk;

	/* every send of the host passes here (unix sockets most): the cheap tests first */
	if (ctx->ret <= 0 || (ctx->family != AF_INET && ctx->family != AF_INET6) ||
	    (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP))
		return 0;
	if (!owned())
		return 0;
	sk = ctx->sk;
	k.cgroup_id = bpf_get_current_cgroup_id();
	k.family = ctx->family;
	k.proto = ctx->protocol;
	k.dport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	/* sizes spelled out: BPF_CORE_READ_INTO would copy sizeof(*k.daddr), one byte */
	if (ctx->family == AF_INET)
		bpf_core_read(k.daddr, 4, &sk->__sk_common.skc_daddr);
	else
		bpf_core_read(k.daddr, 16, &sk->__sk_common.skc_v6_daddr);
	v = bpf_map_lookup_elem(&flow_bytes, &k);
	if (v) {
		v->bytes += ctx->ret;	/* this CPU's value: no atomic needed */
		v->sends += 1;
		return 0;
	}
	one.bytes = ctx->ret;
	one.sends = 1;
	bpf_map_update_elem(&flow_bytes, &k, &one, BPF_ANY);
	return 0;
}

/* --- execs ---------------------------------------------------------------------------------- */

SEC("tracepoint/sched/sched_process_exec")
int handle_activity_exec(void *ctx)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	__u64 cgid = bpf_get_current_cgroup_id(), now = bpf_ktime_get_ns();
	struct cgroup_activity *c;
	struct exec_new_event *e;
	struct seen_key k = {};
	struct file *exe;
	__u8 one = 1, *buf;
	__u32 zero = 0;

	if (!owned())
		return 0;
	c = cgroup_of(cgid);
	if (c)
		__sync_fetch_and_add(&c->execs, 1);
	k.cgroup_id = cgid;
	exe_id(task, &k.exe);
	/* a lookup first: an LRU update takes a free node even when the key exists */
	if (bpf_map_lookup_elem(&seen, &k))
		return 0;
	/* NOEXIST: of two CPUs exec'ing the same new file at once, one reports it */
	if (bpf_map_update_elem(&seen, &k, &one, BPF_NOEXIST))
		return 0;
	if (c && !within_cap(c, CAP_EXEC_NEW, now)) {
		bpf_map_delete_elem(&seen, &k);	/* not reported: still new next time */
		return 0;
	}
	e = reserve(sizeof(*e), EVENT_EXEC_NEW);
	if (!e) {
		bpf_map_delete_elem(&seen, &k);
		return 0;
	}
	fill_act(&e->proc, task, cgid);
	exe = BPF_CORE_READ(task, mm, exe_file);
	buf = bpf_map_lookup_elem(&scratch, &zero);
	if (exe && buf) {
		e->exe_path_len = walk_path(BPF_CORE_READ(exe, f_path.dentry),
					    BPF_CORE_READ(exe, f_path.mnt), buf, &e->exe_path_flags);
		copy_walked(e->exe_path, buf, e->exe_path_len);
	}
	bpf_ringbuf_submit(e, 0);
	return 0;
}

/* Forgets another agent the moment its last thread exits (as proc.bpf.c does). */
SEC("tracepoint/sched/sched_process_exit")
int handle_activity_agent_exit(void *ctx)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u32 *ino = bpf_map_lookup_elem(&foreign_agents, &tgid);
	__u32 netns;

	if (!ino || BPF_CORE_READ(task, signal, live.counter) != 0)
		return 0;
	netns = *ino;
	bpf_map_delete_elem(&foreign_netns, &netns);
	bpf_map_delete_elem(&foreign_agents, &tgid);
	return 0;
}
