"""The mesh's trust policy: which proposals become fleet decisions. Pure: no I/O, no clock;
the decider passes `now` and the history it read from the store.

A proposal (a dict: proposal_id, node, provider, target, rule, rule_version, incident_id,
operator, evidence, created_at, ttl_s, event_class, received_at; `node` and `provider` are
the CN and O of the proposing node's client certificate) ends in one of four outcomes:

- refuse: the proposing node's certificate was revoked (`swarm-mesh node-revoke`); the
  target is malformed, wider than the maximum prefix, or overlaps an
  allowlisted range (the fleet's own infrastructure, CGNAT 100.64.0.0/10, private, loopback,
  link-local, multicast, unspecified ranges, the IPv6 forms that carry IPv4 (mapped,
  compatible, NAT64, Teredo; a 6to4 network is judged as its IPv4 too: mesh/translated.py),
  configured CDN/crawler ranges); the node is over its proposal rate; the proposal is stale or names neither a
  rule nor an operator; or an operator revoked the target, or a network overlapping it,
  and the revocation still stands;
- pending: not yet corroborated (fewer than `min_nodes` distinct nodes of `min_providers`
  distinct providers proposed this target, or a network covering it, within the window);
  the proposal stays recorded and counts when the next ones arrive;
- active: the target already has an active block (nothing new to publish);
- decide: a block decision. Its lifetime is the lower median of the lifetimes the
  corroborating proposals asked for (the default when they asked none), capped. With
  staging on (`stage_s` > 0) it is scoped to a canary first: the proposing nodes (they
  already block it locally, so the canary costs nothing) plus `stage_canary` (named nodes,
  or that many other known nodes), and promoted to every node after `stage_s`.

A proposal that carries `operator` is one node's vote like any other. A human acting on the
mesh itself (`swarm-mesh block`) is authoritative: no corroboration, no staging unless
`stage_operator`, but still bound by the allowlists, the prefix limit and the lifetime cap.

Votes: one per node (its newest proposal for the target or a network covering it); a
proposal that was refused (rate limit, stale, ...) is no vote, nor is one from a node
whose certificate names no provider (O), nor one sent with a certificate a node
revocation covers (the store leaves those out of the votes); providers compare case-folded with whitespace
collapsed ("Acme " and "acme" are one provider). An operator's revocation that still
stands refuses every proposal whose target overlaps the revoked one (covering or inside).

What a decision carries is bounded, whatever the voters sent, so a signed envelope stays
well under agent.fleet.decision.MAX_BODY_BYTES (budgets in mesh/bounds.py): each
provenance list keeps at most PROVENANCE_MAX_ITEMS entries (node_count, provider_count,
rule_count, proposal_count say how many there were), each string at most
PROVENANCE_MAX_BYTES of JSON, the reason REASON_MAX_BYTES; a canary scope names whole node
names until SCOPE_MAX_BYTES (the rest get the decision when it is promoted).
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
from dataclasses import dataclass
from typing import Any, Iterable

from agent.fleet.decision import MAX_LIFETIME_S, Decision, DecisionError, normalize_target
from mesh.bounds import REASON_MAX_BYTES, SCOPE_MAX_BYTES, bounded as _bounded, short
from mesh import translated
from mesh.revocation import covers

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Never blocked fleet-wide, whatever the config says: (label, network).
ALWAYS_ALLOWED: tuple[tuple[str, str], ...] = (
    ("CGNAT", "100.64.0.0/10"),
    ("private (RFC 1918)", "10.0.0.0/8"),
    ("private (RFC 1918)", "172.16.0.0/12"),
    ("private (RFC 1918)", "192.168.0.0/16"),
    ("loopback", "127.0.0.0/8"),
    ("link-local", "169.254.0.0/16"),
    ("multicast", "224.0.0.0/4"),
    ("unspecified", "0.0.0.0/8"),
    ("broadcast", "255.255.255.255/32"),
    ("loopback", "::1/128"),
    ("unspecified", "::/128"),
    ("link-local", "fe80::/10"),
    ("unique local (private)", "fc00::/7"),
    ("multicast", "ff00::/8"),
) + translated.REFUSED

def provider_key(provider: Any) -> str:
    """The provider a certificate's O names: case-folded, whitespace collapsed."""
    return " ".join(str(provider or "").split()).casefold()


