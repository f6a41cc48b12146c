"""Incidents about the agent itself (class agent_health), always escalated to a human.

Storage: a disk that fails under the agent (it runs on with its state in memory,
agent.state.backing) is one incident per outage, resolved with a note once the memory
copy is written back; a database found corrupt and moved aside is one incident that
stays escalated (someone should look at the file kept for forensics). The incident is
recorded like any other -- while storage is degraded, in the memory copy, so it is
written when the disk returns.

`reseed_from_kernel`: a store that starts without history (new, a corrupt file moved
aside, a file unreadable at run time) gets what the kernel table holds in force
(agent.enforce.recover), the authority then, so nothing asserts an empty table over it.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from agent.config import Config
from agent.model import (EventClass, Finding, Incident, IncidentState, Mitigation,
                         MitigationState, Severity, mono_ns)
from agent.respond import policy
from agent.state.store import Store

log = logging.getLogger("swarm_agent")

STORAGE_RULE = "agent.storage"
RECOVERY_RULE = "agent.state_recovered"
ENTITY = "agent:storage"
DROPS_RULE = "agent.events_dropped"
DROPS_ENTITY = "agent:event_queue"


def _finding(rule: str, severity: Severity, evidence: dict[str, Any],
             entity: str = ENTITY) -> Finding:
    now = mono_ns()
    return Finding(rule_id=rule, rule_version=1, event_class=EventClass.AGENT_HEALTH,
                   severity=severity, entity=entity, action="report", first_mono_ns=now,
                   detected_mono_ns=now, evidence=evidence)


def storage_failing(store: Store, notify: Callable[[str, Any], None], reason: str,
                    since: float | None = None) -> Incident:
    """Open (or add to) the storage incident and escalate it."""
    now = time.time()
    incident = store.record_finding(
        _finding(STORAGE_RULE, Severity.HIGH, {"reason": reason, "path": str(store.path)}),
        since or now, now)
    if incident.state is not IncidentState.ESCALATED:
        store.set_incident_state(incident.id, IncidentState.ESCALATED, now,
                                 f"escalated: storage failing ({reason}); detection and "
                                 "enforcement go on, state is kept in memory")
    return _notify(store, notify, incident)


def open_storage_incident(store: Store) -> str | None:
    """The id of a storage incident still live (from a run that ended degraded)."""
    live = store.incidents(state=(IncidentState.OPEN, IncidentState.ESCALATED),
                           event_class=EventClass.AGENT_HEALTH, entity=ENTITY)
    return next((i.id for i in live if f"{STORAGE_RULE}@1" in i.rules), None)


def storage_recovered(store: Store, notify: Callable[[str, Any], None],
                      incident_id: str) -> Incident | None:
    """Resolve the storage incident: the state kept in memory is written."""
    incident = store.incident(incident_id)
    if incident is None or incident.state in (IncidentState.RESOLVED,
                                              IncidentState.FALSE_POSITIVE):
        return incident
    now = time.time()
    degraded_s = max(0.0, now - incident.first_seen_at)
    store.set_incident_state(incident_id, IncidentState.RESOLVED, now,
                             f"storage recovered after {degraded_s:.0f} s: the state kept "
                             "in memory is written")
    return _notify(store, notify, incident)


def state_recovered(store: Store, notify: Callable[[str, Any], None], what: str,
                    seeded: int) -> Incident:
    """A corrupt database was moved aside: an escalated incident that stays open."""
    now = time.time()
    incident = store.record_finding(
        _finding(RECOVERY_RULE, Severity.CRITICAL, {"what": what, "reseeded": seeded}),
        now, now)
    store.set_incident_state(incident.id, IncidentState.ESCALATED, now,
                             f"escalated: {what}; {seeded} mitigations in force in the "
                             "kernel table re-recorded")
    return _notify(store, notify, incident)


def events_dropped(store: Store, notify: Callable[[str, Any], None], dropped: dict[str, int],
                   capacity: int) -> Incident:
    """The event queue's urgent lane dropped events (each one matched a severe rule: a
    detection lost, agent.detect.triage): open or add to one escalated incident."""
    now = time.time()
    incident = store.record_finding(
        _finding(DROPS_RULE, Severity.HIGH, {"dropped": dropped, "urgent_capacity": capacity},
                 DROPS_ENTITY), now, now)
    if incident.state is not IncidentState.ESCALATED:
        store.set_incident_state(incident.id, IncidentState.ESCALATED, now,
                                 f"escalated: the event queue's urgent lane dropped "
                                 f"{sum(dropped.values())} events that matched a severe "
                                 "rule; their detections are lost")
    return _notify(store, notify, incident)


def _notify(store: Store, notify: Callable[[str, Any], None], incident: Incident) -> Incident:
    incident = store.incident(incident.id) or incident
    notify("incident", incident)
    return incident


def reseed_from_kernel(store: Store, cfg: Config) -> int:
    """Record every mitigation in force in the kernel table that the store does not hold
    in force, after the store was started afresh (first start, or the old database moved
    aside); how many (0 when the table cannot be read: logged, never raised -- the start
    must go on)."""
    now = time.time()
    try:
        from agent.enforce.recover import in_force, read_table, unrecorded

        objs = read_table() or []
        found, n = in_force(objs, now), unrecorded(objs)
    except Exception as e:   # noqa: BLE001 -- best effort
        log.error("cannot read the kernel table to re-record its mitigations",
                  extra={"error": str(e) or type(e).__name__})
        return 0
    if n:
        log.error("service isolation rules in the kernel table cannot be re-recorded; "
                  "re-isolate those services", extra={"rules": n})
    found = [f for f in found if not store.mitigations(
        state=MitigationState.ACTIVE, kind=f.kind, target=f.target, live_at=now, limit=1)]
    why = "the database was started afresh"
    for kind, target, expires_at in found:
        if kind in policy.ISOLATION_KINDS and cfg.mitigation.isolation_ttl_s:
            expires_at = now + cfg.mitigation.isolation_ttl_s
        ttl_s = None if expires_at is None else round(expires_at - now)
        store.add_mitigation(Mitigation(
            kind=kind, target=target, created_at=now, expires_at=expires_at,
            params={**policy.params_for(kind, cfg), "ttl_s": ttl_s},
            state=MitigationState.ACTIVE,
            reason=f"re-recorded from the kernel table ({why})"))
    if found:
        log.warning("mitigations in force re-recorded from the kernel table",
                    extra={"count": len(found)})
    return len(found)
