"""The egress policy's uplink hook (agent/enforce/uplink.py), as data: which rules it
carries, the host's own addresses exempt per family, nothing without devices."""
from __future__ import annotations

import ipaddress

from agent.config import Config
from agent.enforce import egress, uplink
from agent.policyconfig import METADATA, EgressRule, Policy

OWN = [ipaddress.ip_address(a) for a in ("10.0.0.5", "192.0.2.7", "2001:db8::5")]


MACS = [("eth0", "52:54:00:00:00:01"), ("eth1", "52:54:00:00:00:02")]
ETHER = "ether saddr != { 52:54:00:00:00:01, 52:54:00:00:00:02 }"


def test_rules_for_workloads_in_their_own_namespaces_only():
    mining = EgressRule(name="mining", cgroups=("/user.slice",), ports=(3333,), proto="tcp")
    pods = EgressRule(name="pods", interfaces=("cali*",), ports=(3333,), proto="tcp")
    eg = egress.desired(Config(policy=Policy(egress=(METADATA, mining, pods))),
                        devices=MACS, own=OWN)
    lines = [line.split(" counter")[0] for line in eg.uplink.lines]
    assert eg.uplink.devices == ("eth0", "eth1")
    # metadata: per family it names, foreign by MAC (a macvlan container, even with the
    # host's address) or by source address (an ipvlan one shares the link's MAC)
    assert lines[:4] == [
        f"{ETHER} ip daddr {{ 169.254.169.254/32 }}",
        "ip saddr != { 10.0.0.5, 192.0.2.7 } ip daddr { 169.254.169.254/32 }",
        f"{ETHER} ip6 daddr {{ fd00:ec2::254/128 }}",
        "ip6 saddr != { 2001:db8::5 } ip6 daddr { fd00:ec2::254/128 }"]
    # a ports-only rule: both families; the cgroup-only rule (mining) has none here
    assert lines[4:] == [
        f"{ETHER} meta protocol ip tcp dport {{ 3333 }}",
        "ip saddr != { 10.0.0.5, 192.0.2.7 } tcp dport { 3333 }",
        f"{ETHER} meta protocol ip6 tcp dport {{ 3333 }}",
        "ip6 saddr != { 2001:db8::5 } tcp dport { 3333 }"]
    uplink_scopes = [s for s in eg.scopes if s.scope == "uplink"]
    assert [s.policy for s in uplink_scopes] == ["metadata", "metadata", "pods", "pods"]
    for line in eg.uplink.lines:    # each line's comment is the index of its scope
        index = int(line.rsplit('"', 2)[1].removeprefix(egress.COMMENT_PREFIX))
        assert eg.scopes[index].scope == "uplink"


def test_no_own_address_of_a_family_drops_that_family_whatever_its_source():
    eg = egress.desired(Config(), devices=MACS[:1], own=OWN[:1])
    assert any(line.startswith("meta protocol ip6 ip6 daddr { fd00:ec2::254/128 }")
               for line in eg.uplink.lines)


def test_an_isolated_node_cuts_every_foreign_frame_first():
    eg = egress.desired(Config(), devices=MACS, own=OWN, isolated=True)
    assert [line.split(" counter")[0] for line in eg.uplink.lines[:3]] == [
        ETHER, "ip saddr != { 10.0.0.5, 192.0.2.7 }", "ip6 saddr != { 2001:db8::5 }"]
    assert all(f'comment "{uplink.ISOLATION_COMMENT}"' in line for line in eg.uplink.lines[:3])


def test_devices_spread_over_chains_the_kernel_accepts():
    many = [(f"eth{i}", f"52:54:00:00:{i // 256:02x}:{i % 256:02x}") for i in range(450)]
    up = egress.desired(Config(), devices=many, own=OWN).uplink
    assert uplink.chains(up) == ["egress", "egress_1", "egress_2"]
    text = uplink.text(up)
    assert text.count("add chain") == 3
    assert all(line.count(",") < 256 for line in text.splitlines() if "add chain" in line)


def test_nothing_to_hook_without_devices_or_rules():
    assert egress.desired(Config(), devices=[], own=OWN).uplink == uplink.Uplink()
    assert egress.desired(Config(policy=Policy(egress=())), devices=MACS, own=OWN).uplink.lines == ()
    assert "add chain" not in uplink.text(uplink.Uplink())
    # a name nft would read as syntax is left out, never written
    assert egress.desired(Config(), devices=[("eth0", "52:54:00:00:00:01"), ("bad name", "")], own=OWN).uplink.devices == ("eth0",)


def test_counts_map_back_to_scopes():
    eg = egress.desired(Config(), devices=[("eth0", "52:54:00:00:00:01")], own=OWN)
    first = eg.scopes.index(egress.Scope("metadata", "uplink"))
    objs = [{"rule": {"chain": "egress", "comment": f"{egress.COMMENT_PREFIX}{first}",
                      "expr": [{"counter": {"packets": 3, "bytes": 180}}]}},
            {"rule": {"chain": "egress", "comment": "someone else's", "expr": []}}]
    assert egress.uplink_counts(objs, eg) == {egress.Scope("metadata", "uplink"): 3}