_DEFAULTS: dict[str, Any] = {
    "infrastructure": [], "allowlist": [], "max_prefix_v4": 24, "max_prefix_v6": 48,
    "rate_limit": 30, "rate_window_s": 600.0, "min_nodes": 3, "min_providers": 2,
    "corroboration_window_s": 1800.0, "default_ttl_s": 3600.0, "max_ttl_s": 86400.0,
    "stage_s": 60.0, "stage_canary": 0, "stage_operator": False,
}


def defaults() -> dict[str, Any]:
    """The policy settings and their defaults (what an empty `policy:` means)."""
    return {k: (list(v) if isinstance(v, list) else v) for k, v in _DEFAULTS.items()}


def _number(name: str, value: Any, low: float, high: float, integer: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"policy {name} must be a number, not {value!r}")
    if integer and value != int(value):
        raise ValueError(f"policy {name} must be a whole number, not {value!r}")
    if not low <= value <= high:
        raise ValueError(f"policy {name} must be between {low:g} and {high:g}, not {value!r}")
    return int(value) if integer else float(value)


def _networks(name: str, value: Any) -> tuple[tuple[str, Network], ...]:
    """A list of CIDRs, or a mapping label -> list of CIDRs (e.g. per CDN)."""
    if value is None:
        return ()
    groups = value.items() if isinstance(value, dict) else [(name, value)]
    out = []
    for label, nets in groups:
        if isinstance(nets, str) or not isinstance(nets, (list, tuple)):
            raise ValueError(f"policy {name} ({label}) must be a list of networks")
        for n in nets:
            try:
                out.append((str(label), ipaddress.ip_network(str(n).strip(), strict=False)))
            except ValueError:
                raise ValueError(f"policy {name} ({label}): {n!r} is not a network") from None
    return tuple(out)


