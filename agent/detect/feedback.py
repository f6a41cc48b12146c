"""Feedback matching: which findings an operator's false-positive verdicts keep from the
responder. Pure functions over agent.model.Feedback records and findings.

A record matches a finding when the rule id is the same (the version is recorded, never
matched: a new version of a rule that was wrong about this is still wrong about it) AND
the record's scope holds the finding's -- all of it: a finding that names the excused
executable beside a miner, or the excused destination beside a new one, is not the
pattern the operator excused and still alerts:
- exe: every executable the finding names (sha256, or kernel file id where it has no
  sha256) is the record's,
- address: the CIDR contains the entity's address and every destination it names,
- cgroup: the finding's cgroup is the path or below it,
- container: the same container id,
- node: every finding of the rule on this node (only when asked for by name).
What the scope is read from is kernel-given (cgroup paths, executable identities, the
addresses of connections), never a process's own claim (comm, argv).

An exception silences exactly one rule: a record never matches another rule's finding,
so a different detector (or a different behaviour of the same workload that another
rule sees) still alerts. Choosing and checking a record's scope (`default_scope`,
`check_scope`) refuses with one sentence what would silence more than the incident shows.
"""
from __future__ import annotations

import ipaddress
import re
from typing import Any, Iterable, Mapping, Sequence

from agent.model import FEEDBACK_SCOPES, Feedback, Finding

DEFAULT_TTL_S = 30 * 86400.0
# The widest address scope accepted without --force: a /16 of IPv4, a /32 of IPv6.
MAX_PREFIX_WIDTH = {4: 16, 6: 32}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# The order the default scope is chosen in: the narrowest thing that explains the pattern.
_DEFAULT_ORDER = ("address", "exe", "container", "cgroup")


def scopes_of(entity: str, evidence: Mapping[str, Any], node: str,
              defaults: bool = False) -> dict[str, set[str]]:
    """What a finding can be scoped to: {kind: values}, from its evidence's "scope"
    (the anomaly engine's), its top-level evidence (the rules': exe_sha256, cgroup,
    container) and its entity ("ip:ADDR", "cgroup:PATH"). With `defaults`, what a
    default scope may be chosen from: of a window model's finding, executables and
    destinations only where something new of their kind drove it (the workload's usual
    database beside a new helper is not what the verdict was about)."""
    out: dict[str, set[str]] = {k: set() for k in FEEDBACK_SCOPES}
    scope = evidence.get("scope")
    scope = scope if isinstance(scope, Mapping) else {}
    for key, kind in (("exe_sha256", "exe"), ("exe_id", "exe"), ("dst", "address"),
                      ("cgroup", "cgroup"), ("container", "container"),
                      ("container_id", "container")):
        for source in (scope, evidence):
            out[kind].update(_texts(source.get(key)))
    kind, _, value = entity.partition(":")
    if kind == "ip" and value:
        out["address"].add(value)
    elif kind == "cgroup" and value:
        out["cgroup"].add(value)
    out["node"].update(_texts(scope.get("node")) or {node})
    out["address"] = {a for a in out["address"] if _address(a) is not None}
    out["cgroup"] = {c for c in out["cgroup"] if c.startswith("/")}
    new = evidence.get("new")
    if defaults and isinstance(new, Mapping) and evidence.get("detector") != "beacon":
        if not new.get("dsts"):
            out["address"] = set()
        if not new.get("exes"):
            out["exe"] = set()
    return {k: v for k, v in out.items() if v}


def _identities(have: set[str]) -> set[str]:
    """A finding's executables, each once: its sha256s where every one it names has one
    (the same program is named by both), else all it names (one without a sha256 is not
    held by a record of another's)."""
    shas = {v for v in have if _SHA256.match(v)}
    ids = have - shas
    return shas if shas and len(ids) <= len(shas) else have


def covers(kind: str, value: str, have: set[str]) -> bool:
    """Whether a record's scope holds ALL of a finding's values of `kind` (and it has
    some): what a record keeps back is exactly what it excused."""
    have = _identities(have) if kind == "exe" else have
    return bool(have) and all(scope_holds(kind, value, (v,)) for v in have)


def matches(rec: Feedback, finding: Finding, node: str, now: float) -> bool:
    """Whether `rec` (live at `now`) keeps `finding` from the responder."""
    if not rec.live(now) or rec.rule != finding.rule_id:
        return False
    have = scopes_of(finding.entity, finding.evidence, node).get(rec.scope_kind, set())
    return covers(rec.scope_kind, rec.scope_value, have)


def scope_holds(kind: str, value: str, have: Iterable[str]) -> bool:
    """Whether a record's scope (kind, value) holds any of a finding's values of kind."""
    if kind == "address":
        net = _network(value)
        return net is not None and any(
            (a := _address(v)) is not None and a.version == net.version and a in net
            for v in have)
    if kind == "cgroup":
        root = value.rstrip("/") or "/"
        return any(v == root or v.startswith(root + "/") or root == "/" for v in have)
    return value in have


