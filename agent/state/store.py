"""The agent's SQLite store: incidents, their timelines, mitigations and the audit log.

Only agent/state touches the database (this module; the mesh outbox in outbox.py). WAL
lets a CLI process read while the agent writes; synchronous=FULL makes every committed
write survive a crash or power loss, unless `start_syncing` hands the fsync to a thread
(the agent: agent.state.batch says what a crash can then lose); the schema (schema.py) is migrated forward by PRAGMA
user_version. Every public method is one
transaction, serialised by a lock so the store may be used from worker threads; inside
`batch()` they all join one (the responder's: one transaction per finding).
"""
from __future__ import annotations

import json
import sqlite3
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Sequence, TypeVar

from agent.model import (EventClass, Finding, Incident, IncidentState, Mitigation,
                         MitigationKind, MitigationState, Severity)
from agent.state import timeline
from agent.state.backing import Backing, Health, StoreError
from agent.state.batch import SYNC_EVERY_S
from agent.state.schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "IncidentEvent", "Store", "StoreError"]
T = TypeVar("T")


LIVE_INCIDENT_STATES = (IncidentState.OPEN, IncidentState.MITIGATED, IncidentState.ESCALATED)
_SEVERITY_ORDER = list(Severity)
# States that count as an earlier mitigation of a target (a failed one never was).
_COUNTED_STATES = (MitigationState.ACTIVE, MitigationState.DRY_RUN,
                   MitigationState.EXPIRED, MitigationState.LIFTED)


@dataclass(frozen=True, slots=True)
class IncidentEvent:
    """One timeline entry: kind is finding, mitigation_applied, mitigation_failed,
    mitigation_renewed, mitigation_expired, mitigation_lifted, mitigation_dry_run or note."""

    seq: int
    incident_id: str
    at: float
    kind: str
    text: str
    data: dict[str, Any] = field(default_factory=dict)