@dataclass(frozen=True)
class PolicyConfig:
    """The `policy:` section of the mesh configuration, validated (see _DEFAULTS)."""
    allowed: tuple[tuple[str, Network], ...] = ()
    max_prefix_v4: int = 24
    max_prefix_v6: int = 48
    rate_limit: int = 30
    rate_window_s: float = 600.0
    min_nodes: int = 3
    min_providers: int = 2
    corroboration_window_s: float = 1800.0
    default_ttl_s: float = 3600.0
    max_ttl_s: float = 86400.0
    stage_s: float = 60.0
    stage_canary: int | tuple[str, ...] = 0
    stage_operator: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "PolicyConfig":
        d = {} if d is None else d
        if not isinstance(d, dict):
            raise ValueError("the policy section must be a mapping")
        unknown = sorted(set(d) - set(_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown policy setting {unknown[0]!r}")
        v = {**_DEFAULTS, **d}
        canary = v["stage_canary"]
        if isinstance(canary, (list, tuple)):
            if not all(isinstance(n, str) and n for n in canary):
                raise ValueError("policy stage_canary must be a count or a list of node names")
            canary = tuple(canary)
        else:
            canary = _number("stage_canary", canary, 0, 10000, integer=True)
        if not isinstance(v["stage_operator"], bool):
            raise ValueError("policy stage_operator must be true or false")
        cfg = cls(
            allowed=tuple((f"infrastructure ({lbl})" if lbl != "infrastructure" else lbl, n)
                          for lbl, n in _networks("infrastructure", v["infrastructure"]))
            + _networks("allowlist", v["allowlist"]),
            max_prefix_v4=_number("max_prefix_v4", v["max_prefix_v4"], 16, 32, integer=True),
            max_prefix_v6=_number("max_prefix_v6", v["max_prefix_v6"], 32, 128, integer=True),
            rate_limit=_number("rate_limit", v["rate_limit"], 1, 1_000_000, integer=True),
            rate_window_s=_number("rate_window_s", v["rate_window_s"], 1, 86400),
            min_nodes=_number("min_nodes", v["min_nodes"], 1, 1000, integer=True),
            min_providers=_number("min_providers", v["min_providers"], 1, 1000, integer=True),
            corroboration_window_s=_number("corroboration_window_s",
                                           v["corroboration_window_s"], 1, 7 * 86400),
            default_ttl_s=_number("default_ttl_s", v["default_ttl_s"], 1, MAX_LIFETIME_S),
            max_ttl_s=_number("max_ttl_s", v["max_ttl_s"], 1, MAX_LIFETIME_S),
            stage_s=_number("stage_s", v["stage_s"], 0, 86400),
            stage_canary=canary, stage_operator=v["stage_operator"])
        if cfg.min_providers > cfg.min_nodes:
            raise ValueError("policy min_providers cannot be more than min_nodes")
        if cfg.default_ttl_s > cfg.max_ttl_s:
            raise ValueError("policy default_ttl_s cannot be more than max_ttl_s")
        return cfg


@dataclass(frozen=True)
class Outcome:
    """What became of a proposal or an operator's request. kind: decide | refuse | pending |
    active; `decision` for decide; `reason` says why (for refuse: the recorded reason)."""
    kind: str
    reason: str = ""
    decision: Decision | None = None
    covering: tuple[dict[str, Any], ...] = ()   # a revoke: covering blocks still in force


def _refuse(reason: str) -> Outcome:
    return Outcome("refuse", reason)


def _lower_median(values: list[float]) -> float:
    values = sorted(values)
    return values[(len(values) - 1) // 2]


class Policy:
    """Decides under a PolicyConfig. Every method is pure: history and `now` come in."""

    def __init__(self, config: PolicyConfig):
        self.config = config
        self.allowed = tuple((lbl, ipaddress.ip_network(n)) for lbl, n in ALWAYS_ALLOWED) \
            + config.allowed

    # -- the checks every decision passes, whoever asks -----------------------------------
    def check_target(self, target: Any) -> tuple[str, Network | None]:
        """(normalized target, network) or (refusal reason, None)."""
        try:
            norm = normalize_target(target)
        except DecisionError as e:
            return f"invalid target: {e}", None
        net = ipaddress.ip_network(norm)
        limit = self.config.max_prefix_v4 if net.version == 4 else self.config.max_prefix_v6
        if net.prefixlen < limit:
            return f"prefix /{net.prefixlen} is wider than the limit of /{limit}", None
        why = self._allowlisted(norm, net)
        v4 = translated.embedded_v4(net)
        if not why and v4 is not None:       # 6to4: judged as the IPv4 it carries, too
            if v4.prefixlen < self.config.max_prefix_v4:
                why = (f"{norm} carries the IPv4 network {v4} (6to4), wider than the limit "
                       f"of /{self.config.max_prefix_v4}")
            elif (inner := self._allowlisted(str(v4), v4)):
                why = f"{norm} carries {v4} (6to4): {inner}"
        return (why, None) if why else (norm, net)

    def _allowlisted(self, norm: str, net: Network) -> str:
        """The refusal reason when `net` overlaps an allowlisted range, else ""."""
        for label, allowed in self.allowed:
            if allowed.version == net.version and net.overlaps(allowed):
                return f"{norm} overlaps the allowlisted {label} range {allowed}"
        return ""

    def lifetime(self, requested: Iterable[Any]) -> float:
        asked = [float(t) for t in requested
                 if not isinstance(t, bool) and isinstance(t, (int, float)) and t > 0]
        ttl = _lower_median(asked) if asked else self.config.default_ttl_s
        return min(ttl, self.config.max_ttl_s, MAX_LIFETIME_S)

    # -- proposals ------------------------------------------------------------------------
    def evaluate(self, p: dict[str, Any], *, now: float, node_count: int,
                 votes: Iterable[dict[str, Any]], latest: dict[str, Any] | None,
                 known_nodes: Iterable[str] = (),
                 revoked: Iterable[dict[str, Any]] = (),
                 node_revoked_at: float | None = None) -> Outcome:
        """The outcome of proposal `p`. `node_count`: proposals from p's node received in
        the last rate_window_s, p included. `votes`: stored proposals, not refused, for p's
        target or a network covering it (extra ones are filtered out here). `latest`: the
        target's latest decision (a dict with its fields) or None. `known_nodes`: the
        fleet's nodes, to draw `stage_canary` extra canaries from. `revoked`: revocations
        still standing (each its target's latest decision, unexpired), any target.
        `node_revoked_at`: the latest revocation of p's node (None: never revoked); it
        covers p when p's certificate (cert_not_before) is not newer."""
        cfg = self.config
        if covers(node_revoked_at, float(p.get("cert_not_before") or 0)):
            return _refuse(f"the certificate of node {p.get('node')} that sent this proposal "
                           "was revoked (swarm-mesh node-revoke): its proposals no longer count")
        if node_count > cfg.rate_limit:
            return _refuse(f"rate limit: {node_count} proposals from {p.get('node')} in "
                           f"{cfg.rate_window_s:.0f} s (limit {cfg.rate_limit})")
        target, net = self.check_target(p.get("target"))
        if net is None:
            return _refuse(target)
        if not p.get("rule") and not p.get("operator"):
            return _refuse("the proposal names neither a rule nor an operator")
        if self._stale(p, now):
            return _refuse(f"stale: created more than {cfg.corroboration_window_s:.0f} s "
                           f"before it was received, or already expired")
        since = now - cfg.corroboration_window_s
        if latest is not None and latest.get("expires_at", 0) > now:
            if latest.get("action") == "block":
                return Outcome("active", f"{target} is already blocked until "
                                         f"{latest['expires_at']:.0f}")
            prov = latest.get("provenance") or {}
            if prov.get("kind") == "operator":
                return _refuse(f"revoked by operator {prov.get('operator', '?')} until "
                               f"{latest['expires_at']:.0f}")
        standing = self._revocation_over(net, revoked, now)
        if standing is not None:
            prov = standing.get("provenance") or {}
            return _refuse(f"overlaps {standing['target']}, revoked by operator "
                           f"{prov.get('operator', '?')} until {standing['expires_at']:.0f}")
        if latest is not None:
            since = max(since, float(latest.get("issued_at", 0)))   # a decision uses its votes
        counted = self._votes(p, target, net, votes, since, now)
        nodes = sorted({v["node"] for v in counted})
        providers = sorted({provider_key(v.get("provider")) for v in counted})
        if len(nodes) < cfg.min_nodes or len(providers) < cfg.min_providers:
            return Outcome("pending", f"waiting for corroboration: {len(nodes)} of "
                                      f"{cfg.min_nodes} nodes, {len(providers)} of "
                                      f"{cfg.min_providers} providers")
        rules = {f"{v['rule']}@{v.get('rule_version', '')}".rstrip("@")
                 for v in counted if v.get("rule")}
        operators = {v["operator"] for v in counted if v.get("operator")}
        provenance = {"kind": "corroborated", "nodes": _bounded(nodes),
                      "providers": _bounded(providers), "rules": _bounded(rules),
                      "proposals": _bounded(v["proposal_id"] for v in counted),
                      "node_count": len(nodes), "provider_count": len(providers),
                      "rule_count": len(rules), "proposal_count": len(counted)}
        if operators:
            provenance["operators"] = _bounded(operators)
        ttl = self.lifetime(v.get("ttl_s") for v in counted)
        why = ", ".join(sorted(rules or operators))
        decision = Decision(action="block", target=target, issued_at=now, expires_at=now + ttl,
                            reason=short(f"corroborated by {len(nodes)} nodes of "
                                         f"{len(providers)} providers: {why}", REASON_MAX_BYTES),
                            provenance=provenance, scope=self._scope(target, nodes, known_nodes))
        return Outcome("decide", decision.reason, decision)

    @staticmethod
    def _revocation_over(net: Network, revoked: Iterable[dict[str, Any]],
                         now: float) -> dict[str, Any] | None:
        """An operator's standing revocation of a target overlapping `net`, if any."""
        for r in revoked:
            if r.get("action") != "revoke" or float(r.get("expires_at", 0)) <= now \
                    or (r.get("provenance") or {}).get("kind") != "operator":
                continue
            try:
                rnet = ipaddress.ip_network(r["target"])
            except (KeyError, ValueError, TypeError):
                continue
            if rnet.version == net.version and rnet.overlaps(net):
                return r
        return None

    def _stale(self, p: dict[str, Any], now: float) -> bool:
        created = p.get("created_at") or 0
        received = p.get("received_at") or now
        ttl = p.get("ttl_s") or 0
        if not isinstance(created, (int, float)) or not created:
            return False                # no claim about its age: judged by received_at
        return created < received - self.config.corroboration_window_s \
            or (ttl > 0 and created + ttl <= now)

    def _votes(self, p, target, net, votes, since, now) -> list[dict[str, Any]]:
        """One vote per node: p itself, else the node's newest stored proposal received
        since `since` for the target or a network that covers it, not stale. A node whose
        certificate names no provider casts no vote (it could pose as a second provider)."""
        out: dict[str, dict[str, Any]] = {}
        if provider_key(p.get("provider")):
            out[p["node"]] = p
        for v in sorted(votes, key=lambda v: float(v.get("received_at") or 0), reverse=True):
            if not provider_key(v.get("provider")) or v.get("node") in out:
                continue
            try:
                vnet = ipaddress.ip_network(v["target"], strict=True)
            except (KeyError, ValueError, TypeError):
                continue
            if vnet.version != net.version or not net.subnet_of(vnet):
                continue
            if float(v.get("received_at") or 0) < since or self._stale(v, now):
                continue
            if self.check_target(v["target"])[1] is None:
                continue                # a refused proposal (wide, allowlisted) is no vote
            out[v["node"]] = v
        return list(out.values())

    def _scope(self, target: str, nodes: list[str], known: Iterable[str],
               operator: bool = False) -> dict[str, Any]:
        cfg = self.config
        if cfg.stage_s <= 0 or (operator and not cfg.stage_operator):
            return {"stage": "all"}
        # Named canaries first, then the proposing nodes (in a per-target hash order),
        # then drawn ones, while the names fit in SCOPE_MAX_BYTES: node names are whole
        # (an agent compares its own), so those that do not fit wait for the promotion.
        order = lambda n: hashlib.sha256(f"{target}|{n}".encode()).digest()  # noqa: E731
        wanted = list(cfg.stage_canary) if isinstance(cfg.stage_canary, tuple) else []
        wanted += sorted(set(nodes) - set(wanted), key=order)
        if isinstance(cfg.stage_canary, int) and cfg.stage_canary:
            # Other nodes, drawn per target (a stable hash order), so one node is not the
            # canary of every decision.
            others = sorted((n for n in set(known) if n not in set(wanted)), key=order)
            wanted += others[:cfg.stage_canary]
        canary: list[str] = []
        used = 0
        for n in wanted:
            size = len(json.dumps(n, ensure_ascii=True)) + 1
            if n in canary or used + size > SCOPE_MAX_BYTES:
                continue
            canary.append(n)
            used += size
        return {"stage": "canary", "nodes": sorted(canary)}

    # -- staged rollout -------------------------------------------------------------------
    def promotion(self, d: dict[str, Any], latest: dict[str, Any] | None,
                  now: float) -> Decision | None:
        """The all-nodes decision that replaces canary decision `d`, when `d` is still its
        target's latest (not revoked or replaced), published, unexpired and was out for
        stage_s; else None. Same expiry; issued now, so agents take it as the newer."""
        if d.get("action") != "block" or (d.get("scope") or {}).get("stage") != "canary":
            return None
        if latest is None or latest.get("id") != d.get("id") or latest.get("state") != "published":
            return None
        if now < d["issued_at"] + self.config.stage_s or d["expires_at"] <= now:
            return None
        return Decision(action="block", target=d["target"], issued_at=now,
                        expires_at=d["expires_at"], reason=d.get("reason", ""),
                        provenance={**(d.get("provenance") or {}), "promoted_from": d["id"]},
                        scope={"stage": "all"})

    # -- a human on the mesh --------------------------------------------------------------
    def operator_block(self, target: Any, ttl_s: float | None, reason: str, operator: str,
                       now: float) -> Outcome:
        if not operator:
            return _refuse("an operator block names the operator")
        norm, net = self.check_target(target)
        if net is None:
            return _refuse(norm)
        ttl = self.lifetime([ttl_s] if ttl_s else [])
        operator = short(operator)
        d = Decision(action="block", target=norm, issued_at=now, expires_at=now + ttl,
                     reason=short(reason or f"blocked by operator {operator}", REASON_MAX_BYTES),
                     provenance={"kind": "operator", "operator": operator},
                     scope=self._scope(norm, [], (), operator=True))
        return Outcome("decide", d.reason, d)

    def operator_revoke(self, target: Any, latest: dict[str, Any] | None, reason: str,
                        operator: str, now: float, outlive: float = 0.0) -> Outcome:
        """A revoke of the target's active block, kept until that block would have expired,
        and until `outlive` (the latest expiry of any block ever issued for the target):
        agents forget a revoke when it expires, and a relay replaying an older, longer
        block then would block the target again."""
        if not operator:
            return _refuse("an operator revocation names the operator")
        try:
            norm = normalize_target(target)
        except DecisionError as e:
            return _refuse(f"invalid target: {e}")
        if latest is None or latest.get("action") != "block" or latest.get("expires_at", 0) <= now:
            return _refuse(f"{norm} has no active block to revoke")
        operator = short(operator)
        d = Decision(action="revoke", target=norm, issued_at=now,
                     expires_at=min(max(float(latest["expires_at"]), outlive, now + 1.0),
                                    now + MAX_LIFETIME_S),
                     reason=short(reason or f"revoked by operator {operator}", REASON_MAX_BYTES),
                     provenance={"kind": "operator", "operator": operator},
                     revokes=latest["id"])
        return Outcome("decide", d.reason, d)


def decision_from_row(row: dict[str, Any]) -> Decision:
    """A Decision from a store row (its fields plus store columns such as state and seq)."""
    return Decision(**{k: row[k] for k in Decision.__dataclass_fields__ if k in row})

