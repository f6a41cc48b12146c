"""`python3 -m agent.sources.gpu`: the GPU source on its own, for an operator checking a
machine (and bench/gpu_check.sh): standard library + the vendored NVML binding only.

  --once             one sample, print it, exit
  --duration S       run the source's thread S seconds, then print what it saw and
                     every event it emitted (XIDs arrive through NVML's event API)
  --expect-pid PID   exit 1 unless that process was seen on a GPU (repeatable)
  --json             JSON instead of text; --library PATH: an NVML library to load
Exit status: 0 ok, 1 an expected pid not seen, 2 NVML absent or failing.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time

from agent.sources.gpu import GpuSource, snapshot
from agent.sources.nvml import Absent, Nvml, NvmlFailure


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m agent.sources.gpu",
                                description="Read the GPUs as the agent's GPU source does.")
    p.add_argument("--once", action="store_true", help="one sample, then exit")
    p.add_argument("--duration", type=float, default=0.0, help="seconds to run the thread")
    p.add_argument("--sample-s", type=float, default=1.0, help="sampling period (seconds)")
    p.add_argument("--library", help="NVML library to load (default libnvidia-ml.so.1)")
    p.add_argument("--expect-pid", type=int, action="append", default=[])
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.sample_s <= 0 or a.duration < 0:
        p.error("--sample-s must be above 0 and --duration at least 0")
    return a


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    source = GpuSource(sample_s=a.sample_s, library=a.library)
    events: list[dict] = []
    lock = threading.Lock()

    def emit(e) -> None:
        with lock:
            events.append({"kind": e.kind, "subject": e.subject, "fields": dict(e.fields)})

    source._emit = emit
    if a.once or not a.duration:
        nvml = Nvml(a.library)
        try:
            nvml.open()
            source.driver = nvml.driver
            source._set_state("loaded", f"{len(nvml.devices)} GPU(s), driver {nvml.driver}")
            source.sample_once(nvml)
        except Absent as e:
            source._set_state("absent", str(e))
        except NvmlFailure as e:
            source._set_state("degraded", str(e))
        finally:
            nvml.close()
    else:
        source.start(emit, lambda fn, e: fn(e))
        time.sleep(a.duration)
        source.stop()
    out = snapshot(source)
    with lock:
        out["events"] = list(events)
    seen = {p["pid"] for p in out["processes"]}
    out["missing_pids"] = [pid for pid in a.expect_pid if pid not in seen]
    print(json.dumps(out, indent=2, default=str) if a.json else _text(out))
    if out["gpu"]["state"] not in ("loaded", "stopped") or not out["gpus"] and not a.duration:
        return 2
    return 1 if out["missing_pids"] else 0


def _text(out: dict) -> str:
    lines = [f"GPU source: {out['gpu']['state']} ({out['gpu']['reason']})",
             f"driver: {out['driver'] or '-'}"]
    for g in out["gpus"]:
        lines.append(f"GPU {g['index']} {g['uuid']} {g['name']}: " + ", ".join(
            f"{k}={v}" for k, v in g.items() if k not in ("index", "uuid", "name")))
    for p in out["processes"]:
        lines.append(f"process pid {p['pid']} on GPU {p['gpu_index']}: {p['process_type']}, "
                     f"{p.get('used_memory_bytes')} bytes, cgroup {p.get('cgroup')}, "
                     f"container {p.get('container_id')}, uid {p.get('uid')}, exe {p.get('exe')}, "
                     f"GPU device fds {p.get('gpu_device_fds')}")
    for e in out["events"]:
        lines.append(f"event {e['kind']} {e['subject']}: {json.dumps(e['fields'], default=str)}")
    s = out["sampling"]
    lines.append(f"sampling: {s['samples']} samples, {s['cpu_s']} CPU s, "
                 f"{s['cpu_s_per_sample']} CPU s per sample")
    if out["missing_pids"]:
        lines.append(f"NOT SEEN on any GPU: pids {out['missing_pids']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
