"""Incidents about the agent itself (class agent_health), always escalated to a human.

Storage: a disk that fails under the agent (it runs on with its state in memory,
agent.state.backing) is one incident per outage, resolved with a note once the memory
copy is written back; a database found corrupt and moved aside is one incident that
stays escalated (someone should look at the file kept for forensics). The incident is
recorded like any other -- while storage is degraded, in the memory copy, so it is
written when the disk returns.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from agent.model import EventClass, Finding, Incident, IncidentState, Severity, mono_ns
from agent.state.store import Store

STORAGE_RULE = "agent.storage"
RECOVERY_RULE = "agent.state_recovered"
ENTITY = "agent:storage"


def _finding(rule: str, severity: Severity, evidence: dict[str, Any]) -> Finding:
    now = mono_ns()
    return Finding(rule_id=rule, rule_version=1, event_class=EventClass.AGENT_HEALTH,
                   severity=severity, entity=ENTITY, action="report", first_mono_ns=now,
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


def _notify(store: Store, notify: Callable[[str, Any], None], incident: Incident) -> Incident:
    incident = store.incident(incident.id) or incident
    notify("incident", incident)
    return incident
