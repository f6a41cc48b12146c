"""GPU authorizations made through the control API, in the store's database (table
gpu_grants, agent/state/schema.py): they survive a restart. Those of the config are
never stored (the config is their record)."""
from __future__ import annotations

import sqlite3
from typing import Any, Iterable

from agent.gpugrant import Grant
from agent.state.store import Store


def grants(store: Store) -> list[Grant]:
    rows = store._read("SELECT workload, gpu, job, created_at, by FROM gpu_grants "
                       "ORDER BY workload, gpu")
    return [Grant(r["workload"], r["gpu"], "api", r["job"], r["created_at"], r["by"])
            for r in rows]


ENROLLED = "gpu.enrolled_at"


def enrolled_at(store: Store) -> float | None:
    """When a scheduler first authorized a GPU workload on this node (the first
    AuthorizeGpu); None if never. Revoking every grant does not undo it: a node between
    two jobs is still one whose GPUs are handed out by its scheduler."""
    rows = store._read("SELECT value FROM settings WHERE key = ?", (ENROLLED,))
    return float(rows[0]["value"]) if rows else None


def authorize(store: Store, workload: str, gpus: Iterable[str], job: str, at: float,
              by: str) -> int:
    """Add (or renew: job, time and caller replaced) a grant per GPU, and mark the node
    enrolled (enrolled_at) the first time; one transaction, durable on return. The number
    of rows written."""
    rows = [(workload, g, job, at, by) for g in gpus]

    def tx(db: sqlite3.Connection) -> Any:
        db.execute("INSERT OR IGNORE INTO settings (key, value) VALUES (?, ?)",
                   (ENROLLED, repr(at)))
        db.executemany("INSERT INTO gpu_grants (workload, gpu, job, created_at, by) "
                       "VALUES (?,?,?,?,?) ON CONFLICT (workload, gpu) DO UPDATE SET "
                       "job = excluded.job, created_at = excluded.created_at, "
                       "by = excluded.by", rows)
        return len(rows)
    return store._write(tx, durable=True)


def revoke(store: Store, workload: str, gpus: Iterable[str] = ()) -> int:
    """Remove the workload's grants for `gpus` (empty: all of them); durable on return.
    The number removed."""
    gpus = list(gpus)

    def tx(db: sqlite3.Connection) -> Any:
        if not gpus:
            return db.execute("DELETE FROM gpu_grants WHERE workload = ?", (workload,)).rowcount
        return sum(db.execute("DELETE FROM gpu_grants WHERE workload = ? AND gpu = ?",
                              (workload, g)).rowcount for g in gpus)
    return store._write(tx, durable=True)
