"""Egress policy (config `policy.egress`) in table `inet swarm_agent`, as pure data.

Two base chains (ruleset.EGRESS_CHAINS) hold it: `egress_out` (output hook) matches a
local socket's cgroup (`socket cgroupv2 level L "PATH"`: the subtree, set by the kernel
when the socket was made, not forgeable by the process), `egress_fwd` (forward hook)
matches the input interface of forwarded packets (a bridged container's traffic leaves
its own namespace and arrives here with no socket). A denied packet is dropped before it
leaves: a TCP connect() fails with EPERM on its first SYN, nothing reaches the wire.

Each chain first accepts loopback and the management and mesh networks: egress policy
never cuts them (agent.policyconfig refuses a destination wholly inside them). Every
drop rule has a counter and a comment naming its rule ("egress #N"): the daemon reads
the counters (NftEnforcer.egress_counts) and turns new drops into events.

Written as nft text (libnftables 1.0.6's JSON has no `socket cgroupv2`); every value
in it was validated by agent.policyconfig. A configured cgroup that does not exist (yet)
is left out and listed as waiting; each reconcile looks again (nft resolves a cgroup path
to its id when the rule is added, so a rule cannot wait for a cgroup).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from agent.config import Config
from agent.enforce import uplink
from agent.enforce.cgroup import CgroupError, resolve
from agent.enforce.uplink import Uplink
from agent.enforce.ruleset import EGRESS_CHAINS, FAMILY, TABLE
from agent.policyconfig import EgressRule

CHAINS = tuple(name for name, _ in EGRESS_CHAINS)
_OUT, _FWD = CHAINS
_LOOPBACK = ("127.0.0.0/8", "::1/128")
COMMENT_PREFIX = "egress #"


@dataclass(frozen=True)
class Scope:
    """One drop rule's subject: the policy rule's name and "cgroup:/path" or "iif:name"."""

    policy: str
    scope: str


@dataclass(frozen=True)
class Egress:
    """What the egress chains hold: the rule lines (chain, text) and what they count for."""

    lines: tuple[tuple[str, str], ...] = ()
    scopes: tuple[Scope, ...] = ()        # index N is the rule commented "egress #N"
    waiting: tuple[str, ...] = ()         # "policy: /cgroup" not there (yet)
    uplink: Uplink = Uplink()             # the netdev table's (agent.enforce.uplink)

    def status(self) -> dict[str, Any]:
        enforced: dict[str, list[str]] = {}
        for s in self.scopes:
            enforced.setdefault(s.policy, [])
            if s.scope not in enforced[s.policy]:
                enforced[s.policy].append(s.scope)
        return {"enforced": enforced, "waiting": list(self.waiting),
                # the links whose egress hook also holds the rules for workloads in
                # namespaces of their own (macvlan, ipvlan: agent.enforce.uplink)
                "uplink_devices": list(self.uplink.devices) if self.uplink.lines else []}


def desired(cfg: Config, agent_cgroup: str = "/", devices: Iterable[tuple[str, str]] = (),
            own: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address] = (),
            isolated: bool = False) -> Egress:
    """The egress chains' contents for `cfg.policy`, with the cgroups present now, and the
    uplink table's for `devices` and the host's own addresses `own`. The
    agent's own cgroup (unless the root: that would exempt everything) is exempt: a policy
    over a parent of it must not cut the agent's notifications or its mesh by name."""
    exempt = _exempt(cfg)
    lines: list[tuple[str, str]] = [(c, line) for c in (_OUT, _FWD) for line in exempt]
    if cfg.policy.egress and agent_cgroup != "/":
        try:
            me = resolve(agent_cgroup)
            lines.append((_OUT, f'socket cgroupv2 level {me.level} "{me.nft_path}" accept'))
        except CgroupError:
            pass
    scopes: list[Scope] = []
    waiting: list[str] = []
    for rule in cfg.policy.egress:
        subjects: list[tuple[str, str, str]] = []
        for path in rule.cgroups:
            try:
                cg = resolve(path)
            except CgroupError:
                waiting.append(f"{rule.name}: {path}")
                continue
            subjects.append((_OUT, f'socket cgroupv2 level {cg.level} "{cg.nft_path}"',
                             f"cgroup:{cg.path}"))
        subjects += [(_FWD, f'iifname "{name}"', f"iif:{name}") for name in rule.interfaces]
        for chain, who, scope in subjects:
            for what in _matches(rule):
                lines.append((chain, f'{who} {what} counter drop comment "{COMMENT_PREFIX}{len(scopes)}"'))
                scopes.append(Scope(rule.name, scope))
    base = len(scopes)
    up, names = uplink.desired(cfg.policy.egress, devices, own, _matches,
                               lambda i: f"{COMMENT_PREFIX}{base + i}", isolated)
    scopes += [Scope(name, "uplink") for name in names]
    return Egress(tuple(lines), tuple(scopes), tuple(waiting), up)


