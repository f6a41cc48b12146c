// SPDX-License-Identifier: GPL-2.0
/* Test-only object for test_probe_verdicts.py: one program that loads, one the verifier
 * rejects (a map value used without the NULL check), one whose tracepoint no kernel has,
 * and one that calls a helper tracepoint programs do not have (what an older kernel
 * lacking a helper looks like). */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} losses SEC(".maps");

/* A hash map: a lookup in an array at a constant key in bounds is never NULL to the
 * verifier of recent kernels, which would accept handle_broken. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} counts SEC(".maps");

SEC("tracepoint/syscalls/sys_enter_getppid")
int handle_good(void *ctx)
{
	__u32 zero = 0;
	__u64 *n = bpf_map_lookup_elem(&losses, &zero);

	if (n)
		__sync_fetch_and_add(n, 1);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_getppid")
int handle_broken(void *ctx)
{
	__u32 zero = 0;
	__u64 *n = bpf_map_lookup_elem(&counts, &zero);

	*n += 1;	/* no NULL check: R0 invalid mem access 'map_value_or_null' */
	return 0;
}

SEC("tracepoint/swarm_no_such_category/swarm_no_such_event")
int handle_missing(void *ctx)
{
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_getppid")
int handle_lacking(void *ctx)
{
	/* bpf_get_socket_cookie: not a tracepoint program's helper ("cannot use helper") */
	return bpf_get_socket_cookie(ctx) == 1;
}