def match(records: Sequence[Feedback], finding: Finding, node: str,
          now: float) -> Feedback | None:
    """The first live record that matches `finding`, or None (its scope read once)."""
    have: dict[str, set[str]] | None = None
    for rec in records:
        if not rec.live(now) or rec.rule != finding.rule_id:
            continue
        if have is None:
            have = scopes_of(finding.entity, finding.evidence, node)
        if covers(rec.scope_kind, rec.scope_value, have.get(rec.scope_kind, set())):
            return rec
    return None


def default_scope(scopes: Mapping[str, set[str]]) -> tuple[str, str]:
    """The most specific scope an incident's findings give: one destination address
    (/32, /128), else one executable (by its sha256: a file id only when named), else one
    container, else one cgroup. Never the node. Raises ValueError with a sentence when
    none is single."""
    for kind in _DEFAULT_ORDER:
        values = scopes.get(kind, set())
        if kind == "exe":
            # By content only: a kernel file id (device, inode) is reused once the file is
            # deleted, and an exception must not pass to whatever file gets it next.
            values = {v for v in values if _SHA256.match(v)}
        if len(values) == 1:
            value = next(iter(values))
            if kind == "address":
                a = _address(value)
                assert a is not None
                value = f"{a}/{a.max_prefixlen}"
            return kind, value
    have = ", ".join(f"{k} ({len(v)})" for k, v in sorted(scopes.items())) or "none"
    raise ValueError("the incident's findings give no single narrow scope (they have: "
                     f"{have}); choose one with --scope KIND=VALUE")


def check_scope(kind: str, value: str | None, scopes: Mapping[str, set[str]], node: str,
                force: bool = False) -> tuple[str, str]:
    """An operator's --scope KIND[=VALUE] checked against what the incident has:
    normalised (kind, value), or ValueError with a sentence."""
    if kind not in FEEDBACK_SCOPES:
        raise ValueError(f"unknown scope kind {kind!r} (one of {', '.join(FEEDBACK_SCOPES)})")
    have = scopes.get(kind, set())
    if kind == "node":
        if value not in (None, "", node):
            raise ValueError(f"scope node={value} is not this node ({node})")
        return kind, node
    if not value:
        if kind == "exe":      # the content hash names the program; a file id only a file
            shas = {v for v in have if _SHA256.match(v)}
            if not shas and have:
                raise ValueError("this incident's executables have no sha256, only kernel "
                                 "file ids, which the filesystem reuses once the file is "
                                 "deleted; name one with --scope exe=MAJOR:MINOR:INODE if you "
                                 "mean that file")
            have = shas
        if len(have) != 1:
            return _none(kind, have)
        return default_scope({kind: have}) if kind == "address" else (kind, next(iter(have)))
    if kind == "address":
        net = _network(value)
        if net is None:
            raise ValueError(f"scope address={value}: not an IP address or CIDR")
        widest = MAX_PREFIX_WIDTH[net.version]
        if net.prefixlen < widest and not force:
            raise ValueError(f"scope address={net} is wider than /{widest} for IPv"
                             f"{net.version}; give --force to silence that many addresses")
        value = str(net)
    elif kind == "cgroup":
        if not value.startswith("/"):
            raise ValueError(f"scope cgroup={value}: a cgroup is an absolute path")
        value = value.rstrip("/") or "/"
        if value == "/" and not force:
            raise ValueError("scope cgroup=/ is every workload on the node; give --force "
                             "(or --scope node) to mean that")
    if not scope_holds(kind, value, have):
        shown = ", ".join(sorted(have)[:5]) or "none"
        raise ValueError(f"scope {kind}={value} does not cover this incident (its {kind} "
                         f"values: {shown})")
    return kind, value


def parse_scope(text: str) -> tuple[str, str | None]:
    """"address=10.0.0.0/24" -> ("address", "10.0.0.0/24"); "node" -> ("node", None)."""
    kind, sep, value = text.partition("=")
    return kind.strip(), (value.strip() if sep else None)


def check_ttl(ttl_s: float | None, max_ttl_s: float) -> float:
    """A record's lifetime: default DEFAULT_TTL_S (within the cap), (0, max_ttl_s]."""
    if ttl_s is None:
        return min(DEFAULT_TTL_S, max_ttl_s)
    if not ttl_s > 0 or ttl_s > max_ttl_s or ttl_s != ttl_s:
        raise ValueError(f"the feedback lifetime must be more than 0 and at most "
                         f"{max_ttl_s:g} s (feedback.max_ttl_s), got {ttl_s:g}")
    return float(ttl_s)


def _none(kind: str, have: set[str]) -> tuple[str, str]:
    if not have:
        raise ValueError(f"this incident has no {kind} to scope the feedback to")
    raise ValueError(f"this incident has {len(have)} {kind} values "
                     f"({', '.join(sorted(have)[:5])}); name one with --scope {kind}=VALUE")


def _texts(v: Any) -> set[str]:
    if isinstance(v, str):
        return {v} if v else set()
    if isinstance(v, (list, tuple, set, frozenset)):
        return {str(x) for x in v if isinstance(x, (str, int)) and str(x)}
    return set()


def _address(text: str):
    try:
        a = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        return a.ipv4_mapped
    return a


def _network(text: str):
    try:
        net = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        return None
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and \
            net.network_address.ipv4_mapped is not None:
        return ipaddress.IPv4Network((net.network_address.ipv4_mapped, net.prefixlen - 96))
    return net
