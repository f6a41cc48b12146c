"""Reverse shells however they are wired: time from starting the wiring to the breach
finding, and what the kernel side costs per invocation.

Each wiring (swarmlab.breachlab: bash /dev/tcp, python dup2 + pty.spawn, mkfifo | sh -i |
nc, socat EXEC) runs in a lab victim namespace against a listener in the attacker
namespace, while the process probe runs as in the agent (ProcProbe.run on one asyncio
loop: kernel events, and "proc.stdio" correlated off the loop) and every event goes
through the breach rules. Clock start: CLOCK_MONOTONIC just before the wiring's first
process is started; end (detected): when the detector produced the first finding for the
wiring's cgroup, per rule (user space); kernel event: the timestamp of the event that
finding came from (for proc.stdio, the correlation's). A wiring run with no finding is
listed as invalid and the bench exits 1.
Kernel cost: run time per invocation of the new programs (BPF_ENABLE_STATS while the
bench runs, read with bpftool).

    sudo .venv/bin/python bench/reverse_shell.py [--runs 3 | --quick] [--json]
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from swarmlab.breachlab import (BASH_TCP, FIFO, PY_PTY, SOCAT, python_wiring,  # noqa: E402
                             reverse_shell)
from agent.config import Config, Probes  # noqa: E402
from agent.detect.rules import Detector, load_rules  # noqa: E402
from swarmlab.lab import Lab  # noqa: E402
from agent.sources.proc import ProcProbe  # noqa: E402

BPF_SYSCALL = {"x86_64": 321, "aarch64": 280}
BPF_ENABLE_STATS, BPF_STATS_RUN_TIME = 32, 0
PROGRAMS = ("handle_exec_stdio", "handle_sys_exit_dup", "handle_sys_exit_dup2",
            "handle_sys_exit_dup3", "handle_sys_enter_fcntl", "handle_sys_exit_fcntl")


def enable_stats() -> int:
    """An fd that keeps the kernel's BPF run-time statistics on while it is open."""
    attr = ctypes.c_uint32(BPF_STATS_RUN_TIME)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(BPF_SYSCALL[platform.machine()], BPF_ENABLE_STATS, ctypes.byref(attr), 4)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "BPF_ENABLE_STATS")
    return fd


def program_costs() -> dict[str, dict]:
    out = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True,
                                    text=True, check=True).stdout)
    costs = {}
    for prog in out:
        if prog.get("name") in PROGRAMS and prog.get("run_cnt"):
            costs[prog["name"]] = {"runs": prog["run_cnt"],
                                   "ns_per_run": round(prog["run_time_ns"] / prog["run_cnt"])}
    return costs


def wirings(tmp: Path) -> dict[str, tuple[str, ...]]:
    return {"bash /dev/tcp": (BASH_TCP,), "python dup2+pty.spawn": python_wiring(PY_PTY),
            "mkfifo, cat f \\| sh -i \\| nc": (FIFO, str(tmp / "f")), "socat EXEC:sh": (SOCAT,)}


async def measure(runs: int) -> tuple[dict, dict, list]:
    # its own registry of process owners: a host agent may own this namespace
    cfg = Config(probes=Probes(process_owners=tempfile.mkdtemp(prefix="swarm-bench-owners-")))
    detector = Detector(load_rules(), cfg)
    probe = ProcProbe(cfg)
    probe.open()
    findings: list[tuple[int, int, str, str]] = []   # (decided ns, event ns, cgroup, rule)

    def on_event(event) -> None:
        for f in detector.evaluate(event, event.mono_ns):
            findings.append((time.monotonic_ns(), event.mono_ns, event.fields.get("cgroup"), f.rule))

    def one(script: tuple[str, ...]) -> dict[str, tuple[float, float]]:
        with Lab() as lab:
            t0 = time.monotonic_ns()
            with reverse_shell(lab, *script) as (cg, _):
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:   # the correlation may take ~2.5 s
                    time.sleep(0.05)
                    if len({r for _, _, c, r in findings if c == cg}) >= 2:
                        break
        first: dict[str, tuple[float, float]] = {}
        for decided, kernel, c, rule in findings:
            if c == cg and rule not in first:
                first[rule] = ((decided - t0) / 1e6, (kernel - t0) / 1e6)
        return first

    task = asyncio.create_task(probe.run(on_event))
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    invalid: list[dict[str, str]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, script in wirings(Path(tmp)).items():
                for n in range(runs):
                    seen = await asyncio.to_thread(one, script)
                    if not seen:
                        invalid.append({"wiring": name, "run": str(n),
                                        "reason": "no finding within 5 s"})
                    for rule, (ms, kernel_ms) in seen.items():
                        r = results.setdefault(name, {}).setdefault(rule, {"detected": [],
                                                                           "kernel": []})
                        r["detected"].append(ms)
                        r["kernel"].append(kernel_ms)
        costs = program_costs()          # while the probe's programs are loaded
    finally:
        task.cancel()
        probe.close()
    return results, costs, invalid


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 run per wiring")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    stats_fd = enable_stats()
    try:
        results, costs, invalid = asyncio.run(measure(1 if args.quick else args.runs))
    finally:
        os.close(stats_fd)
    if args.json:
        print(json.dumps({"latency_ms": results, "kernel": costs, "invalid": invalid}, indent=2))
        return 1 if invalid else 0
    print("| wiring | rule | runs | kernel event median ms | detected median ms | detected max ms |"
          "\n|---|---|---|---|---|---|")
    for name, rules in results.items():
        for rule, r in sorted(rules.items()):
            print(f"| {name} | {rule} | {len(r['detected'])} | {statistics.median(r['kernel']):.0f} | "
                  f"{statistics.median(r['detected']):.0f} | {max(r['detected']):.0f} |")
    print("\n| program | runs | ns/run |\n|---|---|---|")
    for name, c in costs.items():
        print(f"| {name} | {c['runs']} | {c['ns_per_run']} |")
    for bad in invalid:
        print(f"invalid: {bad['wiring']} run {bad['run']}: {bad['reason']}")
    if invalid:
        print("FAILED: a wiring went undetected", file=sys.stderr)
    return 1 if invalid else 0


if __name__ == "__main__":
    sys.exit(main())