class Store:
    """Durable state of one agent. `readonly=True` opens an existing database for a
    reader (the CLI) without migrating or writing anything.

    The agent's store never fails on storage trouble (agent.state.backing): a full or
    failing disk puts it in memory until `catch_up` can write it back; a corrupt file is
    moved aside and a fresh one started (`fresh`: seed it, `health`: what happened).
    `spill` (the agent's: in its run directory) keeps the memory copy of a run that ends
    while degraded, for the next start to load."""

    def __init__(self, path: str | Path, *, readonly: bool = False,
                 spill: str | Path | None = None):
        self.path = Path(path)
        self._backing = Backing(self.path, readonly=readonly, spill=spill)

    @property
    def schema_version(self) -> int:
        return self._read("PRAGMA user_version")[0][0]

    @property
    def health(self) -> Health:
        return self._backing.health

    @property
    def fresh(self) -> bool:
        """True when this store holds no history (new, or started after corruption)."""
        return self._backing.fresh

    @property
    def degraded(self) -> bool:
        return self._backing.degraded

    def catch_up(self, *, force: bool = False) -> bool | None:
        """While degraded: try to write the memory copy to the file (with backoff unless
        `force`); True once written, False if not yet, None when nothing was tried."""
        return self._backing.catch_up() if force else self._backing.maybe_catch_up()

    def on_lost(self, fn: Callable[[], None]) -> None:
        """Call `fn` when, at run time, the file cannot even be read and the store starts
        over in memory (`fresh` again): the agent re-records what the kernel holds."""
        self._backing.on_lost = fn

    def _read(self, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]:
        # Under the lock, so a read from another thread never sees a half-done transaction.
        return self._backing.read(lambda db: db.execute(sql, tuple(args)).fetchall())

    def _write(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = False) -> T:
        """`fn(db)` in one transaction; on storage failure it runs in memory instead.
        `fn` may run twice (agent.state.batch): it draws no ids or clocks of its own."""
        return self._backing.write(fn, durable=durable)

    def batch(self) -> ContextManager[None]:
        """A context in which every write of this store (on this thread; others wait)
        is one transaction, committed on leaving it; an exception leaves nothing of it
        written, on disk or in the memory fallback."""
        return self._backing.batch()

    def commit_point(self) -> None:
        """Inside batch(): commit its writes so far (unsynced) and go on in a new
        transaction; outside one, nothing to do (agent.state.batch)."""
        self._backing.commit_point()

    def start_syncing(self, every_s: float = SYNC_EVERY_S) -> None:
        """From now on commits are not fsync'd by the writer but by a thread within
        `every_s` (agent.state.batch); record_audit still is on return."""
        self._backing.start_syncing(every_s)

    def close(self) -> None:
        self._backing.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- incidents ---------------------------------------------------------------------

    def record_finding(self, finding: Finding, first_seen_at: float,
                       detected_at: float) -> Incident:
        """Add a finding to the live (open, mitigated or escalated) incident of its
        (class, entity), or open a new one; add it to the timeline (a repeat of an
        identical finding counts on its line: agent.state.timeline); return the incident."""
        # Drawn once: a replayed write must not draw another. A replay into a memory copy
        # that lost the file finds no live incident; it opens one under the id the first
        # run used, which the rest of the batch (mitigation, timeline) refers to.
        chosen = [uuid.uuid4().hex]

        def tx(db: sqlite3.Connection) -> Any:
            row = db.execute(
                "SELECT * FROM incidents WHERE class=? AND entity=? AND state IN (?,?,?) "
                "ORDER BY detected_at DESC LIMIT 1",
                (finding.event_class.value, finding.entity, *LIVE_INCIDENT_STATES)).fetchone()
            if row is None:
                incident = _new_incident(finding, first_seen_at, detected_at, chosen[0])
                db.execute("INSERT INTO incidents VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                           _incident_values(incident, None))
            else:
                chosen[0] = row["id"]
                incident = _merge(_incident(row), finding, first_seen_at)
                db.execute("UPDATE incidents SET severity=?, first_seen_at=?, rules=?, "
                           "findings=? WHERE id=?",
                           (incident.severity.value, incident.first_seen_at,
                            json.dumps(incident.rules), incident.findings, incident.id))
            timeline.record(db, incident.id, detected_at, finding)
            return incident
        incident = self._write(tx)
        return incident

    def incident(self, incident_id: str) -> Incident | None:
        rows = self._read("SELECT * FROM incidents WHERE id=?", (incident_id,))
        return _incident(rows[0]) if rows else None

    def incidents(self, *, state: IncidentState | Iterable[IncidentState] | None = None,
                  event_class: EventClass | None = None, entity: str | None = None,
                  since: float | None = None, limit: int | None = None) -> list[Incident]:
        """Incidents matching every given filter, newest detection first."""
        where, args = _filters(state=state, **{"class": event_class, "entity": entity})
        if since is not None:
            where.append("detected_at >= ?")
            args.append(since)
        sql = "SELECT * FROM incidents" + _where(where) + " ORDER BY detected_at DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [_incident(r) for r in self._read(sql, args)]

    def deadline_missed(self, incident_id: str) -> bool | None:
        """Whether the incident's class deadline was missed; None until it is mitigated."""
        rows = self._read("SELECT deadline_missed FROM incidents WHERE id=?", (incident_id,))
        return None if not rows or rows[0][0] is None else bool(rows[0][0])

    def mark_mitigated(self, incident_id: str, mitigated_at: float,
                       deadline_missed: bool) -> None:
        """Record the first mitigation of an incident; later ones keep the first time.
        An open incident becomes mitigated; an escalated one stays escalated."""
        def tx(db: sqlite3.Connection) -> Any:
            db.execute("UPDATE incidents SET mitigated_at=?, deadline_missed=?, "
                       "state=CASE WHEN state=? THEN ? ELSE state END "
                       "WHERE id=? AND mitigated_at IS NULL",
                       (mitigated_at, int(deadline_missed), IncidentState.OPEN,
                        IncidentState.MITIGATED, incident_id))
        self._write(tx)
    def set_incident_state(self, incident_id: str, state: IncidentState, at: float,
                           note: str = "") -> None:
        """Move an incident to `state` (resolved and false_positive set resolved_at)."""
        closing = state in (IncidentState.RESOLVED, IncidentState.FALSE_POSITIVE)
        def tx(db: sqlite3.Connection) -> Any:
            db.execute("UPDATE incidents SET state=?, resolved_at=? WHERE id=?",
                       (state.value, at if closing else None, incident_id))
            _append_event(db, incident_id, at, "note", note or f"state -> {state.value}",
                          {"state": state.value})
        self._write(tx)
    def add_incident_event(self, incident_id: str, kind: str, text: str, at: float,
                           data: dict[str, Any] | None = None) -> None:
        def tx(db: sqlite3.Connection) -> Any:
            _append_event(db, incident_id, at, kind, text, data or {})
        self._write(tx)
    def incident_events(self, incident_id: str) -> list[IncidentEvent]:
        rows = self._read("SELECT * FROM incident_events WHERE incident_id=? ORDER BY seq",
                          (incident_id,))
        return [IncidentEvent(r["seq"], r["incident_id"], r["at"], r["kind"], r["text"],
                              json.loads(r["data"])) for r in rows]

    def counts_by_class(self) -> dict[str, dict[str, int]]:
        """class -> {"total", each incident state, "deadline_met", "deadline_missed"}."""
        out: dict[str, dict[str, int]] = {}
        rows = self._read("SELECT class, state, deadline_missed, COUNT(*) AS n "
                          "FROM incidents GROUP BY class, state, deadline_missed")
        for r in rows:
            c = out.setdefault(r["class"], {"total": 0, "deadline_met": 0, "deadline_missed": 0,
                                            **{s.value: 0 for s in IncidentState}})
            c["total"] += r["n"]
            c[r["state"]] += r["n"]
            if r["deadline_missed"] is not None:
                c["deadline_missed" if r["deadline_missed"] else "deadline_met"] += r["n"]
        return out

    # -- mitigations -------------------------------------------------------------------

    def add_mitigation(self, m: Mitigation, *, rule: str | None = None) -> None:
        """Insert a mitigation; `rule` ("id@version") is the rule that asked for it."""
        def tx(db: sqlite3.Connection) -> Any:
            db.execute("INSERT INTO mitigations VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                       (m.id, m.kind.value, m.target, json.dumps(m.params), m.created_at,
                        m.expires_at, m.state.value, m.incident_id, m.reason, rule,
                        m.created_at))
        self._write(tx)
    def mitigation(self, mitigation_id: str) -> Mitigation | None:
        rows = self._read("SELECT * FROM mitigations WHERE id=?", (mitigation_id,))
        return _mitigation(rows[0]) if rows else None

    def set_mitigation_state(self, mitigation_id: str, state: MitigationState,
                             at: float) -> None:
        def tx(db: sqlite3.Connection) -> Any:
            db.execute("UPDATE mitigations SET state=?, updated_at=? WHERE id=?",
                       (state.value, at, mitigation_id))
        self._write(tx)
    def set_mitigation_expiry(self, mitigation_id: str, expires_at: float | None, at: float,
                              params: dict[str, Any] | None = None) -> None:
        """Renew: a new expiry (and optionally new parameters) for an existing mitigation."""
        def tx(db: sqlite3.Connection) -> Any:
            db.execute("UPDATE mitigations SET expires_at=?, updated_at=?, "
                       "params=COALESCE(?, params) WHERE id=?",
                       (expires_at, at, json.dumps(params) if params is not None else None,
                        mitigation_id))
        self._write(tx)
    def active_mitigations(self, now: float) -> list[Mitigation]:
        """What must be in force at `now`: state active and not expired."""
        return self.mitigations(state=MitigationState.ACTIVE, live_at=now)

    def mitigations(self, *, state: MitigationState | Iterable[MitigationState] | None = None,
                    kind: MitigationKind | None = None, target: str | None = None,
                    incident_id: str | None = None, live_at: float | None = None,
                    expired_by: float | None = None,
                    limit: int | None = None) -> list[Mitigation]:
        """Mitigations matching every given filter, oldest first; `live_at` keeps those
        without expiry or expiring after that time, `expired_by` those whose expiry is at
        or before that time."""
        where, args = _filters(state=state, kind=kind, target=target, incident_id=incident_id)
        if live_at is not None:
            where.append("(expires_at IS NULL OR expires_at > ?)")
            args.append(live_at)
        if expired_by is not None:
            where.append("expires_at <= ?")
            args.append(expired_by)
        sql = "SELECT * FROM mitigations" + _where(where) + " ORDER BY created_at, rowid"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [_mitigation(r) for r in self._read(sql, args)]

    def prior_mitigations(self, target: str, since: float, until: float | None = None,
                          kinds: Sequence[MitigationKind] | None = None) -> int:
        """How many mitigations of `target` (of `kinds`, default any; failed ones excluded)
        were created in [since, until) — the repeat-offender count."""
        sql = ("SELECT COUNT(*) FROM mitigations WHERE target=? AND created_at >= ? "
               f"AND state IN ({','.join('?' * len(_COUNTED_STATES))})")
        args: list[Any] = [target, since, *_COUNTED_STATES]
        if kinds is not None:
            sql += f" AND kind IN ({','.join('?' * len(kinds))})"
            args.extend(kinds)
        if until is not None:
            sql += " AND created_at < ?"
            args.append(until)
        return self._read(sql, args)[0][0]

    def sources_mitigated_by_rule(self, rule: str, since: float) -> int:
        """Distinct targets that `rule` mitigated (failed ones excluded) since `since`."""
        sql = ("SELECT COUNT(DISTINCT target) FROM mitigations WHERE rule=? AND created_at >= ? "
               f"AND kind NOT IN (?, ?) AND state IN ({','.join('?' * len(_COUNTED_STATES))})")
        return self._read(sql, (rule, since, MitigationKind.RATE_LIMIT_SERVICE,
                                MitigationKind.CHALLENGE_SERVICE, *_COUNTED_STATES))[0][0]


    # -- audit -------------------------------------------------------------------------

    def record_audit(self, at: float, identity: str, role: str, method: str,
                     arguments: dict[str, Any], result: str, detail: str = "") -> int:
        """Append one control call to the audit log (durable on return); its seq."""
        def tx(db: sqlite3.Connection) -> Any:
            cur = db.execute("INSERT INTO audit (at, identity, role, method, arguments, result, "
                             "detail) VALUES (?,?,?,?,?,?,?)",
                             (at, identity, role, method, json.dumps(arguments, default=str),
                              result, detail))
            return int(cur.lastrowid)
        return self._write(tx, durable=True)
    def audit(self, *, since: float | None = None, identity: str | None = None,
              limit: int = 100) -> list[dict[str, Any]]:
        """Audit entries, newest first: dicts of seq, at, identity, role, method,
        arguments (a dict), result, detail."""
        where, args = _filters(identity=identity)
        if since is not None:
            where.append("at >= ?")
            args.append(since)
        rows = self._read("SELECT * FROM audit" + _where(where) +
                          f" ORDER BY seq DESC LIMIT {int(limit)}", args)
        return [{**dict(r), "arguments": json.loads(r["arguments"])} for r in rows]


