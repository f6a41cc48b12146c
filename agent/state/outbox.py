"""The mesh outbox: reports waiting for the mesh's acknowledgement, kept in the agent's
SQLite database (table `outbox`, migration 3 in agent/state/schema.py).

How nothing is lost: triggers queue a snapshot of every incident and mitigation change in
the same transaction as the change itself, so a crash or SIGKILL at any instant leaves
either both or neither. Heartbeats are queued here. A report leaves the outbox only once
the mesh has acknowledged its id, so delivery is at least once; ids are random, stored with
the report and reused on every retry, so the mesh can de-duplicate. A newer snapshot of
the same incident or mitigation replaces one still queued (it carries everything the older
one did), which also bounds the incident and mitigation reports to one per row.

The bound (documented in packaging/config.yaml, enforced by `trim`, each drop counted in
`dropped` and logged): above `max_reports` the oldest heartbeats are dropped first, then
the oldest mitigation reports, never an incident; above `hard_max_reports` the oldest
reports of any kind go, incidents included, so the database cannot grow without limit in
a mesh outage that never ends.

Given the agent's Store, the outbox shares its connection, so while storage is degraded
(agent.state.backing) reports are queued, delivered and acknowledged in the memory copy
and written with it when the disk returns; given a path it opens its own connection (WAL
lets it run beside the store's). It only ever touches the `outbox` table.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import threading
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, TypeVar

if TYPE_CHECKING:
    from agent.state.store import Store

log = logging.getLogger("swarm_agent")

KINDS = ("incident", "mitigation", "heartbeat", "evidence", "feedback", "proposal")
# Which reports go first when the outbox is over its bound (incidents only past the hard one).
_DROP_ORDER = ("heartbeat", "evidence", "mitigation")
# One delivery call carries at most this many payload bytes (gRPC's limit is 4 MiB; an
# investigation's evidence bundle is up to investigation.max_bytes).
MAX_BATCH_BYTES = 3 << 20
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Pending:
    """One queued report. `attempts`: failed deliveries so far."""

    seq: int
    id: str
    kind: str
    ref: str
    payload: dict[str, Any]
    created_at: float
    attempts: int


class Outbox:
    """Durable queue of mesh reports; every method is one short transaction."""

    def __init__(self, db: str | Path | Store, *, max_reports: int, hard_max_reports: int):
        self.max_reports, self.hard_max_reports = max_reports, hard_max_reports
        self.dropped: Counter[str] = Counter()     # kind -> reports dropped at the bound
        self._own: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        if isinstance(db, (str, Path)):
            self._own = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
            self._own.execute("PRAGMA busy_timeout=5000")
            self._own.execute("PRAGMA synchronous=FULL")
            self._store = None
        else:
            self._store = db
        if not self._run(lambda c: c.execute(
                "SELECT 1 FROM sqlite_master WHERE name='outbox'").fetchone()):
            self.close()
            raise RuntimeError(f"database {db} has no outbox table (open the Store first)")

    def _run(self, fn: Callable[[sqlite3.Connection], T], *, write: bool = False) -> T:
        if self._store is not None:
            return self._store._write(fn) if write else self._store._backing.read(fn)
        assert self._own is not None
        with self._lock:
            return fn(self._own)

    def close(self) -> None:
        if self._own is not None:
            with self._lock:
                self._own.close()

    def _write(self, sql: str, args: Iterable[Any] = ()) -> int:
        return self._run(lambda c: c.execute(sql, tuple(args)).rowcount, write=True)

    def add_heartbeat(self, body: dict[str, Any], at: float) -> str:
        """Queue a heartbeat; returns its id."""
        report_id = uuid.uuid4().hex
        self._write("INSERT INTO outbox (id, kind, ref, payload, created_at) "
                    "VALUES (?, 'heartbeat', '', ?, ?)", (report_id, json.dumps(body), at))
        return report_id

    def add_evidence(self, incident_id: str, evidence_id: str, bundle: dict[str, Any],
                     at: float) -> None:
        """Queue an investigation's evidence bundle (agent.respond.investigate); inside the
        store's transaction that records it. `ref` is its evidence id: the mesh
        de-duplicates on it as well as on the report id."""
        body = {"incident_id": incident_id, "evidence_id": evidence_id, "bundle": bundle}
        self._write("INSERT INTO outbox (id, kind, ref, payload, created_at) "
                    "VALUES (?, 'evidence', ?, ?, ?)",
                    (uuid.uuid4().hex, evidence_id, json.dumps(body, default=str), at))

    def pending(self, limit: int, max_bytes: int = MAX_BATCH_BYTES) -> list[Pending]:
        """Up to `limit` reports to send (and at most `max_bytes` of payload, one at
        least): incidents and mitigations before evidence and heartbeats, oldest first
        within each."""
        rows = self._run(lambda c: c.execute(
            "SELECT seq, id, kind, ref, payload, created_at, attempts FROM outbox "
            "ORDER BY kind = 'heartbeat', kind = 'evidence', seq LIMIT ?",
            (limit,)).fetchall())
        out, size = [], 0
        for r in rows:
            size += len(r[4])
            if out and size > max_bytes:
                break
            out.append(Pending(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6]))
        return out

    def acknowledge(self, ids: Iterable[str]) -> int:
        """Remove reports the mesh has processed; returns how many were still queued (a
        report replaced by a newer snapshot meanwhile is already gone)."""
        ids = list(ids)
        if not ids:
            return 0
        marks = ",".join("?" * len(ids))
        return self._write(f"DELETE FROM outbox WHERE id IN ({marks})", ids)

    def failed(self, ids: Iterable[str]) -> None:
        """Count one more failed delivery of each report (they stay queued)."""
        ids = list(ids)
        if ids:
            marks = ",".join("?" * len(ids))
            self._write(f"UPDATE outbox SET attempts = attempts + 1 WHERE id IN ({marks})", ids)

    def depth(self) -> dict[str, int]:
        """Queued reports per kind (every kind present, zero included)."""
        rows = self._run(lambda c: c.execute(
            "SELECT kind, COUNT(*) FROM outbox GROUP BY kind").fetchall())
        return {**dict.fromkeys(KINDS, 0), **dict(rows)}

    def clear(self) -> int:
        """Forget every queued report (standalone: there is no mesh to deliver to)."""
        return self._write("DELETE FROM outbox")

    def trim(self) -> dict[str, int]:
        """Enforce the bound (see the module docstring); returns what was dropped, by kind."""
        total = sum(self.depth().values())
        dropped: Counter[str] = Counter()
        for kind in _DROP_ORDER:
            if total <= self.max_reports:
                break
            n = self._drop_oldest(total - self.max_reports, kind)
            if n:
                dropped[kind] += n
                total -= n
        if total > self.hard_max_reports:
            rows = self._run(lambda c: c.execute(
                "SELECT kind, COUNT(*) FROM (SELECT kind FROM outbox ORDER BY seq LIMIT ?) "
                "GROUP BY kind", (total - self.hard_max_reports,)).fetchall())
            self._drop_oldest(total - self.hard_max_reports, None)
            dropped.update(dict(rows))
        if dropped:
            self.dropped.update(dropped)
            log.warning("mesh outbox over its bound: oldest reports dropped",
                        extra={"dropped": dict(dropped), "max_reports": self.max_reports,
                               "hard_max_reports": self.hard_max_reports})
        return dict(dropped)

    def _drop_oldest(self, n: int, kind: str | None) -> int:
        where = "WHERE kind = ?" if kind else ""
        args = (kind, n) if kind else (n,)
        return self._write(f"DELETE FROM outbox WHERE seq IN "
                           f"(SELECT seq FROM outbox {where} ORDER BY seq LIMIT ?)", args)
