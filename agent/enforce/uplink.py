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
_DEVICE_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,15}$")   # what nft takes unquoted in a set


@dataclass(frozen=True)
class Uplink:
    """The uplink table's contents: the devices hooked and the rule lines (commented
    "egress #N", N continuing the inet chains' scope indexes)."""

    devices: tuple[str, ...] = ()
    lines: tuple[str, ...] = ()


def desired(rules: Iterable[EgressRule], devices: Iterable[str],
            own: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address],
            matches: Any, comment: Any) -> tuple[Uplink, list[str]]:
    """(the table's contents, the policy rule name of each line in order). `matches(rule)`
    gives a rule's destination matches ("ip daddr {...} tcp dport {...}"), `comment(i)` the
    comment of its i-th line."""
    devs = tuple(sorted(d for d in devices if _DEVICE_RE.match(d)))
    own = list(own)
    mine = {4: sorted(str(a) for a in own if a.version == 4),
            6: sorted(str(a) for a in own if a.version == 6)}
    lines: list[str] = []
    names: list[str] = []
    for rule in rules:
        if not rule.interfaces:
            continue
        for what in matches(rule):
            for version, proto in ((4, "ip"), (6, "ip6")):
                if what.startswith(("ip ", "ip6 ")) and not what.startswith(f"{proto} "):
                    continue
                foreign = f"{proto} saddr != {{ {', '.join(mine[version])} }}" if mine[version] \
                    else f"meta protocol {proto}"
                lines.append(f"{foreign} {what} counter drop comment \"{comment(len(names))}\"")
                names.append(rule.name)
    if not devs:
        lines, names = [], []
    return Uplink(devs, tuple(lines)), names


def text(uplink: Uplink) -> str:
    """One transaction making the table anew (a table left by an earlier agent, or the
    same one with other devices, replaced with no moment in between); none at all when
    there is nothing to hook."""
    out = [f"add table netdev {UPLINK_TABLE}", f"delete table netdev {UPLINK_TABLE}"]
    if uplink.lines:
        out += [f"add table netdev {UPLINK_TABLE}",
                f"add chain netdev {UPLINK_TABLE} {CHAIN} {{ type filter hook egress devices = "
                f"{{ {', '.join(uplink.devices)} }} priority 0; policy accept; }}"]
        out += [f"add rule netdev {UPLINK_TABLE} {CHAIN} {line}" for line in uplink.lines]
    return "\n".join(out) + "\n"


def packets(objs: Iterable[Mapping[str, Any]], prefix: str) -> dict[int, int]:
    """Packets dropped per line index, from a JSON listing of the uplink chain."""
    out: dict[int, int] = {}
    for obj in objs:
        rule = obj.get("rule")
        if not rule or rule.get("chain") != CHAIN:
            continue
        comment = str(rule.get("comment", ""))
        if not comment.startswith(prefix) or not comment[len(prefix):].isdigit():
            continue
        out[int(comment[len(prefix):])] = sum(
            e["counter"].get("packets", 0) for e in rule.get("expr", [])
            if isinstance(e, dict) and isinstance(e.get("counter"), dict))
    return out
