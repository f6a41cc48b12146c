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


def authorize(store: Store, workload: str, gpus: Iterable[str], job: str, at: float,
              by: str) -> int:
    """Add (or renew: job, time and caller replaced) a grant per GPU; one transaction,
    durable on return. The number of rows written."""
    rows = [(workload, g, job, at, by) for g in gpus]

    def tx(db: sqlite3.Connection) -> Any:
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
