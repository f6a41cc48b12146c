"""GPU authorization, NVML only: from an unauthorized process showing up in NVML's process
list to that process killed, on a running agent, against the stand-in NVML library.

    sudo .venv/bin/python bench/gpu_authorization.py                  # 20 runs, sample_s 1
    sudo .venv/bin/python bench/gpu_authorization.py --quick --json   # 5 runs
    sudo .venv/bin/python bench/gpu_authorization.py --sample-s 5     # the packaged default
    sudo .venv/bin/python bench/gpu_authorization.py --via open       # the kernel's device open

It builds the stand-in libnvidia-ml (tests/nvml/fake_nvml.c, through the real pynvml
binding), a lab namespace (swarmlab.lab) and `swarm-agent run` there with the policy rules
(agent/rules/policy.yaml) and one authorized workload, whose process is on the GPU for the
whole bench and must survive it. Each run starts a process in a fresh unauthorized
cgroup, waits a random part of sample_s (a random phase against the sampling), then
writes the NVML state file that lists it on GPU 0 (atomically: rename):
that write is the violating action (t0, this process's CLOCK_MONOTONIC, taken just
before the rename). *killed* is when this process sees its child end (a pidfd becoming
readable, polled in a thread blocked in poll(), so no polling interval is added), with
SIGKILL. *detected* and *mitigated* come from the agent's incident record (wall clock,
converted with the wall-monotonic offset read here). NVML is sampled every sample_s, so
t0 -> detected is uniform over [0, sample_s] plus the sampling cost: the figure to read
is its maximum against sample_s, and detected -> killed (the agent's own work).

--via open measures the kernel side instead: the process probe reports opens of character
devices of gpu.device_major; with no NVIDIA driver here the bench names the memory
devices' major (1) and the process, in the agent's network namespace and a fresh
unauthorized cgroup, opens /dev/full. t0 is the process's own CLOCK_MONOTONIC just before
its open (printed to a pipe); NVML never lists it.

A run is invalid -- listed with its reason, never averaged in -- when the process is not
killed within 3 x sample_s + 5 s, dies of anything but SIGKILL, or no incident is
recorded for its workload. The bench exits 1 when any run is invalid or when the
authorized workload's process was killed. Everything it made is removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import select
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.sources.cgroups import cgroup2_mount  # noqa: E402
from swarmlab.breachlab import throwaway_cgroup  # noqa: E402
from swarmlab.lab import Lab, wait_for  # noqa: E402
from swarmlab.scenario import AgentProcess  # noqa: E402
from tests.nvml.fakenvml import Script, build  # noqa: E402

RULES = Path(__file__).resolve().parents[1] / "agent" / "rules" / "policy.yaml"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


# t0 goes out before the open: the kill may come before any later write
OPENER = ("import os, time; os.write(1, b'%d\\n' % time.monotonic_ns()); "
          "f = open('/dev/full', 'rb'); time.sleep(600)")


def open_in(cg: Path, ns: str) -> tuple[subprocess.Popen, float]:
    """A process in cgroup `cg` and netns `ns` that opens /dev/full: (it, t0 seconds)."""
    cg.mkdir(exist_ok=True)
    p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", OPENER],
                         stdout=subprocess.PIPE,
                         preexec_fn=lambda: (cg / "cgroup.procs").write_text(str(os.getpid())))
    line = p.stdout.readline()
    return p, (int(line) / 1e9 if line.strip() else float("nan"))


def start_in(cg: Path) -> subprocess.Popen:
    cg.mkdir(exist_ok=True)
    return subprocess.Popen(["sleep", "600"],
                            preexec_fn=lambda: (cg / "cgroup.procs").write_text(str(os.getpid())))


def ended_at(proc: subprocess.Popen, timeout_s: float) -> float | None:
    """CLOCK_MONOTONIC when `proc` ended (its pidfd readable), None on timeout."""
    fd = os.pidfd_open(proc.pid)
    try:
        p = select.poll()
        p.register(fd, select.POLLIN)
        if not p.poll(timeout_s * 1000):
            return None
        return time.monotonic()
    finally:
        os.close(fd)


def incident_times(db: Path, entity: str) -> tuple[float, float | None] | None:
    """(detected_at, mitigated_at) of the workload's incident, wall clock."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = con.execute("SELECT detected_at, mitigated_at FROM incidents WHERE entity = ?",
                          (entity,)).fetchone()
    finally:
        con.close()
    return None if row is None else (row[0], row[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="5 runs")
    ap.add_argument("--sample-s", type=float, default=1.0,
                    help="gpu.sample_s of the agent (the packaged default is 5)")
    ap.add_argument("--via", choices=("nvml", "open"), default="nvml",
                    help="nvml: NVML lists the process (default); open: the kernel sees it "
                    "open a GPU device (here the memory devices' major, /dev/full)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    runs = 5 if args.quick else args.runs
    limit_s = 3 * args.sample_s + 5
    samples, invalid = [], []
    with tempfile.TemporaryDirectory(prefix="gpuauth-bench-") as tmp, Lab() as lab, \
            throwaway_cgroup("swa-gpubench") as outer:
        tmp_p = Path(tmp)
        lib = build(tmp_p)
        script = Script(tmp_p / "nvml.state")
        script.gpu()
        os.environ["FAKE_NVML_STATE"] = str(script.path)
        ok_cg = outer / "authorized"
        rel = lambda cg: "/" + str(cg.relative_to(cgroup2_mount()))   # noqa: E731
        ok = start_in(ok_cg) if args.via == "nvml" else None
        if ok is not None:
            script.procs.append({"gpu": 0, "pid": ok.pid, "mem": 1 << 30})
        script.write()
        (tmp_p / "agent").mkdir()
        agent = AgentProcess(lab.victim, tmp_p / "agent", extra_config=(
            f"rules_file: {RULES}\ngpu:\n  sample_s: {args.sample_s}\n  on_violation: kill\n  nvml_library: {lib}\n"
            + ("  device_major: 1\n" if args.via == "open" else "") +
            f"  authorized:\n    - workload: {rel(ok_cg)}\n      gpus: all\n"))
        agent.start()
        if ok is None:     # the authorized workload opens the device too
            ok = open_in(ok_cg, lab.victim)[0]
        procs = []
        try:
            for n in range(runs):
                cg = outer / f"miner-{n}"
                off = time.time() - time.monotonic()
                if args.via == "open":
                    proc, t0 = open_in(cg, lab.victim)
                    procs.append((cg, proc))
                else:
                    proc = start_in(cg)
                    procs.append((cg, proc))
                    script.procs.append({"gpu": 0, "pid": proc.pid, "mem": 1 << 28})
                    # A random phase against the sampling: each run would otherwise start
                    # just after the sample that saw the last one (the kill follows it).
                    time.sleep(random.uniform(0, args.sample_s))
                    off = time.time() - time.monotonic()
                    t0 = time.monotonic()
                    script.write()
                end = ended_at(proc, limit_s)
                proc.wait(5) if end is not None else None
                entity = f"cgroup:{rel(cg)}"
                times = None
                if end is not None:
                    try:
                        times = wait_for(lambda: incident_times(agent.db_path, entity), 5)
                    except TimeoutError:
                        times = None
                why = ("no t0 from the process" if t0 != t0 else
                       f"not killed within {limit_s:.0f} s" if end is None else
                       f"ended with {proc.returncode}, not SIGKILL" if proc.returncode != -9
                       else "no incident recorded" if times is None else None)
                if why:
                    invalid.append({"run": n, "why": why})
                else:
                    det, mit = times
                    samples.append({"run": n, "killed_ms": (end - t0) * 1e3,
                                    "detected_ms": (det - off - t0) * 1e3,
                                    "detected_to_killed_ms": (end - (det - off)) * 1e3,
                                    "mitigated_ms": None if mit is None else
                                    (mit - off - t0) * 1e3})
                script.procs = [p for p in script.procs if p["pid"] != proc.pid]
                script.write()
            authorized_survived = ok.poll() is None
        finally:
            agent.stop()
            for _, p in procs + [(None, ok)]:
                p.kill()
                p.wait()
            for cg, _ in procs + [(ok_cg, ok)]:
                try:
                    cg.rmdir()
                except OSError:
                    pass
    killed = [s["killed_ms"] for s in samples]
    out = {
        "bench": "gpu_authorization", "via": args.via, "machine": platform.node(), "cpus": os.cpu_count(),
        "sample_s": args.sample_s, "runs": runs, "valid": len(samples), "invalid": invalid,
        "authorized_survived": authorized_survived,
        "killed_ms": {"p50": percentile(killed, 0.5), "p95": percentile(killed, 0.95),
                      "max": round(max(killed), 1) if killed else None},
        "detected_ms": {"p50": percentile([s["detected_ms"] for s in samples], 0.5),
                        "max": round(max([s["detected_ms"] for s in samples]), 1)
                        if samples else None},
        "detected_to_killed_ms": {
            "p50": percentile([s["detected_to_killed_ms"] for s in samples], 0.5),
            "p95": percentile([s["detected_to_killed_ms"] for s in samples], 0.95)},
        "samples": samples,
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        what = ("NVML lists an unauthorized process" if args.via == "nvml" else
                "an unauthorized process opens a GPU device")
        print(f"{what} -> killed, sample_s {args.sample_s}: "
              f"p50 {out['killed_ms']['p50']} ms, p95 {out['killed_ms']['p95']} ms, max "
              f"{out['killed_ms']['max']} ms ({len(samples)}/{runs} valid runs)")
        print(f"  -> detected p50 {out['detected_ms']['p50']} ms (max "
              f"{out['detected_ms']['max']}); detected -> killed p50 "
              f"{out['detected_to_killed_ms']['p50']} ms, p95 "
              f"{out['detected_to_killed_ms']['p95']} ms")
        for bad in invalid:
            print(f"  invalid run {bad['run']}: {bad['why']}")
        print("authorized workload's process: " +
              ("still running" if authorized_survived else "KILLED (a failure)"))
    return 0 if samples and not invalid and authorized_survived else 1


if __name__ == "__main__":
    raise SystemExit(main())
