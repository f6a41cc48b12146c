// SPDX-License-Identifier: GPL-2.0
/* Test helper for test_net_wrappings.py: on a veth's egress, put VLAN tags where a vlan
 * device or a NIC with VLAN offload puts them, in the skb's hwaccel field (a second push
 * moves the first tag into the frame). Built by the test, attached with tc. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "GPL";

SEC("tc/vlan")
int push_vlan(struct __sk_buff *skb)
{
	bpf_skb_vlan_push(skb, bpf_htons(0x8100), 10);
	return 0;	/* TC_ACT_OK */
}

SEC("tc/qinq")
int push_qinq(struct __sk_buff *skb)
{
	bpf_skb_vlan_push(skb, bpf_htons(0x8100), 10);
	bpf_skb_vlan_push(skb, bpf_htons(0x88A8), 100);
	return 0;
}
