"""What an investigation's evidence bundle costs (agent/respond/evidence.py): wall and CPU
time of one collection, and the bundle's size, for a workload of N processes holding M TCP
sockets in its own cgroup and network namespace (the lab's victim).

Each run collects the bundle of the workload's cgroup as the agent does (bounded by
investigation.timeout_s, 2 s) and checks it against the workload the bench built: a run
is invalid when the bundle missed processes or sockets, or collection hit the deadline
(then the figure would be the deadline, not the cost). Runs alternate with nothing else;
the machine may be busy (other tests): say so next to the figure.

    sudo .venv/bin/python bench/evidence_cost.py [--processes 200] [--sockets 500]
                                                 [--runs 30] [--quick] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.respond import evidence                                   # noqa: E402
from swarmlab import figures                                         # noqa: E402
from swarmlab.breachlab import cgroup_path, throwaway_cgroup         # noqa: E402
from swarmlab.lab import Lab, spawn_in                               # noqa: E402

HOLDER = """
import socket, subprocess, sys, time
n_children, n_pairs, addr = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
srv = socket.socket(); srv.bind((addr, 0)); srv.listen(4096)
held = []
for _ in range(n_pairs):
    c = socket.create_connection(srv.getsockname()); s, _ = srv.accept(); held += [c, s]
kids = [subprocess.Popen(["sleep", "600"]) for _ in range(n_children)]
print("ready", flush=True)
time.sleep(600)
"""
TIMEOUT_S = 2.0
MAX_BYTES = 256 * 1024


def run_once(cg: str, processes: int, sockets: int) -> dict:
    b = evidence.Bundle({"cgroups": [cg], "pids": []})
    t0, c0 = time.monotonic(), time.thread_time()
    evidence.collect(b, deadline=t0 + TIMEOUT_S, counters={"x": 1})
    wall_ms, cpu_ms = (time.monotonic() - t0) * 1e3, (time.thread_time() - c0) * 1e3
    out = b.snapshot(MAX_BYTES)
    got_p = len(out["processes"])
    got_s = len(out["listening"]) + len(out["connections"])
    why = None
    if not out["complete"]:
        why = f"collection hit the {TIMEOUT_S} s deadline"
    elif got_p != processes:
        why = f"bundle holds {got_p} processes, the workload has {processes}"
    elif got_s < sockets and not any("cut" in t for t in out["truncated"]):
        why = f"bundle holds {got_s} sockets, the workload has {sockets}"
    return {"wall_ms": round(wall_ms, 3), "cpu_ms": round(cpu_ms, 3),
            "bytes": len(json.dumps(out)), "processes": got_p, "sockets": got_s,
            "truncated": out["truncated"], "invalid": why}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=200)
    p.add_argument("--sockets", type=int, default=500, help="TCP sockets (pairs x 2 + 1)")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--quick", action="store_true", help="50 processes, 100 sockets, 5 runs")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.processes, a.sockets, a.runs = 50, 100, 5
    pairs = max(0, (a.sockets - 1) // 2)
    with Lab() as lab, throwaway_cgroup("swa-evbench") as cg:
        holder = spawn_in(lab.victim, sys.executable, "-c", HOLDER, str(a.processes - 1),
                          str(pairs), lab.addr("victim"), cgroup=cg)
        try:
            assert holder.stdout.readline().strip() == "ready", "the workload did not start"
            runs = [run_once(cgroup_path(cg), a.processes, 2 * pairs + 1) for _ in range(a.runs)]
        finally:
            holder.kill()
            holder.wait(10)
    valid, invalid = figures.split(runs)
    result = {"processes": a.processes, "sockets": 2 * pairs + 1, "runs": len(runs),
              "wall_ms": figures.spread([r["wall_ms"] for r in valid]),
              "cpu_ms": figures.spread([r["cpu_ms"] for r in valid]),
              "bytes": figures.spread([r["bytes"] for r in valid]),
              "truncated": sorted({t for r in valid for t in r["truncated"]}),
              "invalid": invalid}
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"evidence bundle of {a.processes} processes, {result['sockets']} sockets, "
              f"{len(valid)}/{len(runs)} valid runs")
        for key in ("wall_ms", "cpu_ms", "bytes"):
            s = result[key]
            print(f"  {key:<8} median {s['median']}  p95 {s['p95']}  max {s['max']}")
        if result["truncated"]:
            print("  truncated: " + "; ".join(result["truncated"]))
    failed = ["evidence"] if figures.too_many_invalid(len(runs), len(invalid)) else []
    return figures.print_invalid([("evidence", invalid)], failed, figures.MAX_INVALID_FRACTION)


if __name__ == "__main__":
    sys.exit(main())
