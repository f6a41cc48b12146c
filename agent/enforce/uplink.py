"""The egress policy at the host's links, for workloads no hook of the host's IP stack sees.

A container on a macvlan or ipvlan (L2) network sends from its own network namespace
straight out of a host link: its packets pass neither the host's output hook (no local
socket) nor its forward hook (nothing is routed). The last place the host sees them is
the link's own egress hook (netdev family, kernel >= 5.16). There, table `netdev
swarm_agent_uplink` drops what an egress rule for such workloads denies (the rules with
`interfaces`: those are the rules for workloads in network namespaces of their own) when
the source address is not one of the host's: the host's own traffic, and a bridged
container's after masquerade, carry the host's address and are judged by the inet table's
chains as before. A workload that forges the host's address gets no answer back: the
reply goes to the host, not to the container's MAC.

Devices: the Ethernet links of the namespace (`interfaces` of the config, or all but lo);
the table is made anew in one transaction when they or the host's addresses change (each
reconcile looks). An SR-IOV virtual function passes the host's kernel entirely: not
covered.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from agent.policyconfig import EgressRule

UPLINK_TABLE = "swarm_agent_uplink"
CHAIN = "egress"
DEVICES_PER_CHAIN = 200       # the kernel takes at most 256 devices in one netdev chain
ISOLATION_COMMENT = "isolation"
_DEVICE_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,15}$")   # what nft takes unquoted in a set
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


@dataclass(frozen=True)
class Uplink:
    """The uplink table's contents: the devices hooked and the rule lines (commented
    "egress #N", N continuing the inet chains' scope indexes; "isolation" while the node
    is isolated)."""

    devices: tuple[str, ...] = ()
    lines: tuple[str, ...] = ()


def desired(rules: Iterable[EgressRule], devices: Iterable[tuple[str, str]],
            own: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address],
            matches: Any, comment: Any, isolated: bool = False) -> tuple[Uplink, list[str]]:
    """(the table's contents, the policy rule name of each counted line's scope, in
    order). `devices` are (name, MAC); `matches(rule)` gives a rule's destination matches
    ("ip daddr {...} tcp dport {...}"), `comment(i)` the comment of its i-th scope.

    A frame is foreign when its source MAC is none of the host's links' (a macvlan
    container, even one that took the host's IP address) or its source address is none
    of the host's (an ipvlan container shares the link's MAC): two lines per match."""
    devs = sorted((d, m) for d, m in devices if _DEVICE_RE.match(d))
    names_ = tuple(d for d, _ in devs)
    macs = sorted({m for _, m in devs if _MAC_RE.match(m)})
    own = list(own)
    mine = {4: sorted(str(a) for a in own if a.version == 4),
            6: sorted(str(a) for a in own if a.version == 6)}

    def foreign(version: int | None) -> list[str]:
        out = [f"ether saddr != {{ {', '.join(macs)} }}"] if macs else []
        for v, proto in ((4, "ip"), (6, "ip6")):
            if version in (None, v):
                out.append(f"{proto} saddr != {{ {', '.join(mine[v])} }}" if mine[v]
                           else f"meta protocol {proto}")
        return out

    lines: list[str] = []
    if isolated:        # a node cut off: nothing of its macvlan/ipvlan workloads leaves
        lines += [f"{who} counter drop comment \"{ISOLATION_COMMENT}\"" for who in foreign(None)]
    names: list[str] = []
    for rule in rules:
        if not rule.interfaces:
            continue
        for what in matches(rule):
            versions = [4] if what.startswith("ip ") else [6] if what.startswith("ip6 ") else [4, 6]
            for version in versions:
                note = comment(len(names))
                for who in foreign(version):
                    if who.startswith("ether") and len(versions) == 2:
                        # a ports-only match needs its family: say which
                        who += f" meta protocol {'ip' if version == 4 else 'ip6'}"
                    lines.append(f"{who} {what} counter drop comment \"{note}\"")
                names.append(rule.name)
    if not names_:
        return Uplink(), []
    return Uplink(names_, tuple(lines)), names


def text(uplink: Uplink) -> str:
    """One transaction making the table anew (a table left by an earlier agent, or the
    same one with other devices, replaced with no moment in between); none at all when
    there is nothing to hook. Devices go DEVICES_PER_CHAIN to a base chain."""
    out = [f"add table netdev {UPLINK_TABLE}", f"delete table netdev {UPLINK_TABLE}"]
    if uplink.lines:
        out.append(f"add table netdev {UPLINK_TABLE}")
        for n, chain in enumerate(chains(uplink)):
            devs = uplink.devices[n * DEVICES_PER_CHAIN:(n + 1) * DEVICES_PER_CHAIN]
            out.append(f"add chain netdev {UPLINK_TABLE} {chain} {{ type filter hook egress "
                       f"devices = {{ {', '.join(devs)} }} priority 0; policy accept; }}")
            out += [f"add rule netdev {UPLINK_TABLE} {chain} {line}" for line in uplink.lines]
    return "\n".join(out) + "\n"


def chains(uplink: Uplink) -> list[str]:
    n = max(1, -(-len(uplink.devices) // DEVICES_PER_CHAIN))
    return [CHAIN if i == 0 else f"{CHAIN}_{i}" for i in range(n)]


def packets(objs: Iterable[Mapping[str, Any]], prefix: str) -> dict[int, int]:
    """Packets dropped per scope index, from a JSON listing of the table (every chain)."""
    out: dict[int, int] = {}
    for obj in objs:
        rule = obj.get("rule")
        if not rule or not str(rule.get("chain", "")).startswith(CHAIN):
            continue
        comment = str(rule.get("comment", ""))
        if not comment.startswith(prefix) or not comment[len(prefix):].isdigit():
            continue
        index = int(comment[len(prefix):])
        out[index] = out.get(index, 0) + sum(
            e["counter"].get("packets", 0) for e in rule.get("expr", [])
            if isinstance(e, dict) and isinstance(e.get("counter"), dict))
    return out


def rule_count(objs: Iterable[Mapping[str, Any]]) -> int:
    """The rules a JSON listing of the table holds (a flushed chain holds none)."""
    return sum(1 for obj in objs if obj.get("rule"))
