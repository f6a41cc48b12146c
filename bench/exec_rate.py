"""Exec-event rate the process probe and the detector sustain without loss.

Spawns N short processes as fast as a shell loop can (fork + exec /bin/true, several
loops in parallel), with the probe in its worst case (`all_execs`: every exec on the
host is sent, not only shells and services' children) and every event going through the
breach rules on one asyncio loop, as in the agent. Counts the spawner's exec events
against the spawns, and the kernel's ring-buffer losses.

    sudo .venv/bin/python -m bench.exec_rate [--spawns 20000] [--loops 2] [--ring-kib 1024]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from collections import Counter

from agent.config import Config, Probes
from agent.detect.rules import Detector, load_rules
from agent.sources.proc import ProcProbe

LOOP = 'i=0; while [ $i -lt {n} ]; do /bin/true; i=$((i+1)); done'


async def measure(spawns: int, loops: int, ring_kib: int, all_execs: bool) -> dict:
    # its own registry of process owners: a host agent may own this namespace
    cfg = Config(probes=Probes(process_owners=tempfile.mkdtemp(prefix="swarm-bench-owners-")))
    detector = Detector(load_rules(), cfg)
    probe = ProcProbe(cfg, all_execs=all_execs, ring_bytes=ring_kib * 1024)
    probe.open()
    counts = {"events": 0, "findings": 0}
    detect_ns = 0
    by_parent: Counter[int] = Counter()   # exec of /bin/true per parent pid

    def on_event(event) -> None:
        nonlocal detect_ns
        counts["events"] += 1
        t0 = time.perf_counter_ns()
        counts["findings"] += len(detector.evaluate(event, event.mono_ns))
        detect_ns += time.perf_counter_ns() - t0
        if event.kind == "proc.exec" and event.fields["comm"] == "true":
            by_parent[event.fields["ppid"]] += 1

    task = asyncio.create_task(probe.run(on_event))
    try:
        await asyncio.sleep(0.1)
        per_loop = spawns // loops
        t0 = time.monotonic()
        procs = [await asyncio.create_subprocess_exec("sh", "-c", LOOP.format(n=per_loop))
                 for _ in range(loops)]
        for p in procs:
            await p.wait()
        spawn_s = time.monotonic() - t0

        def ours() -> int:
            return sum(by_parent[p.pid] for p in procs)

        expected, last, stable_since = per_loop * loops, -1, time.monotonic()
        while ours() < expected and time.monotonic() - stable_since < 2.0:
            if ours() != last:
                last, stable_since = ours(), time.monotonic()
            await asyncio.sleep(0.05)
        counts["ours"] = ours()
        drain_s = time.monotonic() - t0 - spawn_s
    finally:
        task.cancel()
        losses = probe.losses()
        probe.close()
    return {
        "mode": "all_execs" if all_execs else "default filter",
        "spawns": expected, "exec_events_seen": counts["ours"],
        "missing": expected - counts["ours"], "ring_losses": losses,
        "spawn_s": round(spawn_s, 3), "spawns_per_s": round(expected / spawn_s),
        "drain_after_s": round(drain_s, 3), "events_total": counts["events"],
        "detector_us_per_event": round(detect_ns / max(1, counts["events"]) / 1000, 1),
        "ring_kib": ring_kib, "loops": loops,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spawns", type=int, default=20000)
    ap.add_argument("--loops", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--ring-kib", type=int, default=1024)
    ap.add_argument("--default-filter", action="store_true",
                    help="the production filter (only shells etc.): /bin/true is then not sent")
    args = ap.parse_args()
    result = asyncio.run(measure(args.spawns, args.loops, args.ring_kib, not args.default_filter))
    result["machine"] = f"{platform.node()} {platform.release()} {os.cpu_count()} cpus"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
