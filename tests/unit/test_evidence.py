"""The evidence bundle (agent.respond.evidence) read from this machine's real /proc: a
child process with a listener and a connection, the kernel's socket tables, truncation to
the size bound, and the investigator storing it with its incident."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.model import EventClass, Finding, Severity
from agent.respond import evidence
from agent.respond.investigate import Investigator
from agent.state.store import Store

CHILD = """
import socket, sys, time
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
cli = socket.create_connection(srv.getsockname())
peer, _ = srv.accept()
print(srv.getsockname()[1], cli.getsockname()[1], flush=True)
time.sleep(30)
"""


@pytest.fixture
def child():
    """A python child holding a listener and an established loopback connection; killed
    after the test."""
    p = subprocess.Popen([sys.executable, "-c", CHILD, "innocent-looking-name"],
                         stdout=subprocess.PIPE, text=True)
    try:
        lport, cport = map(int, p.stdout.readline().split())
        yield p.pid, lport, cport
    finally:
        p.kill()
        p.wait()


def test_endpoint_decoding() -> None:
    assert evidence._endpoint("0100007F:1F90", False) == ("127.0.0.1", 8080)
    v6 = "00000000000000000000000001000000:0050"      # ::1 as the kernel prints it
    assert evidence._endpoint(v6, True) == ("::1", 80)


def test_collects_a_real_process_tree_and_its_sockets(child) -> None:
    pid, lport, cport = child
    b = evidence.Bundle(evidence.targets_of("node", {"pid": pid}))
    evidence.collect(b, deadline=time.monotonic() + 2.0, counters={"events.x": 3},
                     gpu_processes=lambda: [{"pid": 7, "gpu_index": 0}])
    d = b.snapshot(256 * 1024)
    assert d["complete"] and not d["truncated"]
    [p] = [p for p in d["processes"] if not p.get("ancestor")]
    assert p["pid"] == pid and p["ppid"] == os.getpid() and p["uid"] == os.getuid()
    # Its ancestry is there for context (this test process first), marked as such.
    parents = {q["pid"]: q for q in d["processes"] if q.get("ancestor")}
    assert parents[os.getpid()]["exe"] == os.path.realpath(sys.executable)
    assert p["exe"] == os.path.realpath(sys.executable)
    assert "innocent-looking-name" in p["cmdline"] and p["claims"] == evidence.CLAIM
    assert abs(p["started_at"] - time.time()) < 60
    assert {(s["local_port"], s["pid"]) for s in d["listening"]} == {(lport, pid)}
    ports = {(s["local_port"], s["remote_port"], s["state"]) for s in d["connections"]}
    assert (cport, lport, "established") in ports and (lport, cport, "established") in ports
    assert d["agent"] == {"events.x": 3} and d["gpu_processes"] == [{"pid": 7, "gpu_index": 0}]


def test_a_bundle_over_its_size_is_cut_and_says_so() -> None:
    big = {"targets": {}, "processes": [{"pid": i, "cmdline": "x" * 200} for i in range(400)],
           "listening": [], "connections": [{"n": i} for i in range(50)], "recent": [],
           "gpu_processes": [], "agent": {}, "truncated": [], "errors": 0, "complete": True}
    out = evidence.fit(big, 16 * 1024)
    assert len(json.dumps(out)) <= 16 * 1024
    assert any(t.startswith("processes: 400 cut to") for t in out["truncated"])
    assert 0 < len(out["processes"]) < 400


def test_past_the_deadline_what_was_gathered_is_kept_and_marked() -> None:
    b = evidence.Bundle({"cgroups": ["/"], "pids": []})
    evidence.collect(b, deadline=time.monotonic() - 1)
    d = b.snapshot(256 * 1024)
    assert not d["complete"] and "time" in d["truncated"]


def test_the_investigator_stores_the_bundle_with_its_incident(tmp_path: Path, child) -> None:
    pid, lport, _ = child
    store = Store(tmp_path / "state.db")
    queued, notified = [], []
    inv = Investigator(store, refresh_s=300, timeout_s=2.0, max_bytes=256 * 1024,
                       recent=lambda w: [{"kind": "activity.exec_new", "workload": w}],
                       notify=notified.append,
                       outbox_add=lambda *a: queued.append(a))
    f = Finding("anomaly.workload", 2, EventClass.SUSPICIOUS_ACTIVITY, Severity.MEDIUM,
                "node", "investigate", 1, 2, {"scope": {"node": "n"}, "pid": pid})
    incident = store.record_finding(f, time.time(), time.time())
    inv.on_finding(incident, f)                 # no event loop here: collected at once
    [e] = [e for e in store.incident_events(incident.id) if e.kind == "evidence"]
    own = [p["pid"] for p in e.data["processes"] if not p.get("ancestor")]
    assert own == [pid] and e.data["listening"] and e.text.startswith("evidence: ")
    assert e.data["recent"] == [{"kind": "activity.exec_new", "workload": "node"}]
    assert queued and queued[0][1] == e.data["evidence_id"] and notified
    inv.on_finding(incident, f)                 # within refresh_s: not again
    assert len([e for e in store.incident_events(incident.id) if e.kind == "evidence"]) == 1
    store.close()


def test_a_collection_that_hangs_is_stored_at_its_deadline(tmp_path: Path) -> None:
    """A read that blocks (here: the GPU source's hook, read on the collecting thread)
    costs a thread, never the investigation: at timeout_s what was gathered is stored,
    marked truncated by time."""
    import asyncio
    import threading

    release = threading.Event()
    store = Store(tmp_path / "state.db")
    inv = Investigator(store, refresh_s=300, timeout_s=0.3, max_bytes=256 * 1024,
                       gpu_processes=lambda: release.wait(10) and [])
    f = Finding("anomaly.workload", 2, EventClass.SUSPICIOUS_ACTIVITY, Severity.MEDIUM,
                "node", "investigate", 1, 2, {"pid": os.getpid()})
    incident = store.record_finding(f, time.time(), time.time())

    async def run() -> float:
        t0 = time.monotonic()
        inv.on_finding(incident, f)
        await asyncio.gather(*inv.tasks)
        return time.monotonic() - t0
    try:
        took = asyncio.run(run())
    finally:
        release.set()
    assert 0.25 < took < 2.0
    [e] = [e for e in store.incident_events(incident.id) if e.kind == "evidence"]
    assert "time" in e.data["truncated"] and not e.data["complete"]
    assert os.getpid() in [p["pid"] for p in e.data["processes"]]   # gathered before it
    assert inv.stats["evidence_timed_out"] == 1
    store.close()