def _filters(**columns: Any) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    args: list[Any] = []
    for column, value in columns.items():
        if value is None:
            continue
        if isinstance(value, (str, int, float)):
            where.append(f"{column} = ?")
            args.append(value)
        else:
            values = list(value)
            where.append(f"{column} IN ({','.join('?' * len(values))})")
            args.extend(values)
    return where, args


def _where(clauses: list[str]) -> str:
    return " WHERE " + " AND ".join(clauses) if clauses else ""


def _append_event(db: sqlite3.Connection, incident_id: str, at: float, kind: str,
                  text: str, data: dict[str, Any]) -> None:
    db.execute("INSERT INTO incident_events (incident_id, at, kind, text, data) "
               "VALUES (?,?,?,?,?)", (incident_id, at, kind, text, json.dumps(data, default=str)))


def _new_incident(f: Finding, first_seen_at: float, detected_at: float,
                  incident_id: str) -> Incident:
    details = ", ".join(f"{k}={v}" for k, v in f.evidence.items())
    if isinstance(f.evidence.get("summary"), str):    # the anomaly models' one line
        details = f.evidence["summary"]
    return Incident(id=incident_id, event_class=f.event_class, entity=f.entity,
                    severity=f.severity, state=IncidentState.OPEN,
                    first_seen_at=first_seen_at, detected_at=detected_at, rules=[f.rule],
                    findings=1,
                    summary=f"{f.rule} on {f.entity}" + (f" ({details})" if details else ""))


