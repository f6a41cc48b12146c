"""Feedback records in the store (table `feedback`, migration 6 in agent/state/schema.py).

An operator's false-positive verdict becomes a scoped exception (agent.detect.feedback
matches them, agent.model.Feedback is the record). Rows are never deleted: a reverted
record keeps who reverted it and when, an expired one its expiry, so the list is the
history an auditor reads. Each function is one transaction of the agent's Store (its
lock, its memory fallback while storage is degraded); the record's timeline line on its
incident is written in the same transaction.
"""
from __future__ import annotations

import json
import sqlite3
from typing import Any

from agent.model import Feedback
from agent.state.store import Store

_COLUMNS = ("id", "rule", "rule_version", "scope_kind", "scope_value", "action",
            "created_at", "expires_at", "reason", "by", "incident_id", "reverted_at",
            "reverted_by", "hits")


def add(store: Store, records: list[Feedback], timeline_text: str = "") -> None:
    """Insert `records` and, for each with an incident, a "feedback" line on its
    timeline: all in one transaction (all or nothing)."""
    def tx(db: sqlite3.Connection) -> Any:
        for r in records:
            db.execute(f"INSERT INTO feedback ({','.join(_COLUMNS)}) VALUES "
                       f"({','.join('?' * len(_COLUMNS))})",
                       tuple(getattr(r, c) for c in _COLUMNS))
            if r.incident_id:
                _line(db, r.incident_id, r.created_at, "feedback",
                      timeline_text or describe(r, "feedback"), r)
    store._write(tx)


def records(store: Store, *, live_at: float | None = None, rule: str | None = None,
            incident_id: str | None = None, limit: int = 1000) -> list[Feedback]:
    """Records, newest first; `live_at` keeps those neither reverted nor expired then."""
    where, args = [], []
    if live_at is not None:
        where.append("reverted_at IS NULL AND expires_at > ?")
        args.append(live_at)
    if rule is not None:
        where.append("rule = ?")
        args.append(rule)
    if incident_id is not None:
        where.append("incident_id = ?")
        args.append(incident_id)
    sql = ("SELECT * FROM feedback" + (" WHERE " + " AND ".join(where) if where else "")
           + f" ORDER BY created_at DESC, rowid DESC LIMIT {int(limit)}")
    return [_record(r) for r in store._read(sql, args)]


def record(store: Store, record_id: str) -> Feedback | None:
    rows = store._read("SELECT * FROM feedback WHERE id = ?", (record_id,))
    return _record(rows[0]) if rows else None


def revert(store: Store, record_id: str, by: str, at: float, comment: str = "") -> Feedback:
    """Mark a record reverted (it stops matching at once) and note it on its incident's
    timeline. Raises KeyError for an unknown id, ValueError for one already reverted."""
    def tx(db: sqlite3.Connection) -> Any:
        row = db.execute("SELECT * FROM feedback WHERE id = ?", (record_id,)).fetchone()
        if row is None:
            raise KeyError(record_id)
        if row["reverted_at"] is not None:
            raise ValueError(f"feedback {record_id} was already reverted by "
                             f"{row['reverted_by'] or 'someone'}")
        db.execute("UPDATE feedback SET reverted_at = ?, reverted_by = ? WHERE id = ?",
                   (at, by, record_id))
        done = _record(row)
        done.reverted_at, done.reverted_by = at, by
        if done.incident_id:
            text = describe(done, f"feedback {done.id[:12]} reverted by {by}") + \
                (f": {comment}" if comment else "")
            _line(db, done.incident_id, at, "feedback_reverted", text, done)
        return done
    return store._write(tx)


def count_hits(store: Store, hits: dict[str, int]) -> None:
    """Add findings each record kept from the responder (record id -> count)."""
    if not hits:
        return

    def tx(db: sqlite3.Connection) -> Any:
        for record_id, n in hits.items():
            db.execute("UPDATE feedback SET hits = hits + ? WHERE id = ?", (n, record_id))
    store._write(tx)


def false_positives_by_rule(store: Store) -> dict[str, int]:
    """Incidents marked false positive per rule ("id@version") of their findings: from the
    store, so the figure survives restarts."""
    rows = store._read("SELECT j.value AS rule, COUNT(*) AS n FROM incidents, "
                       "json_each(incidents.rules) AS j WHERE incidents.state = "
                       "'false_positive' GROUP BY j.value")
    return {r["rule"]: r["n"] for r in rows}


def describe(r: Feedback, head: str) -> str:
    what = "learn as normal" if r.action == "learn" else "do not alert"
    return (f"{head}: {what} for {r.rule} on {r.scope_kind} {r.scope_value} "
            f"(rule version {r.rule_version}) until {_when(r.expires_at)}, by {r.by or '?'}")


def _when(t: float) -> str:
    import time
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _line(db: sqlite3.Connection, incident_id: str, at: float, kind: str, text: str,
          r: Feedback) -> None:
    data = {c: getattr(r, c) for c in _COLUMNS}
    db.execute("INSERT INTO incident_events (incident_id, at, kind, text, data) "
               "VALUES (?,?,?,?,?)", (incident_id, at, kind, text, json.dumps(data)))


def _record(r: sqlite3.Row) -> Feedback:
    return Feedback(**{c: r[c] for c in _COLUMNS})
