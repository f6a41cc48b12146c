"""gpu.usage (CONTRACT11, the anomaly models' GPU feature) against the stand-in NVML
library through the real binding: real processes in real cgroups, their per-process
utilisation and memory summed per cgroup over GPUs, a GPU that does not answer per
process, and the GPU guard's verdict on the sample under the grants in force."""
from __future__ import annotations

import os
import subprocess

from agent.config import Config
from agent.gpuguard import GpuGuard
from agent.state.store import Store
from swarmlab.breachlab import throwaway_cgroup
from swarmlab.lab import wait_for
from tests.integration.test_gpu_source import MIB, events, lib, script, source  # noqa: F401


def sleeper_in(cg) -> subprocess.Popen:
    return subprocess.Popen(["sleep", "60"], preexec_fn=lambda: (cg / "cgroup.procs").write_text(
        str(os.getpid())))


def test_usage_per_cgroup_summed_over_gpus(source, script):
    with throwaway_cgroup("swa-gpu") as a, throwaway_cgroup("swa-gpu") as b:
        pa, pb = sleeper_in(a), sleeper_in(b)
        try:
            script.gpus[1]["unsupported"] = "power,ecc,procutil"
            script.procs += [{"gpu": 0, "pid": pa.pid, "mem": 1024 * MIB, "util": 40},
                             {"gpu": 1, "pid": pa.pid, "mem": 2048 * MIB, "util": 25},
                             {"gpu": 0, "pid": pb.pid, "mem": 512 * MIB, "util": 30}]
            script.write()
            ua = wait_for(lambda: events(source, "gpu.usage", cgroup="/" + a.name), 5)
            ub = wait_for(lambda: events(source, "gpu.usage", cgroup="/" + b.name), 5)
            script.gpus[1]["unsupported"] = "power,ecc"       # now GPU 1 answers too
            script.write()
            n = len(ua)
            later = wait_for(lambda: events(source, "gpu.usage", cgroup="/" + a.name)[n + 1:], 5)
        finally:
            for p in (pa, pb):
                p.kill()
                p.wait()
    f = ua[-1].fields
    assert ua[-1].subject == f"cgroup:/{a.name}" and ua[-1].source == "gpu"
    assert f["gpu_memory_bytes"] == 3072 * MIB and f["pids"] == [pa.pid]
    assert f["gpu_indexes"] == [0, 1] and f["gpu_uuids"] == [g["uuid"] for g in script.gpus]
    # GPU 1 gives no per-process utilisation: only GPU 0's counts, and it says so
    assert f["gpu_util"] == 40 and f["util_known"] is False and f["container"] == ""
    assert f["window_ns"] == int(source.sample_s * 1e9)
    assert later[-1].fields["gpu_util"] == 65 and later[-1].fields["util_known"] is True
    g = ub[-1].fields
    assert (g["gpu_util"], g["gpu_memory_bytes"], g["gpu_indexes"]) == (30, 512 * MIB, [0])


def test_the_guard_judges_a_sample_by_every_gpu_it_uses(tmp_path):
    cfg = Config(state_dir=str(tmp_path))
    fields = {"cgroup": "/kubepods.slice/pod-a", "gpu_indexes": [0, 1],
              "gpu_uuids": ["GPU-0", "GPU-1"], "gpu_util": 90}
    with Store(tmp_path / "a.db") as store:
        seen = []
        guard = GpuGuard(cfg, store, lambda p: None, seen.append)
        from agent.model import Event
        ev = Event("gpu.usage", "cgroup:/kubepods.slice/pod-a", 1, 1, fields, "gpu")
        guard.observe(ev)
        guard.authorize("/kubepods.slice/pod-a", ["0"], "job-1", "sched", now=10.0)
        guard.observe(ev)
        guard.authorize("/kubepods.slice/pod-a", ["1"], "job-1", "sched", now=11.0)
        guard.observe(ev)
        guard.observe(Event("gpu.usage", "cgroup:/x", 1, 1, {"cgroup": "/x"}, "gpu"))
    assert [e.fields["authorized"] for e in seen] == [False, False, True, False]
    assert seen[2].fields["gpu_util"] == 90 and not seen[2].fields["system"]
