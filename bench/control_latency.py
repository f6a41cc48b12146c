"""Control-call latency (p50/p99) against a running agent, over the local unix socket.

    sudo .venv/bin/python bench/control_latency.py              # throw-away lab + agent
    sudo .venv/bin/python bench/control_latency.py --calls 2000 --json

It builds a lab (swarmlab.lab), runs `swarm-agent run` for the victim namespace, and times
round trips from a fresh client through the peer-credential front to the grpc.aio
server: read calls, and block + lift pairs of a documentation address (198.51.100.0/24)
that go through the responder and one nftables transaction each. Everything it made is
removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarmlab.lab import Lab  # noqa: E402
from agent.proto.swarm.control.v1 import control_pb2 as pb  # noqa: E402
from agent.proto.swarm.control.v1 import control_pb2_grpc  # noqa: E402
from swarmlab.scenario import AgentProcess  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed(fn, n: int) -> dict[str, float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return {"calls": n, "p50_ms": round(percentile(samples, 0.5), 3),
            "p99_ms": round(percentile(samples, 0.99), 3),
            "mean_ms": round(statistics.fmean(samples), 3)}


def measure(stub: control_pb2_grpc.ControlStub, calls: int) -> dict[str, dict[str, float]]:
    for _ in range(20):   # warm the channel and the agent's code paths
        stub.GetStatus(pb.GetStatusRequest(), timeout=10)
    counter = iter(range(10**9))

    def block_and_lift() -> None:
        n = next(counter)
        target = f"198.51.100.{n % 250 + 1}"
        stub.ApplyMitigation(pb.ApplyMitigationRequest(target=target, ttl_s=60), timeout=10)
        stub.LiftMitigation(pb.LiftMitigationRequest(target=target), timeout=10)

    return {
        "GetStatus": timed(lambda: stub.GetStatus(pb.GetStatusRequest(), timeout=10), calls),
        "ListIncidents": timed(lambda: stub.ListIncidents(pb.ListIncidentsRequest(), timeout=10),
                               calls),
        "ListMitigations": timed(
            lambda: stub.ListMitigations(pb.ListMitigationsRequest(), timeout=10), calls),
        "ApplyMitigation+LiftMitigation": timed(block_and_lift, max(1, calls // 5)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=1000, help="calls per read method")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("control_latency: needs root (it builds network namespaces)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="swarm-bench-control-"))
    try:
        with Lab() as lab:
            agent = AgentProcess(lab.victim, tmp)
            agent.start()
            try:
                with grpc.insecure_channel(f"unix:{tmp}/run/control.sock") as ch:
                    results = measure(control_pb2_grpc.ControlStub(ch), args.calls)
            finally:
                agent.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {"machine": f"{platform.node()} {platform.release()} {os.cpu_count()} cpus",
           "results": results}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{'call':<32} {'calls':>6} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
        for name, r in results.items():
            print(f"{name:<32} {r['calls']:>6} {r['p50_ms']:>8} {r['p99_ms']:>8} {r['mean_ms']:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
