"""The nftables ruleset of table `inet swarm_agent`, as pure data (no I/O).

Set elements are computed from mitigations here, and the table is built as a libnftables
JSON batch. Kernel interval sets reject overlapping elements, so the mitigations of one set
are turned into a partition of the address space: every address gets the latest expiry of
the mitigations covering it, and adjacent addresses with the same expiry form one element.
Keys are either `Span` (an inclusive address range of one IP version) or `Service`.
"""
from __future__ import annotations

import heapq
import ipaddress
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from agent.config import Config
from agent.enforce.base import EnforceError, UnsupportedMitigation
from agent.model import Mitigation, MitigationKind, parse_target

TABLE = "swarm_agent"
FAMILY = "inet"
FILTER_CHAIN = "filter_prerouting"
NAT_CHAIN = "nat_prerouting"
SERVICE_SET = "svc_ratelimit"
SERVICE_METER = "svc_meter"
CHALLENGE_SERVICE_SET = "svc_challenge"
CHALLENGE_CHAIN = "challenge_in"
EXCHANGE_CHAIN = "exchange_out"
UDP_PEERS = "udp_peers"
DNAT_CHAIN = "dnat_seen"
SYN_WAIT_CHAIN = "syn_wait"
DNAT_PORTS = "dnat_ports"
DNAT_PORTS_TIMEOUT_S = 86400  # a DNAT'd port is remembered this long after its last new flow
# Challenged SYNs that keep conntrack (DNAT'd or forwarded, so never proxied) get this much
# to complete their handshake instead of the kernel's 60-120 s: a forged flood then holds
# at most rate x 5 s entries (262144 entries: 52k SYN/s) instead of filling the table.
SYN_WAIT = "challenge_syn_wait"
SYN_WAIT_S = 5
# The SYN proxy's options towards clients: the MSS only. With `timestamp` (which the proxy
# needs to carry window scaling and SACK in its cookie) every proxied connection to a local
# listener waited ~1 s on Linux 6.18: the listener ignores the proxy's ACK (its per-
# connection timestamp offset) and completes only on its SYN-ACK retransmit. Without it the
# handshake is immediate; the cost, while a challenge lasts, is no window scaling (64 KiB
# window) and no SACK on the connections it proxies.
SYNPROXY = {"synproxy": {"mss": 1460}}
METER_TIMEOUT_S = 60          # idle per-source/per-service limiter state is forgotten after this
TIMEOUT_TOLERANCE_S = 2.0     # kernel and desired remaining lifetimes may differ this much

_ADDR_KINDS = {
    MitigationKind.BLOCK_IP: "block",
    MitigationKind.RATE_LIMIT: "ratelimit",
    MitigationKind.REROUTE: "reroute",
    MitigationKind.CHALLENGE: "challenge",
}
_FAMILIES = ((4, "ip", "ipv4_addr", "_v4"), (6, "ip6", "ipv6_addr", "_v6"))
_PROTOS = {"tcp": 6, "udp": 17}
INTERVAL_SETS = tuple(f"{p}{s}" for p in ("allow", "block", "ratelimit", "reroute", "challenge")
                      for _, _, _, s in _FAMILIES)
SERVICE_SETS = (SERVICE_SET, CHALLENGE_SERVICE_SET)
ELEMENT_SETS = (*INTERVAL_SETS, *SERVICE_SETS)
CHALLENGE_KINDS = (MitigationKind.CHALLENGE, MitigationKind.CHALLENGE_SERVICE)
# Node and service isolation (agent.enforce.isolate fills them): (chain, hook), priority -10.
ISOLATION_CHAINS = (("isolate_in", "input"), ("isolate_out", "output"), ("isolate_fwd", "forward"))
# Egress policy (agent.enforce.egress fills them): (chain, hook), priority -20.
EGRESS_CHAINS = (("egress_out", "output"), ("egress_fwd", "forward"))
# Holds the isolation and egress rules while the table is being replaced (NftEnforcer
# _recreate): present only for those milliseconds, or after an agent died in them.
BRIDGE_TABLE = "swarm_agent_bridge"