def _merge(incident: Incident, f: Finding, first_seen_at: float) -> Incident:
    incident.findings += 1
    incident.first_seen_at = min(incident.first_seen_at, first_seen_at)
    if f.rule not in incident.rules:
        incident.rules.append(f.rule)
    if _SEVERITY_ORDER.index(f.severity) > _SEVERITY_ORDER.index(incident.severity):
        incident.severity = f.severity
    return incident


def _incident_values(i: Incident, deadline_missed: bool | None) -> tuple:
    return (i.id, i.event_class.value, i.entity, i.severity.value, i.state.value,
            i.first_seen_at, i.detected_at, i.mitigated_at, i.resolved_at,
            json.dumps(i.rules), i.findings,
            None if deadline_missed is None else int(deadline_missed), i.summary)


def _incident(r: sqlite3.Row) -> Incident:
    return Incident(id=r["id"], event_class=EventClass(r["class"]), entity=r["entity"],
                    severity=Severity(r["severity"]), state=IncidentState(r["state"]),
                    first_seen_at=r["first_seen_at"], detected_at=r["detected_at"],
                    mitigated_at=r["mitigated_at"], resolved_at=r["resolved_at"],
                    rules=json.loads(r["rules"]), findings=r["findings"], summary=r["summary"])


def _mitigation(r: sqlite3.Row) -> Mitigation:
    return Mitigation(kind=MitigationKind(r["kind"]), target=r["target"],
                      created_at=r["created_at"], expires_at=r["expires_at"],
                      incident_id=r["incident_id"], params=json.loads(r["params"]),
                      state=MitigationState(r["state"]), id=r["id"], reason=r["reason"])
