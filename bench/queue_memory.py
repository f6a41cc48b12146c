"""What one queued event costs in memory (agent.sources.queue), for probes.queue_events.

Builds decoded events as agent/sources/proc.py emits them (every field of a proc.exec,
distinct strings per event as decoding makes them, argv at the probe's 256-byte cut),
queues N of them and measures the heap with tracemalloc: per event in one sub-queue (a
storm from one cgroup) and with every event its own owner (a storm spread over cgroups:
each sub-queue's deque and dict entries added). Network events are smaller.

    .venv/bin/python bench/queue_memory.py [--n 20000] [--json]
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.detect import triage  # noqa: E402
from agent.model import Event  # noqa: E402
from agent.sources.queue import EventQueue  # noqa: E402


def exec_event(i: int, spread: bool) -> Event:
    argv = [f"--opt{i}-{k:02d}=" + "x" * 12 for k in range(11)]   # ~250 bytes, the probe's cut
    cg = 1000 + (i if spread else 0)
    fields = {
        "pid": 10_000 + i, "tid": 10_000 + i, "ppid": 9_000 + i, "uid": 1000, "euid": 1000,
        "comm": f"python3-{i % 100}", "parent_comm": f"bash-{i % 100}",
        "cgroup_id": cg, "cgroup": f"/tenant.slice/job-{cg}.scope",
        "exe": f"/opt/conda/envs/e{i % 7}/bin/python3.11", "exe_id": f"259:1:{400_000 + i}",
        "exe_is": [],
        "ancestor_exes": [f"/usr/bin/bash{i % 3}", f"259:1:{i}", "/usr/lib/systemd/systemd"],
        "ancestors_are": ["service_managers", "shells"], "parent_is": ["shells"],
        "loginuid": None, "sessionid": None, "service_cgroup": False, "reparented": False,
        "manager_start": False,
        "filename": f"/opt/conda/envs/e{i % 7}/bin/python3", "argv": argv, "args": " ".join(argv),
        "stdin": "pipe", "stdout": "pipe", "stderr": "pipe", "stdio_inet": 0,
        "reason": ["program"]}
    return Event("proc.exec", f"pid:{10_000 + i}", 10**12 + i, 10**12 + i, fields, "bpf.proc")


def measure(n: int, spread: bool) -> float:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    q: EventQueue[Event] = EventQueue(n)
    for i in range(n):
        e = exec_event(i, spread)
        assert q.put(e.kind, e, owner=triage.owner(e))
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(q) == n
    return used / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    r = {"n": args.n, "bytes_per_event_one_owner": round(measure(args.n, False)),
         "bytes_per_event_each_own_owner": round(measure(args.n, True))}
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['n']} proc.exec events queued: {r['bytes_per_event_one_owner']} B each "
              f"in one sub-queue, {r['bytes_per_event_each_own_owner']} B each with every "
              "event its own owner")
    return 0


if __name__ == "__main__":
    sys.exit(main())