@dataclass(frozen=True, order=True)
class Span:
    """An inclusive range of addresses of one IP version."""

    version: int
    start: int
    end: int

    @classmethod
    def of(cls, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> "Span":
        return cls(net.version, int(net.network_address), int(net.broadcast_address))

    def _addr(self, value: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.IPv4Address(value) if self.version == 4 else ipaddress.IPv6Address(value)

    def __str__(self) -> str:
        if self.start == self.end:
            return str(self._addr(self.start))
        lo, hi = self._addr(self.start), self._addr(self.end)
        nets = list(ipaddress.summarize_address_range(lo, hi))
        return str(nets[0]) if len(nets) == 1 else f"{lo}-{hi}"

    def to_json(self) -> Any:
        text = str(self)
        if "/" in text:
            addr, length = text.split("/")
            return {"prefix": {"addr": addr, "len": int(length)}}
        if "-" in text:
            return {"range": text.split("-")}
        return text


@dataclass(frozen=True, order=True)
class Service:
    proto: str     # "tcp" | "udp"
    port: int

    def __str__(self) -> str:
        return f"{self.proto}/{self.port}"

    def to_json(self) -> Any:
        return {"concat": [self.proto, self.port]}


Key = Span | Service
SetContents = dict[Key, float | None]     # key -> expires_at (wall seconds) or None


def parse_service(target: str) -> Service:
    """"tcp/80" -> Service; raises EnforceError with a readable sentence."""
    proto, _, port = target.strip().lower().partition("/")
    if proto not in _PROTOS or not port.isdigit() or not 0 < int(port) < 65536:
        raise EnforceError(f"not a service: {target!r} (expected tcp/PORT or udp/PORT)")
    return Service(proto, int(port))


def parse_network(target: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return parse_target(target)
    except ValueError as e:
        raise EnforceError(str(e)) from None


def set_for(m: Mitigation, cfg: Config) -> tuple[str, Key]:
    """Which set and key a mitigation occupies; raises UnsupportedMitigation/EnforceError."""
    if m.kind is MitigationKind.RATE_LIMIT_SERVICE:
        return SERVICE_SET, parse_service(m.target)
    if m.kind is MitigationKind.CHALLENGE_SERVICE:
        return CHALLENGE_SERVICE_SET, parse_service(m.target)
    purpose = _ADDR_KINDS.get(m.kind)
    if purpose is None:
        raise UnsupportedMitigation(f"nftables does not enforce {m.kind.value} mitigations")
    net = parse_network(m.target)
    if m.kind is MitigationKind.REROUTE:
        rr = cfg.enforce.reroute
        sinkhole = rr.sinkhole_v4 if net.version == 4 else rr.sinkhole_v6
        if sinkhole is None and rr.mark is None:
            raise UnsupportedMitigation(
                f"cannot reroute {m.target}: enforce.reroute has no sinkhole_v{net.version} and no mark")
    return f"{purpose}_v{net.version}", Span.of(net)


def partition(spans: Iterable[tuple[Span, float | None]]) -> SetContents:
    """Non-overlapping spans: each address keeps the latest expiry covering it (None wins)."""
    out: SetContents = {}
    for version in (4, 6):
        items = sorted((s.start, s.end, math.inf if e is None else e)
                       for s, e in spans if s.version == version)
        out.update(_sweep(version, items))
    return out


def _sweep(version: int, items: list[tuple[int, int, float]]) -> SetContents:
    cuts = sorted({p for s, e, _ in items for p in (s, e + 1)})
    active: list[tuple[float, int]] = []      # (-expiry, end) max-heap by expiry
    result: list[tuple[int, int, float]] = []
    i = 0
    for lo, hi in zip(cuts, cuts[1:]):
        while i < len(items) and items[i][0] <= lo:
            heapq.heappush(active, (-items[i][2], items[i][1]))
            i += 1
        while active and active[0][1] < lo:     # lazily drop spans that ended before lo
            heapq.heappop(active)
        if not active:
            continue
        expiry = -active[0][0]
        if result and result[-1][1] == lo - 1 and result[-1][2] == expiry:
            result[-1] = (result[-1][0], hi - 1, expiry)   # merge adjacent equal expiry
        else:
            result.append((lo, hi - 1, expiry))
    return {Span(version, s, e): (None if x == math.inf else x) for s, e, x in result}


def desired_contents(mitigations: Iterable[Mitigation], cfg: Config, now: float,
                     allow: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]
                     ) -> dict[str, SetContents]:
    """Every element set's contents for `mitigations` (those expired at `now` left out).

    Mitigations this enforcer does not handle, or that are invalid, are skipped: reconcile
    must not fail on them (apply() is where they are refused)."""
    spans: dict[str, list[tuple[Span, float | None]]] = {name: [] for name in INTERVAL_SETS}
    services: dict[str, SetContents] = {name: {} for name in SERVICE_SETS}
    for m in mitigations:
        if m.expires_at is not None and m.expires_at <= now:
            continue
        try:
            name, key = set_for(m, cfg)
        except EnforceError:
            continue
        if isinstance(key, Service):
            old = services[name].get(key, 0.0)
            services[name][key] = (None if old is None or m.expires_at is None
                                   else max(old, m.expires_at))
        else:
            spans[name].append((key, m.expires_at))
    for net in ipaddress.collapse_addresses([n for n in allow if n.version == 4]):
        spans["allow_v4"].append((Span.of(net), None))
    for net in ipaddress.collapse_addresses([n for n in allow if n.version == 6]):
        spans["allow_v6"].append((Span.of(net), None))
    out = {name: partition(items) for name, items in spans.items()}
    out.update(services)
    return out


def timeout_s(expires_at: float | None, now: float) -> int | None:
    """The kernel element timeout: remaining lifetime rounded up, at least 1 s."""
    return None if expires_at is None else max(1, math.ceil(expires_at - now))


def elements_json(contents: Mapping[Key, float | None], now: float) -> list[Any]:
    out = []
    for key, expires_at in sorted(contents.items()):
        t = timeout_s(expires_at, now)
        out.append(key.to_json() if t is None else {"elem": {"val": key.to_json(), "timeout": t}})
    return out


def _obj(**fields: Any) -> dict[str, Any]:
    return {"family": FAMILY, "table": TABLE, **fields}


def element_cmd(verb: str, name: str, elems: list[Any]) -> dict[str, Any]:
    return {verb: {"element": _obj(name=name, elem=elems)}}


def _match_saddr(proto: str, set_name: str) -> dict[str, Any]:
    return {"match": {"op": "==", "left": {"payload": {"protocol": proto, "field": "saddr"}},
                      "right": f"@{set_name}"}}


def _limit(rate: int, burst: int) -> dict[str, Any]:
    return {"limit": {"rate": rate, "burst": burst, "per": "second", "inv": True}}


_COUNTER = {"counter": {"packets": 0, "bytes": 0}}
# A bare SYN (a connection attempt; before conntrack there is no ct state).
_TCP_SYN = {"match": {"op": "==", "right": "syn", "left": {
    "&": [{"payload": {"protocol": "tcp", "field": "flags"}}, ["fin", "syn", "rst", "ack"]]}}}
_SVC_KEY = {"concat": [{"meta": {"key": "l4proto"}}, {"payload": {"protocol": "th", "field": "dport"}}]}


def _rule(chain: str, *expr: dict[str, Any]) -> dict[str, Any]:
    return {"add": {"rule": _obj(chain=chain, expr=list(expr))}}


def _sets(cfg: Config) -> list[dict[str, Any]]:
    size = cfg.enforce.set_size
    cmds = []
    for _, _, addr_type, sfx in _FAMILIES:
        cmds.append({"add": {"set": _obj(name=f"allow{sfx}", type=addr_type, flags=["interval"])}})
        for purpose in ("block", "ratelimit", "reroute", "challenge"):
            cmds.append({"add": {"set": _obj(name=f"{purpose}{sfx}", type=addr_type, size=size,
                                             flags=["interval", "timeout"])}})
        # A set used by `update` is a meter (the kernel marks it dynamic itself).
        for meter in ("rl_meter", "chl_meter"):
            cmds.append({"add": {"set": _obj(name=f"{meter}{sfx}", type=addr_type, size=size,
                                             flags=["timeout"], timeout=METER_TIMEOUT_S)}})
    # The peers each challenged UDP service answered lately (their address and port), kept
    # by EXCHANGE_CHAIN: their exchanges pass the challenge whatever their rate.
    for _, _, addr_type, sfx in _FAMILIES:
        cmds.append({"add": {"set": _obj(name=f"{UDP_PEERS}{sfx}", type=[addr_type, "inet_service"],
                                         size=size, flags=["timeout"], timeout=METER_TIMEOUT_S)}})
    svc_type = ["inet_proto", "inet_service"]
    for name in SERVICE_SETS:
        cmds.append({"add": {"set": _obj(name=name, type=svc_type, size=size, flags=["timeout"])}})
    cmds.append({"add": {"set": _obj(name=SERVICE_METER, type=svc_type, size=size, flags=["timeout"],
                                     timeout=METER_TIMEOUT_S)}})
    cmds.append({"add": {"set": _obj(name=DNAT_PORTS, type=svc_type, size=size, flags=["timeout"],
                                     timeout=DNAT_PORTS_TIMEOUT_S)}})
    return cmds


def _filter_rules(cfg: Config) -> list[dict[str, Any]]:
    rl, srl, mark = cfg.enforce.rate_limit, cfg.enforce.service_rate_limit, cfg.enforce.reroute.mark
    c = FILTER_CHAIN
    # Order is the policy: allowlist first (always wins), then blocks, then limits.
    rules = [_rule(c, _match_saddr(p, f"allow{s}"), _COUNTER, {"accept": None}) for _, p, _, s in _FAMILIES]
    rules += [_rule(c, _match_saddr(p, f"block{s}"), _COUNTER, {"drop": None}) for _, p, _, s in _FAMILIES]
    for _, p, _, s in _FAMILIES:
        meter = {"set": {"op": "update", "elem": {"payload": {"protocol": p, "field": "saddr"}},
                         "set": f"@rl_meter{s}", "stmt": [_limit(rl.packets_per_second, rl.burst)]}}
        rules.append(_rule(c, _match_saddr(p, f"ratelimit{s}"), meter, _COUNTER, {"drop": None}))
    svc_meter = {"set": {"op": "update", "elem": _SVC_KEY, "set": f"@{SERVICE_METER}",
                         "stmt": [_limit(srl.packets_per_second, srl.burst)]}}
    in_svc = {"match": {"op": "==", "left": _SVC_KEY, "right": f"@{SERVICE_SET}"}}
    # Before conntrack there is no ct state: a TCP connection attempt is a bare SYN.
    tcp_syn = _TCP_SYN
    is_udp = {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "udp"}}
    rules.append(_rule(c, tcp_syn, in_svc, svc_meter, _COUNTER, {"drop": None}))
    rules.append(_rule(c, is_udp, in_svc, svc_meter, _COUNTER, {"drop": None}))
    if mark is not None:
        set_mark = {"mangle": {"key": {"meta": {"key": "mark"}}, "value": mark}}
        rules += [_rule(c, _match_saddr(p, f"reroute{s}"), set_mark, _COUNTER) for _, p, _, s in _FAMILIES]
    # A challenged source's or service's SYNs bypass conntrack, so the SYN proxy (in
    # CHALLENGE_CHAIN, after conntrack) answers them with cookies: the listener's queue
    # and the conntrack table never see an unverified SYN. Only SYNs to this host that
    # are not DNAT'd: an untracked SYN is never translated, so a published container or
    # Kubernetes port would be cut off. A DNAT is known only after conntrack, so: a SYN
    # that a local socket takes is proxied; a challenged service with no local socket
    # is not one of this host's (DNAT'd, or closed); a challenged source's SYN to a port
    # with no socket is proxied (a connect scan's resets are then verified) unless that
    # port was seen DNAT'd (DNAT_PORTS, learned from real flows by DNAT_CHAIN).
    # Forwarded SYNs keep conntrack and NAT and never meet the proxy (input hook).
    not_dnat = {"match": {"op": "!=", "left": _SVC_KEY, "right": f"@{DNAT_PORTS}"}}
    for _, p, _, s in _FAMILIES:
        src = _match_saddr(p, f"challenge{s}")
        rules.append(_rule(c, tcp_syn, src, _LOCAL_DST, _LOCAL_SOCKET, {"notrack": None}))
        rules.append(_rule(c, tcp_syn, src, _LOCAL_DST, not_dnat, {"notrack": None}))
    rules.append(_rule(c, tcp_syn, _in_services(CHALLENGE_SERVICE_SET), _LOCAL_DST, _LOCAL_SOCKET,
                       {"notrack": None}))
    # A many-source UDP flood at a challenged service would fill conntrack with one
    # unreplied entry per spoofed flow: its datagrams to a local socket skip conntrack
    # too, and each source gets its own limit (CHALLENGE_CHAIN), exchanges included.
    rules.append(_rule(c, is_udp, _in_services(CHALLENGE_SERVICE_SET), _LOCAL_DST, _LOCAL_SOCKET,
                       {"notrack": None}))
    return rules


# Destined to this host, and a local socket would take it (nft `socket` finds none: no
# match). A DNAT'd port has no local socket before NAT.
_LOCAL_DST = {"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}}, "right": "local"}}
_LOCAL_SOCKET = {"match": {"op": "==", "left": {"socket": {"key": "transparent"}}, "right": {"set": [0, 1]}}}


def _in_services(name: str) -> dict[str, Any]:
    return {"match": {"op": "==", "left": _SVC_KEY, "right": f"@{name}"}}


def _ct_state(*states: str) -> dict[str, Any]:
    return {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": list(states)}}


def _challenge_rules(cfg: Config) -> list[dict[str, Any]]:
    """The input chain of challenges, after conntrack: what a real owner of the address
    passes. TCP: a SYN proxy (the client must answer a SYN cookie before the service sees
    a SYN); anything else unsolicited: a limit per source. Established and related flows,
    and the allowlist, pass untouched. The SYN proxy needs nf_conntrack_tcp_loose=0 in the
    namespace (NftEnforcer sets it while a challenge is in force)."""
    crl, c = cfg.enforce.challenge_rate_limit, CHALLENGE_CHAIN
    is_tcp = {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}
    not_tcp = {"match": {"op": "!=", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}
    is_udp = {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "udp"}}
    rules = [_rule(c, _match_saddr(p, f"allow{s}"), {"accept": None}) for _, p, _, s in _FAMILIES]
    rules.append(_rule(c, _ct_state("established", "related"), {"accept": None}))
    for _, p, _, s in _FAMILIES:
        meter = {"set": {"op": "update", "elem": {"payload": {"protocol": p, "field": "saddr"}},
                         "set": f"@chl_meter{s}",
                         "stmt": [_limit(crl.packets_per_second, crl.burst)]}}
        src = _match_saddr(p, f"challenge{s}")
        rules.append(_rule(c, is_tcp, src, _ct_state("invalid", "untracked"), _COUNTER, SYNPROXY))
        rules.append(_rule(c, is_tcp, src, _ct_state("invalid", "untracked"), {"drop": None}))
        rules.append(_rule(c, not_tcp, src, meter, _COUNTER, {"drop": None}))
        family = {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}},
                            "right": "ipv4" if p == "ip" else "ipv6"}}
        # A peer the service answered lately is in an exchange (its datagrams skip
        # conntrack here, so `established` cannot say so): never limited, at any rate.
        peer = {"match": {"op": "==", "left": {"concat": [
            {"payload": {"protocol": p, "field": "saddr"}}, {"payload": {"protocol": "udp", "field": "sport"}}]},
            "right": f"@{UDP_PEERS}{s}"}}
        rules.append(_rule(c, family, is_udp, _in_services(CHALLENGE_SERVICE_SET), peer, {"accept": None}))
        rules.append(_rule(c, family, is_udp, _in_services(CHALLENGE_SERVICE_SET), meter,
                           _COUNTER, {"drop": None}))
    svc = _in_services(CHALLENGE_SERVICE_SET)
    rules.append(_rule(c, is_tcp, svc, _ct_state("invalid", "untracked"), _COUNTER, SYNPROXY))
    rules.append(_rule(c, is_tcp, svc, _ct_state("invalid", "untracked"), {"drop": None}))
    return rules


