"""How long the store holds its lock when storage fails and when it comes back.

    .venv/bin/python bench/storage_switch.py [--mitigations 10000] [--dir /var/tmp] [--json]

A database with N mitigations and N/10 incidents (each with a finding line) on a real
filesystem. Measured, each on the store's own code path (agent.state.backing):
- to memory: the copy of the file into memory and its integrity check, which the write
  that first fails pays (it is forced here: the copy is the same whatever the error);
- catch-up: the memory copy written back into the file in one transaction (fsync'd);
- record µs: store.record_finding on the file (synchronous=FULL) and in memory.
Every other store call waits for the lock meanwhile, so these are the pauses a failing
disk adds to the responder.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.model import EventClass, Finding, Severity  # noqa: E402
from agent.state.store import Store  # noqa: E402


def finding(n: int) -> Finding:
    return Finding(rule_id="net.syn_flood", rule_version=1, event_class=EventClass.SYSTEM_ATTACK,
                   severity=Severity.HIGH, entity=f"ip:10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}",
                   action="block", first_mono_ns=1, detected_mono_ns=2,
                   evidence={"syns": n, "dport": 80, "proto": "tcp"})


def record_us(store: Store, start: int, count: int = 500) -> float:
    t = time.perf_counter()
    for n in range(start, start + count):
        store.record_finding(finding(n), 1000.0, 1000.0)
    return (time.perf_counter() - t) / count * 1e6


def run(n: int, directory: str) -> dict:
    work = Path(tempfile.mkdtemp(dir=directory, prefix="swarm-bench-"))
    try:
        store = Store(work / "agent.db")

        def fill(db) -> None:
            db.executemany(
                "INSERT INTO mitigations VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                ((f"m{i}", "block_ip", f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", "{}",
                  1000.0, 1600.0, "active", None, "bench", "net.syn_flood@1", 1000.0)
                 for i in range(n)))
        store._write(fill)
        for i in range(n // 10):
            store.record_finding(finding(i), 1000.0, 1000.0)
        store._backing.read(lambda db: db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())
        size_mb = (work / "agent.db").stat().st_size / 1e6
        on_file = record_us(store, n)
        t = time.perf_counter()
        store._backing._to_memory("bench: forced")
        to_memory_ms = (time.perf_counter() - t) * 1000
        in_memory = record_us(store, 2 * n)
        t = time.perf_counter()
        ok = store.catch_up(force=True)
        catch_up_ms = (time.perf_counter() - t) * 1000
        store.close()
        return {"mitigations": n, "incidents": n // 10, "db_mb": round(size_mb, 1),
                "to_memory_ms": round(to_memory_ms, 1), "catch_up_ms": round(catch_up_ms, 1),
                "caught_up": ok, "record_us_file": round(on_file), "record_us_memory": round(in_memory)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mitigations", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = [run(n, args.dir) for n in args.mitigations]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        print(" | ".join(f"{k}={v}" for k, v in r.items()))


if __name__ == "__main__":
    main()