def _exempt(cfg: Config) -> list[str]:
    nets = [ipaddress.ip_network(n, strict=False)
            for n in (*_LOOPBACK, *cfg.allowlist.management, *cfg.allowlist.mesh)]
    out = []
    for version, proto in ((4, "ip"), (6, "ip6")):
        mine = ipaddress.collapse_addresses([n for n in nets if n.version == version])
        out.append(f"{proto} daddr {{ {', '.join(str(n) for n in mine)} }} accept")
    return out


def _matches(rule: EgressRule) -> list[str]:
    """The destination and port matches of one rule: one per address family it names."""
    ports = ", ".join(str(p) for p in sorted(set(rule.ports)))
    if ports:
        l4 = {"tcp": f"tcp dport {{ {ports} }}", "udp": f"udp dport {{ {ports} }}",
              "any": f"meta l4proto {{ tcp, udp }} th dport {{ {ports} }}"}[rule.proto]
    else:
        l4 = {"tcp": "meta l4proto tcp", "udp": "meta l4proto udp", "any": ""}[rule.proto]
    nets = rule.networks()
    if not nets:
        return [l4]
    out = []
    for version, proto in ((4, "ip"), (6, "ip6")):
        mine = list(ipaddress.collapse_addresses([n for n in nets if n.version == version]))
        if mine:
            out.append(f"{proto} daddr {{ {', '.join(str(n) for n in mine)} }} {l4}".rstrip())
    return out


def labels(new: Egress, old: Egress) -> list[str]:
    """Drift labels ("egress:POLICY:SCOPE") of the scopes in `new` and not in `old`."""
    return sorted({f"egress:{s.policy}:{s.scope}" for s in set(new.scopes) - set(old.scopes)})


def rules_text(egress: Egress, table: str = TABLE) -> str:
    """One nft transaction replacing the egress chains' rules with `egress`."""
    lines = [f"flush chain {FAMILY} {table} {c}" for c in (_OUT, _FWD)]
    lines += [f"add rule {FAMILY} {table} {chain} {rule}" for chain, rule in egress.lines]
    return "\n".join(lines) + "\n"


def counts(objs: Iterable[Mapping[str, Any]], egress: Egress) -> dict[Scope, int]:
    """Packets dropped so far per scope, from a JSON listing of the table (rules of the
    egress chains whose comment names a scope of `egress`; others are ignored)."""
    out: dict[Scope, int] = {}
    for obj in objs:
        rule = obj.get("rule")
        if not rule or rule.get("chain") not in (_OUT, _FWD):
            continue
        comment = str(rule.get("comment", ""))
        if not comment.startswith(COMMENT_PREFIX) or not comment[len(COMMENT_PREFIX):].isdigit():
            continue
        index = int(comment[len(COMMENT_PREFIX):])
        if index >= len(egress.scopes):
            continue
        packets = sum(e["counter"].get("packets", 0) for e in rule.get("expr", [])
                      if isinstance(e, dict) and isinstance(e.get("counter"), dict))
        scope = egress.scopes[index]
        out[scope] = out.get(scope, 0) + packets
    return out


def uplink_counts(objs: Iterable[Mapping[str, Any]], egress: Egress) -> dict[Scope, int]:
    """Packets dropped so far per scope by the uplink table (a JSON listing of its chain)."""
    out: dict[Scope, int] = {}
    for index, packets in uplink.packets(objs, COMMENT_PREFIX).items():
        if index < len(egress.scopes):
            scope = egress.scopes[index]
            out[scope] = out.get(scope, 0) + packets
    return out


class EgressMeter:
    """Turns the drop counters into reports, rate-limited: a scope's first drops are
    reported at the next reading, then at most one report per `every_s` per scope; the
    packets dropped in between are summed into the next report (never lost). A counter
    that went back (the table was recreated) restarts from its new value."""

    def __init__(self, every_s: float):
        self.every_s = every_s
        self._seen: dict[Scope, int] = {}
        self._pending: dict[Scope, int] = {}
        self._last: dict[Scope, float] = {}
        self.total: dict[Scope, int] = {}

    def update(self, counts: Mapping[Scope, int], now: float) -> list[tuple[Scope, int]]:
        """(scope, packets dropped since its last report) for each scope due a report."""
        out = []
        for scope, value in counts.items():
            before = self._seen.get(scope, 0)
            new = value - before if value >= before else value
            self._seen[scope] = value
            if new > 0:
                self._pending[scope] = self._pending.get(scope, 0) + new
                self.total[scope] = self.total.get(scope, 0) + new
            pending = self._pending.get(scope, 0)
            last = self._last.get(scope)
            if pending and (last is None or now - last >= self.every_s):
                out.append((scope, pending))
                self._pending[scope] = 0
                self._last[scope] = now
        return out