def _exchange_rules() -> list[dict[str, Any]]:
    """The output chain that records, per challenged UDP service, the peers it answers."""
    out = []
    from_svc = {"match": {"op": "==", "right": f"@{CHALLENGE_SERVICE_SET}", "left": {
        "concat": [{"meta": {"key": "l4proto"}}, {"payload": {"protocol": "th", "field": "sport"}}]}}}
    for _, p, _, s in _FAMILIES:
        family = {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}},
                            "right": "ipv4" if p == "ip" else "ipv6"}}
        peer = {"concat": [{"payload": {"protocol": p, "field": "daddr"}},
                           {"payload": {"protocol": "udp", "field": "dport"}}]}
        is_udp = {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "udp"}}
        out.append(_rule(EXCHANGE_CHAIN, family, is_udp, from_svc,
                         {"set": {"op": "update", "elem": peer, "set": f"@{UDP_PEERS}{s}"}}))
    return out


def _dnat_rules() -> list[dict[str, Any]]:
    """DNAT_CHAIN (forward) and CHALLENGE_CHAIN (input, a redirect) learn the ports that
    the host's own NAT rules (Docker, kube-proxy) translate, from each new DNAT'd flow.
    Never from a rerouted source: the agent's own DNAT (NAT_CHAIN) would let it teach any
    port, and so take the SYN proxy off a challenged source's closed ports."""
    out = []
    # `ct original proto-dst` has a type only for a known protocol.
    for proto, (_, p, _, s) in ((proto, fam) for proto in _PROTOS for fam in _FAMILIES):
        not_rerouted = {"match": {"op": "!=", "left": {"payload": {"protocol": p, "field": "saddr"}},
                                  "right": f"@reroute{s}"}}
        learn = [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": proto}},
                 not_rerouted, _ct_state("new"),
                 {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}},
                 {"set": {"op": "update", "set": f"@{DNAT_PORTS}", "elem": {"concat": [
                     {"meta": {"key": "l4proto"}}, {"ct": {"key": "proto-dst", "dir": "original"}}]}}}]
        out += [_rule(DNAT_CHAIN, *learn), {"insert": {"rule": _obj(chain=CHALLENGE_CHAIN, expr=learn)}}]
    return out


