"""What the anomaly engine costs per node: CPU per scored window per detector and state
bytes per workload, on a synthetic node with --workloads busy workloads (each a distinct
profile: the worst case for state) replayed for --hours of simulated time.

CPU is this process's CPU time (time.process_time) around tick() only, divided by the
windows the detector scored; state is the JSON snapshot's size divided by the profiles.
A run in which the detector scored no window is invalid (exit status 1): a cost per
nothing is not a figure.

    .venv/bin/python bench/anomaly_cost.py --quick          # 20 workloads, 2 h
    .venv/bin/python bench/anomaly_cost.py --json           # 50 workloads, 6 h
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from agent.detect.anomaly import AnomalyConfig, AnomalyEngine   # noqa: E402
from agent.model import Event                                   # noqa: E402

S = 10**9
DETECTORS = ("mahalanobis", "hst", "loda", "zscore", "newexe", "beacon", "drift")


def events(seed: int, workloads: int, hours: float) -> list[Event]:
    """Per workload: Poisson outbound connections (rate 0.2-3/s) to a few destinations,
    their closes with sizes, an exec now and then."""
    r = random.Random(seed)
    out: list[Event] = []
    end = hours * 3600
    for k in range(workloads):
        cg = f"/system.slice/svc{k}.service"
        rate, dsts = r.uniform(0.2, 3.0), [f"10.{k}.0.{i}" for i in range(1, 5)]
        t = r.random()
        while t < end:
            t += r.expovariate(rate)
            d = r.choice(dsts)
            f = {"daddr": d, "dport": 443, "outcome": "established", "cgroup": cg,
                 "exe": f"/usr/bin/svc{k}", "exe_id": f"8:1:{k}"}
            out.append(Event("flow.connect", d, int(t * S), int(t * S), f, "activity"))
            out.append(Event("flow.close", d, int((t + 0.1) * S), int(t * S),
                             {**f, "bytes_out": int(r.expovariate(1 / 4000)), "bytes_in": 900},
                             "activity"))
            if r.random() < 0.01:
                out.append(Event("proc.exec", f"pid:{k}", int(t * S), int(t * S),
                                 {"cgroup": cg, "exe": "/bin/sh", "exe_id": "8:1:99"}, "activity"))
    out.sort(key=lambda e: e.mono_ns)
    return out


def measure(det: str, evs: list[Event], hours: float, workloads: int) -> dict:
    cfg = AnomalyConfig.from_dict({"detectors": [det], "warmup_s": 1800})
    eng = AnomalyEngine(cfg, "bench")
    i, tick_cpu, observe_cpu = 0, 0.0, 0.0
    for k in range(int(hours * 3600 * 2)):
        now = k * S // 2
        t0 = time.process_time()
        while i < len(evs) and evs[i].mono_ns <= now:
            eng.observe(evs[i])
            i += 1
        t1 = time.process_time()
        eng.tick(now)
        t2 = time.process_time()
        observe_cpu += t1 - t0
        tick_cpu += t2 - t1
    st = eng.status()["detectors"][det]
    snap = json.dumps(eng.snapshot(0.0), separators=(",", ":"))
    windows = st["windows"]
    return {"detector": det, "windows": windows,
            "ms_per_window": round(1000 * tick_cpu / windows, 4) if windows else None,
            "observe_us_per_event": round(1e6 * observe_cpu / max(i, 1), 2),
            "state_bytes": len(snap), "state_bytes_per_workload": len(snap) // max(workloads, 1),
            "invalid": None if windows else "the detector scored no window"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", type=int, default=50)
    ap.add_argument("--hours", type=float, default=6.0)
    ap.add_argument("--quick", action="store_true", help="20 workloads, 2 hours")
    ap.add_argument("--detectors", default=",".join(DETECTORS))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.workloads, a.hours = 20, 2.0
    evs = events(a.seed, a.workloads, a.hours)
    rows = [measure(d, evs, a.hours, a.workloads) for d in a.detectors.split(",")]
    if a.json:
        print(json.dumps({"workloads": a.workloads, "hours": a.hours, "events": len(evs),
                          "rows": rows}, indent=2))
    else:
        print(f"{a.workloads} workloads, {a.hours:g} h simulated, {len(evs)} events")
        print(f"{'DETECTOR':<12} {'WINDOWS':>8} {'MS/WINDOW':>10} {'US/EVENT':>9} "
              f"{'STATE B':>9} {'B/WORKLOAD':>10}")
        for r in rows:
            print(f"{r['detector']:<12} {r['windows']:>8} {r['ms_per_window'] or '-':>10} "
                  f"{r['observe_us_per_event']:>9} {r['state_bytes']:>9} "
                  f"{r['state_bytes_per_workload']:>10}" +
                  (f"  INVALID: {r['invalid']}" if r["invalid"] else ""))
    return 1 if any(r["invalid"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
