"""Mesh reporting throughput to a local receiver, and the outbox drain rate after an outage.

    .venv/bin/python bench/report_throughput.py [--reports 5000] [--batch 200] [--json]

Both on loopback, with mutual TLS, to the test mesh receiver (tests/meshrecv.py) running
as its own process (it commits every batch to SQLite, de-duplicating on the report id):

- live: incidents are recorded through the real store (each change queued by the outbox
  triggers in its transaction) while the reporter runs on the same loop; throughput is
  reports acknowledged per second from the first record to an empty outbox, and the lag
  is from the last record to an empty outbox. Also reported: the cost of recording a
  finding with its outbox row (store.record_finding, synchronous=FULL).
- drain: the same number of incidents recorded while the mesh is down (the reporter
  backing off), then the receiver starts; drain rate is reports acknowledged per second
  from the receiver being ready to an empty outbox.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import select
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.config import Mesh  # noqa: E402
from agent.model import EventClass, Finding, Severity  # noqa: E402
from agent.report.mesh import MeshReporter  # noqa: E402
from agent.state.outbox import Outbox  # noqa: E402
from agent.state.store import Store  # noqa: E402
from tests.meshrecv import make_certs, received  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def finding(i: int) -> Finding:
    return Finding(rule_id="net.syn_flood", rule_version=1, event_class=EventClass.SYSTEM_ATTACK,
                   severity=Severity.HIGH, entity=f"ip:10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
                   action="block", first_mono_ns=1, detected_mono_ns=2, evidence={"syns": 500})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_receiver(port: int, certs: Path, db: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.meshrecv", "--listen",
                             f"127.0.0.1:{port}", "--certs", str(certs), "--db", str(db)],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    if not select.select([proc.stdout], [], [], 20)[0] or "listening" not in proc.stdout.readline():
        proc.kill()
        raise RuntimeError("receiver did not start")
    return proc


async def until_empty(box: Outbox, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while box.depth()["incident"]:
        if time.monotonic() > deadline:
            raise TimeoutError("outbox did not drain")
        await asyncio.sleep(0.005)


async def phase(work: Path, n: int, batch: int, outage: bool) -> dict:
    certs = make_certs(work / "certs")
    store = Store(work / "agent.db")
    box = Outbox(store.path, max_reports=10 * n, hard_max_reports=20 * n)
    port = free_port()
    cfg = Mesh(endpoint=f"127.0.0.1:{port}", tls_ca=str(certs["ca"]),
               tls_cert=str(certs["client_cert"]), tls_key=str(certs["client_key"]),
               heartbeat_s=3600.0, batch_size=batch, backoff_initial_s=0.05, backoff_max_s=0.2)
    reporter = MeshReporter(cfg, box, lambda: {"version": "bench"})
    receiver = None if outage else start_receiver(port, certs["ca"].parent, work / "recv.db")
    task = asyncio.create_task(reporter.run())
    try:
        t0 = time.perf_counter()
        for i in range(n):
            store.record_finding(finding(i), 1.0, 2.0)
            reporter.wake()
            if i % 50 == 0:
                await asyncio.sleep(0)     # let the reporter run beside the producer
        record_s = time.perf_counter() - t0
        if outage:
            assert box.depth()["incident"] == n
            receiver = start_receiver(port, certs["ca"].parent, work / "recv.db")
            t0 = time.perf_counter()
        await until_empty(box)
        total_s = time.perf_counter() - t0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if receiver is not None:
            receiver.terminate()
            receiver.wait(10)
        box.close()
        store.close()
    rows, stats = received(work / "recv.db")
    got = sum(1 for r in rows if r["kind"] == "incident")
    assert got == n, (got, n)
    return {"phase": "drain after outage" if outage else "live", "reports": n, "batch": batch,
            "reports_per_s": round(n / total_s), "seconds": round(total_s, 2),
            "record_us_per_finding": round(record_s / n * 1e6, 1),
            "lag_after_last_s": None if outage else round(total_s - record_s, 3),
            "duplicates": stats["duplicates"], "calls": stats["batches"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reports", type=int, default=5000)
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    results = []
    for outage in (False, True):
        with tempfile.TemporaryDirectory(prefix="swarm-report-bench-") as tmp:
            results.append(asyncio.run(phase(Path(tmp), args.reports, args.batch, outage)))
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print("| phase | reports | batch | reports/s | seconds | lag after last s "
          "| record µs/finding | calls |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['phase']} | {r['reports']} | {r['batch']} | {r['reports_per_s']} | "
              f"{r['seconds']} | {r['lag_after_last_s'] if r['lag_after_last_s'] is not None else '—'} "
              f"| {r['record_us_per_finding']} | {r['calls']} |")


if __name__ == "__main__":
    main()
