"""Manual isolation and quarantine (the control API's Isolate): the operator's twin of a
breach rule's isolate action, taking the responder's own path.

Kept beside engine.py (it uses the responder's internals, as a method would) so the
responder stays readable. A manual isolation opens a security_breach incident of its own
(rule "manual.isolate@1"), escalated like an automatic one, so every isolation is an
incident a human closes and the mesh hears about.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agent.enforce.base import AllowlistedError
from agent.model import EventClass, Finding, Mitigation, MitigationKind, Severity, mono_ns
from agent.respond import policy
from agent.respond.engine import Outcome

if TYPE_CHECKING:
    from agent.respond.engine import Responder

MANUAL_RULE = "manual.isolate"


def entity_of(kind: MitigationKind, target: str) -> str:
    """The incident entity an isolation of `target` is filed under."""
    if kind is MitigationKind.ISOLATE_NODE:
        return "node"
    if kind is MitigationKind.REMOVE_PEER:
        return f"peer:{target}"
    return f"cgroup:{target}"


def isolate(r: "Responder", kind: MitigationKind | str, target: str, ttl_s: float | None,
            reason: str, *, force: bool = False, by: str = "operator") -> Mitigation:
    """Isolate the node, a service (cgroup path) or a WireGuard peer ("IFNAME:KEY") now.

    The target is checked by the enforcer first (the Enforcer contract's check:
    InvalidTarget, TargetNotFound, or a refusal), so a bad request changes nothing, not
    even the database. One already in force is returned as it is. ttl_s None: until
    released. Raises EnforceError (recorded as FAILED, incident escalated) when the host
    refused the change."""
    kind = MitigationKind(kind)
    if kind not in policy.ISOLATION_KINDS:
        raise ValueError(f"{kind.value} is not an isolation")
    if ttl_s is not None and ttl_s <= 0:
        raise ValueError("ttl_s must be greater than 0")
    params: dict[str, Any] = {"force": True} if force else {}
    target = r._enforcer.check(kind, target, params)
    now = r._clock()
    existing = r._in_force(kind, target, now)
    if existing is not None:
        return existing
    mono = mono_ns()
    finding = Finding(MANUAL_RULE, 1, EventClass.SECURITY_BREACH, Severity.HIGH,
                      entity_of(kind, target), kind.value, mono, mono,
                      {"by": by, "reason": reason, "force": force})
    incident = r._store.record_finding(finding, now, now)
    m = Mitigation(kind=kind, target=target, created_at=now,
                   expires_at=None if ttl_s is None else now + ttl_s,
                   incident_id=incident.id, params={**params, "ttl_s": ttl_s, "by": by},
                   reason=reason or f"manual, by {by}")
    outcome, error = r._put_in_force(m, now, rule=MANUAL_RULE + "@1")
    r._record_outcome(incident, m, outcome, error)
    r._escalate(incident.id, f"{kind.value} {target} (by {by})")
    r.notify("incident", r._store.incident(incident.id) or incident)
    if outcome is Outcome.ALLOWLISTED:
        raise AllowlistedError(f"{target} is allowlisted: it is never isolated")
    if error is not None:
        raise error
    return m
