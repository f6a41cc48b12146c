"""Node and service isolation in table `inet swarm_agent`, as pure data (no I/O here).

The table always holds three empty base chains (ruleset.ISOLATION_CHAINS: input, output
and forward hooks). Their rules *are* the isolation state and are rewritten together as
one transaction per change: flush the three chains, add the rules of the new state.

That transaction is nft text, not JSON: nftables 1.0.6's JSON parser has no
`socket cgroupv2` expression. Every value put into the text is validated first
(cgroup paths by agent.enforce.cgroup.normalise, networks by ipaddress).

Service isolation, for each isolated cgroup (first, so it also holds on an isolated node):
    socket cgroupv2 level L "PATH" drop      in input (listening and connected sockets,
                                             found by nft's own socket lookup) and output
Node isolation, after those:
    input:   iif lo, sources in the isolation allowlist (mesh + management, not load
             balancers: they carry the customers' traffic), replies to the agent's own
             sockets (ct state established,related + socket cgroupv2 of the agent's cgroup),
             IPv6 neighbour discovery and DHCP replies (the node keeps its addresses and
             its allowlisted neighbours), everything else dropped
    output:  the same in reverse; the agent's own cgroup may open connections (mesh by
             name, DNS from the agent itself)
    forward: only to or from the allowlist
Why the agent's cgroup and not `meta skuid`: the agent runs as root like many services, so
a uid match would exempt any root process, including the intruder; under systemd the agent
has a cgroup of its own. When the agent runs in the root cgroup no exemption is added
(it would match everything): only the allowlist then reaches the isolated node.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable, Sequence

from agent.config import Config
from agent.enforce.base import EnforceError
from agent.enforce.cgroup import Cgroup, CgroupError, check_not_agent, resolve
from agent.enforce.ruleset import FAMILY, ISOLATION_CHAINS, TABLE
from agent.model import Mitigation, MitigationKind

ISOLATION_KINDS = (MitigationKind.ISOLATE_NODE, MitigationKind.ISOLATE_SERVICE)
_IN, _OUT, _FWD = (name for name, _ in ISOLATION_CHAINS)
_ND = "nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, nd-router-advert"


class IsolationRefused(EnforceError):
    """Isolating would lock the operators out (no mesh or management allowlist)."""


@dataclass(frozen=True)
class Isolation:
    """The isolation state of the node: what the three chains hold."""

    node: bool = False
    services: tuple[Cgroup, ...] = ()
    allow: tuple[str, ...] = ()          # mesh and management networks, collapsed
    agent: Cgroup | None = None          # the agent's own cgroup, exempt when node

    def __bool__(self) -> bool:
        return self.node or bool(self.services)

    def labels(self) -> set[str]:
        return ({"isolation:node"} if self.node else set()) | {
            f"isolation:service:{c.path}" for c in self.services}


def check_node(m: Mitigation, cfg: Config) -> None:
    """Refuse node isolation without a mesh or management allowlist unless forced."""
    if cfg.allowlist.mesh or cfg.allowlist.management:
        return
    if m.params.get("force") is True:
        return
    raise IsolationRefused(
        "refusing to isolate the node: no mesh or management network is allowlisted, so "
        "nobody could reach it to look or release it (configure allowlist.mesh or "
        "allowlist.management, or force it with params {\"force\": true})")


def check_service(target: str, agent_cgroup: str) -> Cgroup:
    """The cgroup to isolate; CgroupError when absent or holding the agent."""
    cg = resolve(target)
    check_not_agent(cg, agent_cgroup)
    return cg


def desired(mitigations: Iterable[Mitigation], cfg: Config, now: float,
            agent_cgroup: str) -> Isolation:
    """The isolation state for `mitigations` (expired ones, other kinds and cgroups that no
    longer exist are left out: reconcile must not fail on them)."""
    node, services = False, set()
    for m in mitigations:
        if m.expires_at is not None and m.expires_at <= now:
            continue
        if m.kind is MitigationKind.ISOLATE_NODE:
            node = True
        elif m.kind is MitigationKind.ISOLATE_SERVICE:
            try:
                services.add(check_service(m.target, agent_cgroup))
            except CgroupError:
                continue
    if not node:
        return Isolation(services=tuple(sorted(services)))
    agent = None
    if agent_cgroup != "/":
        try:
            agent = resolve(agent_cgroup)
        except CgroupError:
            agent = None
    return Isolation(True, tuple(sorted(services)), _allow(cfg), agent)


def _allow(cfg: Config) -> tuple[str, ...]:
    nets = [ipaddress.ip_network(n, strict=False)
            for n in (*cfg.allowlist.mesh, *cfg.allowlist.management)]
    out: list[str] = []
    for v in (4, 6):
        out += [str(n) for n in ipaddress.collapse_addresses([n for n in nets if n.version == v])]
    return tuple(out)


def _cg(c: Cgroup) -> str:
    return f'socket cgroupv2 level {c.level} "{c.nft_path}"'


def _node_rules(iso: Isolation) -> list[tuple[str, str]]:
    v4 = [n for n in iso.allow if ":" not in n]
    v6 = [n for n in iso.allow if ":" in n]
    rules = [(_IN, "iif lo accept"), (_OUT, "oif lo accept")]
    for proto, nets in (("ip", v4), ("ip6", v6)):
        if nets:
            s = "{ " + ", ".join(nets) + " }"
            rules += [(_IN, f"{proto} saddr {s} accept"), (_OUT, f"{proto} daddr {s} accept"),
                      (_FWD, f"{proto} saddr {s} accept"), (_FWD, f"{proto} daddr {s} accept")]
    if iso.agent is not None:
        rules += [(_IN, f"ct state established,related {_cg(iso.agent)} accept"),
                  (_OUT, f"{_cg(iso.agent)} accept")]
    for chain in (_IN, _OUT):
        rules.append((chain, f"ip6 hoplimit 255 icmpv6 type {{ {_ND} }} accept"))
    rules += [(_IN, "udp sport 67 udp dport 68 accept"), (_OUT, "udp sport 68 udp dport 67 accept"),
              (_IN, "udp sport 547 udp dport 546 accept"), (_OUT, "udp sport 546 udp dport 547 accept")]
    rules += [(c, "counter drop") for c in (_IN, _OUT, _FWD)]
    return rules


def rules_text(iso: Isolation, table: str = TABLE) -> str:
    """One nft transaction replacing the isolation chains' rules with `iso`."""
    lines = [f"flush chain {FAMILY} {table} {c}" for c in (_IN, _OUT, _FWD)]
    rules = [(c, f"{_cg(s)} counter drop") for s in iso.services for c in (_IN, _OUT)]
    if iso.node:
        rules += _node_rules(iso)
    lines += [f"add rule {FAMILY} {table} {chain} {rule}" for chain, rule in rules]
    return "\n".join(lines) + "\n"


def lifted(current: Sequence[Mitigation], m: Mitigation) -> list[Mitigation]:
    """`current` without `m` (by id, else every mitigation of its kind and target)."""
    out = [d for d in current if d.id != m.id]
    if len(out) == len(current):
        out = [d for d in out if (d.kind, d.target) != (m.kind, m.target)]
    return out