def syn_wait_text() -> str:
    """A second transaction (text: libnftables 1.0.6 drops a JSON `ct timeout` policy):
    a challenged SYN that kept conntrack (DNAT'd, forwarded, or to a closed port) has an
    entry, not yet confirmed, after conntrack and before NAT (SYN_WAIT_CHAIN, priority
    -150); it gets SYN_WAIT_S to complete its handshake. A kernel without conntrack
    timeout policies refuses it, and only this is missing."""
    t, syn = f"{FAMILY} {TABLE}", "tcp flags & (fin|syn|rst|ack) == syn"
    lines = [f"add ct timeout {t} {SYN_WAIT} {{ protocol tcp; l3proto inet; "
             f"policy = {{ syn_sent: {SYN_WAIT_S}, syn_recv: {SYN_WAIT_S} }}; }}"]
    lines += [f'add rule {t} {SYN_WAIT_CHAIN} {syn} {p} saddr @challenge{s} counter ct timeout set "{SYN_WAIT}"'
              for _, p, _, s in _FAMILIES]
    lines.append(f'add rule {t} {SYN_WAIT_CHAIN} {syn} meta l4proto . th dport @{CHALLENGE_SERVICE_SET} '
                 f'counter ct timeout set "{SYN_WAIT}"')
    return "\n".join(lines) + "\n"


