"""Administrator notifications through Alertmanager's v2 API (POST /api/v2/alerts), so
they follow the routing, grouping and silences the operators already have.

Each incident is one alert. Its labels identify it and route it: alertname, event_class,
severity, entity, incident_id, node and escalated (GPU health: also UUID and reason),
then the configured `labels`, the labels of its class and of its severity, and
`escalation_labels` when it needs a human (its class is in `escalate_classes`, or the responder escalated it because a mitigation
failed). State and times are annotations, so the alert keeps its identity while the
incident moves from open to mitigated. An investigation (suspicious_activity) also carries
its finding's summary, the features that drove it and what its evidence bundle holds; by
default its class labels route it to the security team (config alerts.class_labels).

Alertmanager forgets an alert that is not re-sent, so live incidents are re-sent every
`resend_s` with an end time 4 x resend_s ahead; changes are sent at once. A closed
incident is sent once more with its resolution time as the end; an alert whose labels
changed (severity raised, escalated later) is ended under its old labels. The live set is
read from the store each round, so a restart or an unreachable Alertmanager loses nothing
that is still live.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Iterable

from agent.config import Alerts
from agent.model import EventClass, Incident, IncidentState
from agent.state.store import LIVE_INCIDENT_STATES, Store
from agent.yamlsafe import printable

log = logging.getLogger("swarm_agent")

ALERTNAME = "SwarmAgentIncident"
MAX_LIVE = 5000          # live incidents re-sent per round (the newest)
CHUNK = 500              # alerts per POST
RETRY_S = 5.0            # after a failed POST, before the next one
MAX_NOTE = 1024          # characters of an investigation's annotation
_CLOSED = (IncidentState.RESOLVED, IncidentState.FALSE_POSITIVE)
# Never through an environment proxy: Alertmanager is on the operators' own network.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def needs_human(cfg: Alerts, incident: Incident, escalation_note: str = "") -> str:
    """Why the incident is escalated to a human ('' when it is not). The responder
    escalates for different reasons (a failed mitigation, an isolation or quarantine to
    review and release); its timeline note says which."""
    if incident.state is IncidentState.ESCALATED:
        return escalation_note or "escalated by the agent: see the incident's timeline"
    if incident.event_class.value in cfg.escalate_classes:
        return f"{incident.event_class.value} needs a human"
    return ""


def labels_for(cfg: Alerts, incident: Incident, node: str) -> dict[str, str]:
    escalated = bool(needs_human(cfg, incident))
    labels = {"alertname": ALERTNAME, "event_class": incident.event_class.value,
              "severity": incident.severity.value, "entity": incident.entity,
              "node": node, "escalated": "true" if escalated else "false"}
    if incident.entity.startswith("gpu:"):   # gpu_health: "gpu:<UUID>:<reason>"
        _, uuid, reason = (incident.entity.split(":", 2) + ["", ""])[:3]
        labels.update({"UUID": uuid, "reason": reason})
    labels.update(cfg.labels)
    labels.update(cfg.class_labels.get(incident.event_class.value, {}))
    labels.update(cfg.severity_labels.get(incident.severity.value, {}))
    if escalated:
        labels.update(cfg.escalation_labels)
    labels["incident_id"] = incident.id     # last: the alert's identity is not configurable
    return labels


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, tz=dt.timezone.utc).isoformat()


def to_alert(cfg: Alerts, incident: Incident, node: str, now: float,
             escalation_note: str = "", notes: dict[str, str] | None = None) -> dict[str, Any]:
    """The v2 API's postable alert for `incident` at `now`; `notes`: more annotations
    (an investigation's finding summary, drivers and evidence)."""
    ann = {"summary": incident.summary, "state": incident.state.value,
           "detected_at": _iso(incident.detected_at), "rules": ", ".join(incident.rules),
           "findings": str(incident.findings), **(notes or {})}
    if incident.mitigated_at is not None:
        ann["mitigated_at"] = _iso(incident.mitigated_at)
    why = needs_human(cfg, incident, escalation_note)
    if why:
        ann["escalation"] = why
    closed = incident.state in _CLOSED
    ends = (incident.resolved_at or now) if closed else now + 4 * cfg.resend_s
    # Executable paths, cgroup names, destinations in summaries are the workload's to
    # choose: a newline or an escape must not forge lines in the team's notification.
    ann = {k: printable(v) for k, v in ann.items()}
    return {"labels": labels_for(cfg, incident, node), "annotations": ann,
            "startsAt": _iso(incident.first_seen_at), "endsAt": _iso(ends)}


def post(url: str, alerts: list[dict[str, Any]], timeout_s: float) -> None:
    """POST alerts to Alertmanager; raises OSError (URLError, HTTPError, timeout)."""
    req = urllib.request.Request(url.rstrip("/") + "/api/v2/alerts",
                                 data=json.dumps(alerts).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with _OPENER.open(req, timeout=timeout_s) as resp:
        resp.read()


class Notifier:
    """Keeps Alertmanager's view of this node's incidents current (see the module
    docstring). `observe` is the responder's observer hook; `run` is the task."""

    def __init__(self, cfg: Alerts, store: Store, node_id: str | None = None, *,
                 on_sent: Callable[[int], None] = lambda n: None,
                 on_failure: Callable[[], None] = lambda: None):
        assert cfg.url is not None
        self.cfg, self._store = cfg, store
        self.node = node_id or socket.gethostname()
        self._on_sent, self._on_failure = on_sent, on_failure
        self._changed: dict[str, Incident] = {}
        self._sent: dict[str, dict[str, str]] = {}   # incident id -> labels last sent
        self._wake = asyncio.Event()
        self.failing = False

    def observe(self, kind: str, obj: Any) -> None:
        if kind == "incident":
            self._changed[obj.id] = obj
            self._wake.set()

    async def run(self) -> None:
        next_full = 0.0
        while True:
            batch = dict(self._changed)
            self._changed.clear()
            if time.monotonic() >= next_full:
                live = self._store.incidents(state=LIVE_INCIDENT_STATES, limit=MAX_LIVE)
                batch = {**{i.id: i for i in live}, **batch}
                next_full = time.monotonic() + self.cfg.resend_s
            self._wake.clear()
            if batch and not await self.send(batch.values()):
                for incident_id, incident in batch.items():
                    self._changed.setdefault(incident_id, incident)
                await asyncio.sleep(RETRY_S)
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_full - time.monotonic()))
            except TimeoutError:
                pass

    def _investigation_notes(self, incident: Incident) -> dict[str, str]:
        """For a suspicious_activity incident: the latest finding's one-line summary and
        what drove it (the anomaly models' evidence), and what its evidence bundle holds."""
        if incident.event_class is not EventClass.SUSPICIOUS_ACTIVITY:
            return {}
        notes: dict[str, str] = {}
        for e in self._store.incident_events(incident.id):
            ev = e.data.get("last_evidence") or e.data.get("evidence")
            if e.kind == "finding" and isinstance(ev, dict):
                if ev.get("summary"):
                    notes["finding_summary"] = str(ev["summary"])[:MAX_NOTE]
                drivers = [d for d in ev.get("drivers") or [] if isinstance(d, dict)]
                if drivers:
                    notes["drivers"] = "; ".join(
                        f"{d.get('feature')}={d.get('value')} (baseline {d.get('baseline')})"
                        for d in drivers[:5])[:MAX_NOTE]
            elif e.kind == "evidence":
                notes["evidence"] = e.text[:MAX_NOTE]
        return notes

    def _escalation_note(self, incident: Incident) -> str:
        if incident.state is not IncidentState.ESCALATED:
            return ""
        notes = [e.text for e in self._store.incident_events(incident.id)
                 if e.kind == "note" and e.text.startswith("escalated")]
        return notes[-1] if notes else ""

    async def send(self, incidents: Iterable[Incident]) -> bool:
        """Post the alerts for `incidents` (and the ends of superseded label sets)."""
        now = time.time()
        alerts, sent = [], {}
        for incident in incidents:
            alert = to_alert(self.cfg, incident, self.node, now, self._escalation_note(incident),
                             self._investigation_notes(incident))
            old = self._sent.get(incident.id)
            if old is not None and old != alert["labels"]:
                alerts.append({"labels": old, "annotations": alert["annotations"],
                               "startsAt": alert["startsAt"], "endsAt": _iso(now)})
            alerts.append(alert)
            sent[incident.id] = None if incident.state in _CLOSED else alert["labels"]
        try:
            for i in range(0, len(alerts), CHUNK):
                await asyncio.to_thread(post, self.cfg.url, alerts[i:i + CHUNK],
                                        self.cfg.timeout_s)
        except (OSError, ValueError) as e:
            self._on_failure()
            if not self.failing:
                log.warning("Alertmanager unreachable; alerts are retried",
                            extra={"url": self.cfg.url, "error": str(e)})
            self.failing = True
            return False
        if self.failing:
            log.info("Alertmanager reachable again", extra={"url": self.cfg.url})
        self.failing = False
        for incident_id, labels in sent.items():
            if labels is None:
                self._sent.pop(incident_id, None)
            else:
                self._sent[incident_id] = labels
        self._on_sent(len(alerts))
        return True
