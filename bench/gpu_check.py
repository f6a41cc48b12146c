"""The GPU source against a real NVIDIA driver (bench/gpu_check.sh runs this; standard
library + the vendored pynvml only, no PyYAML/grpc needed).

1. NVML: driver, GPUs, the event types each supports, one sample of every counter
   ("None" = the GPU answered "not supported").
2. Sampling cost: --cost-samples back-to-back samples of every GPU (CPU s per sample).
3. The source's thread runs (--sample-s) while two small CUDA processes (bench/gpu_hold.py:
   driver API through ctypes, no torch/nvcc) start, each in its own fresh cgroup where the
   cgroup filesystem is writable, the first as user nobody where setpriv can: one
   "authorized", one not. Checks: each is seen on the GPU with its pid, memory (at least
   what it allocated), cgroup, uid, executable and open /dev/nvidia* files; the time from
   its first allocation to the source's event (NVML-only detection latency); the source's
   CPU per sample and per second of wall time while it ran.
4. GPU authorization (issue 10 item 6): the first holder's cgroup is granted every GPU
   (agent.gpugrant); both events judged (the detector with policy.gpu_unauthorized where
   PyYAML and Python 3.11 are there, the verdict alone otherwise); the unauthorized
   holder killed by the agent's exact kill (agent.enforce.process: pidfd-pinned, start
   time and cgroup checked), the authorized one still running a second later.
Each check prints PASS, FAIL or SKIP with its reason. Exit: 0 no FAIL, 1 a FAIL, 2 no
NVML/GPU, 3 no usable CUDA for the test processes.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import select
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.sources import gpuproc                           # noqa: E402
from agent.sources.gpu import GpuSource                     # noqa: E402
from agent.sources.nvml import Absent, Nvml, NvmlFailure    # noqa: E402

RESULTS: list[tuple[str, str, str]] = []
READY_TIMEOUT_S = 90.0      # CUDA init of a cold GPU without persistence mode takes seconds


def check(name: str, ok: bool | None, detail: str) -> None:
    verdict = "SKIP" if ok is None else "PASS" if ok else "FAIL"
    RESULTS.append((verdict, name, detail))
    print(f"  [{verdict}] {name}: {detail}", flush=True)


def nvml_overview(library: str | None, cost_samples: int) -> dict:
    from agent._vendor import pynvml as nv
    n = Nvml(library)
    n.open()
    try:
        print(f"NVML: driver {n.driver}, {len(n.devices)} GPU(s)")
        for d in n.devices:
            try:
                types = nv.nvmlDeviceGetSupportedEventTypes(d.handle)
            except nv.NVMLError as e:
                types = f"unknown ({e})"
            s = n.sample(d)
            print(f"  GPU {d.index} {d.uuid} {d.name}: supported event types "
                  f"{types if isinstance(types, str) else hex(types)} (XID 0x8: "
                  f"{'yes' if not isinstance(types, str) and types & 0x8 else 'no'})")
            print("    " + ", ".join(f"{k}={v}" for k, v in asdict(s).items()
                                     if k not in ("index", "uuid", "name")))
        src = GpuSource()
        src._emit = lambda e: None
        cpu0, t0 = time.thread_time(), time.perf_counter()
        for _ in range(cost_samples):
            src.sample_once(n)
        cpu, wall = time.thread_time() - cpu0, time.perf_counter() - t0
        per = cpu / cost_samples
        print(f"  sampling cost: {cost_samples} samples of {len(n.devices)} GPU(s): "
              f"{per * 1000:.3f} ms CPU and {wall / cost_samples * 1000:.3f} ms wall per sample")
        return {"driver": n.driver, "gpus": len(n.devices), "cpu_ms_per_sample":
                round(per * 1000, 3), "wall_ms_per_sample": round(wall / cost_samples * 1000, 3)}
    finally:
        n.close()


def make_cgroup(name: str) -> Path | None:
    from agent.sources.cgroups import cgroup2_mount
    root = cgroup2_mount()
    if root is None:
        return None
    d = root / name
    try:
        d.mkdir()
        return d
    except OSError as e:
        print(f"  (cannot create cgroup {d}: {e.strerror}; the processes stay in this one)")
        return None


def start_holder(gpu: int, mib: int, seconds: float, cgroup: Path | None,
                 as_nobody: bool) -> tuple[subprocess.Popen, int, int, str, int]:
    """(process, pid, ready mono ns, how, uid) of a gpu_hold.py that reached the GPU."""
    inner = [sys.executable, str(ROOT / "bench" / "gpu_hold.py"), "--gpu", str(gpu),
             "--mib", str(mib), "--seconds", str(seconds)]
    tries = []
    if as_nobody and shutil.which("setpriv") and os.geteuid() == 0:
        tries.append((["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                       *inner], 65534, cgroup))
    tries.append((inner, os.getuid(), cgroup))
    if cgroup is not None:          # a cgroup that takes no processes here: without it
        tries.append((inner, os.getuid(), None))
    last = ""
    for argv, uid, cg in tries:
        enter = f'echo $$ > "{cg}/cgroup.procs" && ' if cg else ""
        p = subprocess.Popen(["sh", "-c", enter + 'exec "$@"', "sh", *argv],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = ""                      # "ready PID MONO HOW", or EOF when it failed
        if select.select([p.stdout], [], [], READY_TIMEOUT_S)[0]:
            line = p.stdout.readline()
        else:
            p.kill()
        if line.startswith("ready "):
            _, pid, mono, how = line.split()
            return p, int(pid), int(mono), how, uid
        p.wait(30)
        last = p.stderr.read().strip()
        print(f"  (holder as uid {uid}{' in ' + str(cg) if cg else ''} failed: {last})")
    raise RuntimeError(last or "no usable CUDA")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", type=int, default=0)
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--hold-s", type=float, default=60.0,
                    help="the test processes' lifetime (they are ended when the check is)")
    ap.add_argument("--measure-s", type=float, default=12.0,
                    help="how long the source runs with the processes on the GPU")
    ap.add_argument("--sample-s", type=float, default=1.0)
    ap.add_argument("--cost-samples", type=int, default=20)
    ap.add_argument("--library", help="NVML library (default: the driver's libnvidia-ml.so.1)")
    ap.add_argument("--json-out", help="write the summary as JSON here too")
    a = ap.parse_args()
    summary: dict = {}
    print("== 1-2. NVML through the vendored binding, and the sampling cost")
    try:
        summary["nvml"] = nvml_overview(a.library, a.cost_samples)
    except (Absent, NvmlFailure) as e:
        print(f"  NVML unusable: {e}")
        summary["nvml"] = {"error": str(e)}
        return finish(summary, a, 2)
    print(f"== 3. the source's thread (sample every {a.sample_s} s) and two CUDA processes")
    events: list = []
    src = GpuSource(sample_s=a.sample_s, library=a.library)
    src.start(events.append, lambda fn, e: fn(e))
    tag = secrets.token_hex(3)
    cg_ok, cg_bad = make_cgroup(f"swa-gpucheck-ok-{tag}"), make_cgroup(f"swa-gpucheck-x-{tag}")
    holders = []
    t_run, cpu_run = time.monotonic(), None
    try:
        for cg, nobody, mib in ((cg_ok, True, a.mib), (cg_bad, False, max(64, a.mib // 2))):
            try:
                holders.append((start_holder(a.gpu, mib, a.hold_s, cg, nobody), mib))
            except RuntimeError as e:
                print(f"  no CUDA process could start: {e}")
                return finish(summary, a, 3)
        pids = {h[1] for h, _ in holders}
        deadline = time.monotonic() + max(10.0, 5 * a.sample_s)
        while time.monotonic() < deadline and not pids <= {e.fields["pid"] for e in list(events)
                                                           if e.kind == "gpu.process"}:
            time.sleep(0.05)
        # The sampling cost is measured over a fixed window with the processes on the GPU.
        time.sleep(max(0.0, a.measure_s - (time.monotonic() - t_run)))
        cpu_run = (src.sample_cpu_s, src.sample_count, time.monotonic() - t_run)
        summary["processes"] = [verify(h, mib, events) for h, mib in holders]
        smi_cross_check(pids)
        demo_authorization(events, holders[0][0], holders[1][0])
    finally:
        for (p, *_), _mib in holders:
            p.terminate()
            p.wait(10)
        src.stop()
        for cg in (cg_ok, cg_bad):
            if cg is not None:
                try:
                    cg.rmdir()
                except OSError:
                    pass
    cpu_s, n, wall = cpu_run
    per_s = cpu_s / wall if wall else 0
    check("sampling CPU while running", True, f"{n} samples in {wall:.1f} s: "
          f"{cpu_s * 1000 / max(n, 1):.3f} ms CPU per sample, {per_s * 1000:.3f} ms CPU per "
          f"second at sample_s={a.sample_s} (thread CPU time)")
    summary["sampling"] = {"samples": n, "cpu_ms_per_sample": round(cpu_s * 1000 / max(n, 1), 3),
                           "cpu_ms_per_s": round(per_s * 1000, 3), "sample_s": a.sample_s}
    check("source state", src.status()["state"] in ("loaded", "stopped"), str(src.status()))
    return finish(summary, a, 1 if any(r[0] == "FAIL" for r in RESULTS) else 0)


def verify(holder, mib: int, events: list) -> dict:
    p, pid, ready_ns, how, uid = holder
    seen = [e for e in list(events) if e.kind == "gpu.process" and e.fields["pid"] == pid]
    expected_cg = gpuproc.cgroup_of(pid)
    print(f"  holder pid {pid} ({how}, {mib} MiB, uid {uid}, cgroup {expected_cg}):")
    if not seen:
        nested = len(open("/proc/self/status").read().split("NSpid:")[1].split("\n")[0].split()) > 1
        check(f"pid {pid} seen on a GPU", False, "not in NVML's list" + (
            " -- this runs in a child pid namespace, and NVML reports the host's pids: run "
            "the agent (and this check) in the host's pid namespace" if nested else ""))
        return {"pid": pid, "seen": False}
    f = seen[0].fields
    latency_ms = (seen[0].mono_ns - ready_ns) / 1e6
    check(f"pid {pid} seen on a GPU", True, f"GPU {f['gpu_index']} {f['gpu_uuid']}, "
          f"{latency_ms:.0f} ms after its allocation")
    used = f.get("used_memory_bytes")
    check("its memory", used is not None and used >= mib << 20,
          f"{None if used is None else used >> 20} MiB used (allocated {mib} MiB)")
    check("its cgroup", f.get("cgroup") == expected_cg, f"{f.get('cgroup')} (container "
          f"{f.get('container_id')})")
    check("its user", f.get("uid") == uid, f"uid {f.get('uid')} euid {f.get('euid')}")
    check("its executable", f.get("exe") == os.path.realpath(sys.executable),
          str(f.get("exe")))
    check("it holds /dev/nvidia*", (f.get("gpu_device_fds") or 0) > 0,
          f"{f.get('gpu_device_fds')} GPU device files open")
    return {"pid": pid, "seen": True, "latency_ms": round(latency_ms, 1), **{
        k: f.get(k) for k in ("used_memory_bytes", "cgroup", "uid", "exe", "gpu_device_fds")}}


def smi_cross_check(pids: set[int]) -> None:
    if not shutil.which("nvidia-smi"):
        check("nvidia-smi agrees", None, "no nvidia-smi")
        return
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory,gpu_uuid",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    print("  nvidia-smi --query-compute-apps: " + (out.stdout.strip().replace("\n", "; ")
                                                   or out.stderr.strip()))
    listed = {int(x.split(",")[0]) for x in out.stdout.splitlines() if x.split(",")[0].strip().isdigit()}
    check("nvidia-smi agrees", pids <= listed, f"nvidia-smi lists {sorted(listed)}")


def demo_authorization(events: list, ok_holder, bad_holder) -> None:
    """GPU authorization (issue 10 item 6) on the real driver's evidence: the authorized
    holder's cgroup gets a grant (agent.gpugrant), both events are judged with it, and the
    unauthorized holder is killed by the agent's exact, pidfd-pinned kill; the authorized
    one must keep running."""
    print("== 4. GPU authorization: the unauthorized process judged and stopped")
    ok_proc, ok_pid = ok_holder[0], ok_holder[1]
    bad_proc, bad_pid = bad_holder[0], bad_holder[1]
    by_pid = {e.fields["pid"]: e for e in list(events) if e.kind == "gpu.process"}
    ok, bad = by_pid.get(ok_pid), by_pid.get(bad_pid)
    if ok is None or bad is None:
        check("unauthorized process flagged", None, "a holder was not seen")
        return
    from agent.gpugrant import GpuPolicy, Grant
    allowed = ok.fields["cgroup"]
    policy = GpuPolicy((Grant(allowed, "all"),))
    print(f"  grant: {allowed} may use every GPU")
    print(f"  event: {bad.kind} {bad.subject} {json.dumps(dict(bad.fields), default=str)}")
    v_bad, v_ok = policy.verdict(bad.fields), policy.verdict(ok.fields)
    try:
        from agent.config import Config
        from agent.detect.rules import Detector, parse_rules
        rule = {"id": "policy.gpu_unauthorized", "version": 1, "class": "policy_violation",
                "severity": "high", "action": "kill", "match": [
                    {"event": "gpu.process", "where": {
                        "resolved": True, "authorized": False, "system": False,
                        "cgroup": {"prefix": "/"}}}]}   # as agent/rules/policy.yaml
        det = Detector(parse_rules({"rules": [rule]}), Config(), policy)
        found_bad = det.evaluate(bad, bad.mono_ns)
        found_ok = det.evaluate(ok, ok.mono_ns)
        check("unauthorized process flagged", bool(found_bad) and not found_ok,
              f"{[f.rule + ' on ' + f.entity + ' -> ' + f.action for f in found_bad]}; "
              f"authorized one: {[f.rule for f in found_ok] or 'no finding'}")
    except ImportError as e:   # no PyYAML, or a Python before 3.11
        check("unauthorized process flagged",
              v_bad.get("authorized") is False and v_ok.get("authorized") is True,
              f"verdicts {v_bad} / authorized one {v_ok} (detector not importable: {e})")
    try:
        from agent.enforce.process import ProcessEnforcer
        from agent.model import Mitigation, MitigationKind
    except ImportError as e:
        check("unauthorized process stopped", None, f"enforcer not importable here ({e})")
        return
    t0 = time.monotonic()
    try:
        ProcessEnforcer().apply(Mitigation(
            MitigationKind.KILL_PROCESS, str(bad_pid), time.time(), None,
            params={"start_ticks": bad.fields["start_ticks"], "cgroup": bad.fields["cgroup"]}),
            time.time())
        rc = bad_proc.wait(10)
    except Exception as e:   # noqa: BLE001 -- a refusal is this check's FAIL, with its reason
        check("unauthorized process stopped", False, f"{type(e).__name__}: {e}")
        return
    check("unauthorized process stopped", rc == -9,
          f"exit {rc} {1e3 * (time.monotonic() - t0):.1f} ms after the kill was asked")
    time.sleep(1.0)
    check("authorized process keeps running", ok_proc.poll() is None,
          f"exit {ok_proc.poll()}" if ok_proc.poll() is not None else "running")


def finish(summary: dict, a, code: int) -> int:
    summary["checks"] = [{"verdict": v, "check": n, "detail": d} for v, n, d in RESULTS]
    summary["exit"] = code
    print("== summary: " + json.dumps(summary, default=str))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(summary, indent=2, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main())
