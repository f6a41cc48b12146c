"""Fleet decisions in the store (tables fleet_decisions, fleet_cursor, fleet_refusals;
migrations 7 and 8 in agent/state/schema.py), and the proposals queued for the mesh.

A batch of decisions (one live message, or a whole catch-up or snapshot) is one
transaction: its entries, the cursor it reaches and its refusals commit together, so
after a crash the agent resumes from a cursor that matches what it recorded. The
refusals table keeps the newest `keep` rows.
"""
from __future__ import annotations

import json
import sqlite3
import uuid
from typing import Any

from agent.fleet.apply import Entry, Outcome, Refusal
from agent.state.store import Store

_COLUMNS = ("target", "id", "action", "issued_at", "expires_at", "seq", "applied_at",
            "reason", "provenance", "key_id")


def entries(store: Store) -> dict[str, Entry]:
    rows = store._read(f"SELECT {','.join(_COLUMNS)} FROM fleet_decisions")
    return {r[0]: Entry(*r) for r in rows}


def _row(e: Entry) -> tuple[Any, ...]:
    return (*(getattr(e, c) for c in _COLUMNS[:-1]), e.key)


def cursor(store: Store) -> tuple[int, str]:
    """(last applied stream sequence, the stream's creation time then); (0, "") at first."""
    rows = store._read("SELECT seq, stream_created FROM fleet_cursor WHERE id = 1")
    return (int(rows[0][0]), str(rows[0][1])) if rows else (0, "")


def commit(store: Store, outcome: Outcome, stream_created: str, at: float, keep: int) -> None:
    """Record what a batch did, with its cursor, in one transaction."""
    def tx(db: sqlite3.Connection) -> Any:
        if outcome.removed:
            db.executemany("DELETE FROM fleet_decisions WHERE target = ?",
                           [(t,) for t in outcome.removed])
        if outcome.upserts:
            db.executemany(f"INSERT OR REPLACE INTO fleet_decisions ({','.join(_COLUMNS)}) "
                           f"VALUES ({','.join('?' * len(_COLUMNS))})",
                           [_row(e) for e in outcome.upserts.values()])
        db.execute("INSERT OR REPLACE INTO fleet_cursor (id, seq, stream_created, updated_at) "
                   "VALUES (1, ?, ?, ?)", (outcome.cursor, stream_created, at))
        _refusals(db, outcome.refusals, at, keep)
    store._write(tx)


def record_refusals(store: Store, refusals: list[Refusal], at: float, keep: int) -> None:
    """Refusals found after a batch was committed (the kernel refused an element)."""
    if refusals:
        store._write(lambda db: _refusals(db, refusals, at, keep))


def _refusals(db: sqlite3.Connection, refusals: list[Refusal], at: float, keep: int) -> None:
    if refusals:
        db.executemany("INSERT INTO fleet_refusals (at, seq, subject, target, reason, detail) "
                       "VALUES (?, ?, ?, ?, ?, ?)",
                       [(at, r.seq, r.subject, r.target, r.reason, r.detail) for r in refusals])
        db.execute("DELETE FROM fleet_refusals WHERE n <= (SELECT MAX(n) FROM fleet_refusals) - ?",
                   (keep,))


def forget(store: Store, targets: list[str]) -> None:
    """Drop entries that ran out (their kernel elements expired by themselves)."""
    if targets:
        store._write(lambda db: db.executemany("DELETE FROM fleet_decisions WHERE target = ?",
                                               [(t,) for t in targets]))


def refusals(store: Store, limit: int = 100) -> list[dict[str, Any]]:
    rows = store._read("SELECT at, seq, subject, target, reason, detail FROM fleet_refusals "
                       "ORDER BY n DESC LIMIT ?", (int(limit),))
    return [dict(zip(("at", "seq", "subject", "target", "reason", "detail"), r)) for r in rows]


def in_force(store: Store, now: float, limit: int | None = None) -> tuple[int, list[Entry]]:
    """(how many blocks are in force, the first `limit` of them by target; all: None)."""
    total = store._read("SELECT COUNT(*) FROM fleet_decisions WHERE action = 'block' "
                        "AND expires_at > ?", (now,))[0][0]
    sql = (f"SELECT {','.join(_COLUMNS)} FROM fleet_decisions WHERE action = 'block' "
           "AND expires_at > ? ORDER BY target")
    args: tuple[Any, ...] = (now,)
    if limit is not None:
        sql += " LIMIT ?"
        args += (int(limit),)
    return int(total), [Entry(*r) for r in store._read(sql, args)]


def queue_proposal(store: Store, body: dict[str, Any], at: float) -> str:
    """Queue a proposal report for the mesh (outbox kind 'proposal'); inside the caller's
    transaction when it has one (the responder's: with the block it proposes)."""
    report_id = uuid.uuid4().hex
    store._write(lambda db: db.execute(
        "INSERT INTO outbox (id, kind, ref, payload, created_at) VALUES (?, 'proposal', ?, ?, ?)",
        (report_id, body["proposal_id"], json.dumps(body, sort_keys=True), at)))
    return report_id


_TRUSTED_KEYS = "fleet.trusted_keys"


def trusted_keys(store: Store) -> list[str] | None:
    """The decision key ids the last complete snapshot was verified with (None: never
    recorded: an agent from before they were, or none loaded yet)."""
    rows = store._read("SELECT value FROM settings WHERE key = ?", (_TRUSTED_KEYS,))
    return sorted(json.loads(rows[0][0])) if rows else None


def set_trusted_keys(store: Store, ids: list[str]) -> None:
    store._write(lambda db: db.execute(
        "INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)",
        (_TRUSTED_KEYS, json.dumps(sorted(ids)))))


def refused_subjects(store: Store, reasons: tuple[str, ...], since: float,
                     limit: int) -> list[str]:
    """The subjects of decisions refused for one of `reasons` since `since`, newest first
    (what a restarted agent fetches again: the refusal may no longer hold)."""
    marks = ",".join("?" * len(reasons))
    rows = store._read(f"SELECT subject FROM fleet_refusals WHERE reason IN ({marks}) "
                       f"AND at > ? AND subject != '' GROUP BY subject ORDER BY MAX(n) DESC "
                       f"LIMIT ?", (*reasons, since, int(limit)))
    return [r[0] for r in rows]