def _nat_rules(cfg: Config) -> list[dict[str, Any]]:
    rr = cfg.enforce.reroute
    sinks = [(p, s, addr) for (_, p, _, s), addr in zip(_FAMILIES, (rr.sinkhole_v4, rr.sinkhole_v6)) if addr]
    if not sinks:
        return []
    cmds = [{"add": {"chain": _obj(name=NAT_CHAIN, type="nat", hook="prerouting", prio=-100,
                                   policy="accept")}}]
    cmds += [_rule(NAT_CHAIN, _match_saddr(p, f"allow{s}"), {"accept": None}) for _, p, _, s in _FAMILIES]
    cmds += [_rule(NAT_CHAIN, _match_saddr(p, f"reroute{s}"), _COUNTER, {"dnat": {"family": p, "addr": addr}})
             for p, s, addr in sinks]
    return cmds


def table_batch(cfg: Config, contents: Mapping[str, SetContents], now: float) -> list[dict[str, Any]]:
    """Commands that replace the whole table atomically with one holding `contents`.

    `add table; delete table` first makes the delete succeed whether or not it existed."""
    table = {"family": FAMILY, "name": TABLE}
    cmds: list[dict[str, Any]] = [{"add": {"table": table}}, {"delete": {"table": table}},
                                  {"add": {"table": table}}, *_sets(cfg)]
    cmds.append({"add": {"chain": _obj(name=FILTER_CHAIN, type="filter", hook="prerouting", prio=-300,
                                       policy="accept")}})
    cmds += _filter_rules(cfg) + _nat_rules(cfg)
    cmds.append({"add": {"chain": _obj(name=CHALLENGE_CHAIN, type="filter", hook="input", prio=-5,
                                       policy="accept")}})
    cmds += _challenge_rules(cfg)
    cmds.append({"add": {"chain": _obj(name=EXCHANGE_CHAIN, type="filter", hook="output", prio=-5,
                                       policy="accept")}})
    cmds += _exchange_rules()
    cmds.append({"add": {"chain": _obj(name=DNAT_CHAIN, type="filter", hook="forward", prio=-5,
                                       policy="accept")}})
    cmds.append({"add": {"chain": _obj(name=SYN_WAIT_CHAIN, type="filter", hook="prerouting", prio=-150,
                                       policy="accept")}})
    cmds += _dnat_rules()
    cmds += [{"add": {"chain": _obj(name=name, type="filter", hook=hook, prio=-10, policy="accept")}}
             for name, hook in ISOLATION_CHAINS]
    cmds += [{"add": {"chain": _obj(name=name, type="filter", hook=hook, prio=-20, policy="accept")}}
             for name, hook in EGRESS_CHAINS]
    for name in ELEMENT_SETS:
        elems = elements_json(contents.get(name, {}), now)
        if elems:
            cmds.append(element_cmd("add", name, elems))
    return cmds
