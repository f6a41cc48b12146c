"""The GPU source against the stand-in NVML library (tests/nvml/fake_nvml.c) through the
real, vendored pynvml binding: counters (and counters a GPU does not support), a real
process in a real cgroup mapped to its pid, cgroup, container and uid, XIDs through the
event API becoming GPU health findings, NVML failing mid-run (degraded, then back), and
no library / no driver / no GPU ("absent"). The last test runs the real agent in a lab
namespace: an XID becomes a gpu_health incident with no mitigation, and NVML failing
leaves the agent answering with its GPU source degraded."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agent.config import Config
from agent.detect.rules import Detector, load_rules
from agent.report.gpumetrics import GpuCollector
from agent.sources import gpu as gpu_mod
from agent.sources.cgroups import cgroup2_mount
from agent.sources.gpu import GpuSource
from swarmlab.breachlab import throwaway_cgroup
from swarmlab.lab import wait_for
from tests.nvml.fakenvml import H200_BYTES, Script, build

RULES = Path(__file__).resolve().parents[2] / "agent" / "rules" / "gpu.yaml"
MIB = 1 << 20


@pytest.fixture(scope="module")
def lib(tmp_path_factory) -> Path:
    """The stand-in libnvidia-ml.so.1, compiled once for this module."""
    return build(tmp_path_factory.mktemp("nvml"))


@pytest.fixture
def script(tmp_path, monkeypatch) -> Script:
    """A state file with two GPUs (the second without power and ECC counters), named to
    the library through FAKE_NVML_STATE (also for agents this test starts)."""
    s = Script(tmp_path / "nvml.state")
    s.gpu(util=37, memutil=12, used=512 * MIB, temp=41, power=123_456)
    s.gpu(unsupported="power,ecc")
    s.write()
    monkeypatch.setenv("FAKE_NVML_STATE", str(s.path))
    return s


@pytest.fixture
def source(lib, script, monkeypatch):
    """A running GpuSource (sampling every 0.1 s) whose events land in `source.events`;
    stopped after the test."""
    monkeypatch.setattr(gpu_mod, "BACKOFF_S", 0.2)
    src = GpuSource(sample_s=0.1, library=str(lib))
    src.events = []
    src.start(src.events.append, lambda fn, e: fn(e))
    wait_for(lambda: src.status()["state"] == "loaded" and src.sample_count, 10)
    yield src
    src.stop()
    assert src._thread is not None and not src._thread.is_alive()


def events(src: GpuSource, kind: str, **match) -> list:
    return [e for e in list(src.events) if e.kind == kind and
            all(e.fields.get(k) == v for k, v in match.items())]


def test_counters_and_metrics(source, script):
    a, b = sorted(source.samples(), key=lambda s: s.index)
    assert (a.util_gpu, a.util_mem, a.mem_used_bytes, a.mem_total_bytes, a.temp_c,
            a.power_w, a.sm_clock_mhz, a.mem_clock_mhz, a.ecc_dbe_volatile) == \
        (37, 12, 512 * MIB, H200_BYTES, 41, 123.456, 1980, 2619, 0)
    assert (b.power_w, b.ecc_dbe_volatile, b.temp_c) == (None, None, 35)   # "not supported"
    assert source.status() == {"state": "loaded", "reason": "2 GPU(s), driver 550.54.15"}
    script.gpus[0]["util"] = 91
    script.write()
    wait_for(lambda: any(s.util_gpu == 91 for s in source.samples()), 5)

    reg = CollectorRegistry()
    from dataclasses import asdict
    reg.register(GpuCollector(lambda: {
        "state": source.status(), "gpus": [asdict(s) for s in source.samples()],
        "last_xid": {}, "xid_count": {}, "processes": {}, "samples": source.sample_count,
        "sample_cpu_s": source.sample_cpu_s}))
    text = generate_latest(reg).decode()
    uuid = a.uuid
    assert f'DCGM_FI_DEV_GPU_UTIL{{Hostname="{os.uname().nodename}",UUID="{uuid}",' \
           f'device="nvidia0",gpu="0",modelName="NVIDIA H200"}} 91.0' in text
    assert f'DCGM_FI_DEV_FB_USED{{Hostname="{os.uname().nodename}",UUID="{uuid}"' in text
    assert 'DCGM_FI_DEV_POWER_USAGE{' in text and '123.456' in text
    # a counter the GPU does not support is absent for it, never 0
    assert f'DCGM_FI_DEV_POWER_USAGE{{Hostname="{os.uname().nodename}",UUID="{b.uuid}"' \
        not in text
    assert 'swarm_agent_gpu_source_state{state="loaded"} 1.0' in text


def test_a_process_on_a_gpu_is_mapped_to_who_it_is(source, script):
    """A real sleeping process, as nobody, in a real cgroup named like a docker scope."""
    cid = secrets.token_hex(32)
    with throwaway_cgroup("swa-gpu") as outer:
        inner = outer / f"docker-{cid}.scope"
        inner.mkdir()

        def enter() -> None:
            (inner / "cgroup.procs").write_text(str(os.getpid()))
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)

        sleeper = subprocess.Popen(["sleep", "60"], preexec_fn=enter)
        try:
            script.procs.append({"gpu": 1, "pid": sleeper.pid, "mem": 512 * MIB})
            script.write()
            [ev] = wait_for(lambda: events(source, "gpu.process", pid=sleeper.pid), 5)
            f = ev.fields
            assert ev.subject == f"pid:{sleeper.pid}" and ev.source == "gpu"
            assert (f["gpu_index"], f["gpu_uuid"], f["process_type"], f["used_memory_bytes"]) \
                == (1, script.gpus[1]["uuid"], "compute", 512 * MIB)
            assert f["resolved"] and f["cgroup"] == f"/{outer.name}/docker-{cid}.scope"
            assert (f["container_id"], f["uid"], f["euid"]) == (cid, 65534, 65534)
            assert f["exe"] == os.path.realpath(shutil.which("sleep")) and f["comm"] == "sleep"
            assert f["netns"] == os.stat("/proc/self/ns/net").st_ino
            assert f["gpu_device_fds"] == 0      # the stand-in opens no /dev/nvidia*
            n = source.sample_count
            wait_for(lambda: source.sample_count >= n + 3, 5)
            assert len(events(source, "gpu.process", pid=sleeper.pid)) == 1   # once, not per sample
            [p] = [p for p in source.processes() if p["pid"] == sleeper.pid]
            assert p["cgroup"] == f["cgroup"]
            # The process exits but NVML still lists its pid: the record says it is gone.
            sleeper.kill()
            sleeper.wait()
            [gone] = wait_for(lambda: events(source, "gpu.process", pid=sleeper.pid,
                                             resolved=False), 5)
            assert "cgroup" not in gone.fields and "uid" not in gone.fields
        finally:
            sleeper.kill()
            sleeper.wait()
            inner.rmdir()


def test_xids_ecc_and_throttling_become_gpu_health_findings(source, script):
    detector = Detector(load_rules(RULES), Config())
    uuid = script.gpus[0]["uuid"]
    t0 = time.monotonic()
    script.xid(0, 79)
    [ev] = wait_for(lambda: events(source, "gpu.xid", xid=79), 5)
    latency_s = time.monotonic() - t0
    assert latency_s < 1.0, latency_s           # the event API, not the next sample
    [f] = detector.evaluate(ev, ev.mono_ns)
    assert (f.rule, f.entity, f.action, f.event_class.value) == \
        ("gpu.xid_fatal@1", f"gpu:{uuid}:xid_fatal", "report", "gpu_health")
    script.xid(0, 79)                            # a repeat within XID_REPEAT_S: held back
    script.xid(0, 13)                            # a job's own fault: an event, no finding
    [app] = wait_for(lambda: events(source, "gpu.xid", xid=13), 5)
    assert detector.evaluate(app, app.mono_ns) == []
    assert len(events(source, "gpu.xid", xid=79)) == 1
    count, last = source.xids()
    assert count[(uuid, 79)] == 2 and last[uuid] == 13

    script.gpus[0].update(dbe=2, reasons=0x40 | 0x4)
    script.write()
    [ecc] = wait_for(lambda: events(source, "gpu.ecc"), 5)
    assert (ecc.fields["dbe_new"], ecc.fields["ecc_dbe_volatile"]) == (2, 2)
    [thr] = wait_for(lambda: events(source, "gpu.throttle"), 5)
    assert thr.fields["reasons"] == ["sw_power_cap", "hw_thermal"]
    fired = {f.rule for e in (ecc, thr) for f in detector.evaluate(e, e.mono_ns)}
    assert fired == {"gpu.ecc_dbe@1", "gpu.thermal_slowdown@1"}
    n = source.sample_count
    wait_for(lambda: source.sample_count >= n + 3, 5)
    assert len(events(source, "gpu.throttle")) == 1 and len(events(source, "gpu.ecc")) == 1


def test_nvml_failing_mid_run_degrades_then_recovers(source, script):
    script.fail = 15                                   # NVML_ERROR_GPU_IS_LOST
    script.write()
    wait_for(lambda: source.status()["state"] == "degraded", 5)
    assert "GPU is lost" in source.status()["reason"] and source._thread.is_alive()
    script.fail = None
    script.write()
    wait_for(lambda: source.status()["state"] == "loaded", 10)
    n = source.sample_count
    wait_for(lambda: source.sample_count > n, 5)


@pytest.mark.parametrize("how", ["no library", "no driver", "no GPU"])
def test_absent(lib, tmp_path, how):
    env = dict(os.environ, FAKE_NVML_STATE=str(tmp_path / "state"))
    library = str(lib)
    if how == "no library":
        library = str(tmp_path / "missing" / "libnvidia-ml.so.1")
    elif how == "no GPU":
        (tmp_path / "state").write_text("driver 550.54.15\n")
    done = subprocess.run([sys.executable, "-m", "agent.sources.gpu", "--once", "--json",
                           "--library", library], capture_output=True, text=True, env=env,
                          timeout=60, cwd=RULES.parents[2])
    assert done.returncode == 2, done.stderr
    out = json.loads(done.stdout)
    assert out["gpu"]["state"] == "absent" and out["gpus"] == []
    assert {"no library": "cannot load", "no driver": "Driver Not Loaded",
            "no GPU": "no GPU"}[how] in out["gpu"]["reason"]


def _cli(agent, *args: str):
    done = subprocess.run([sys.executable, "-m", "agent.cli.main", *args, "--json",
                           "--config", str(agent.config_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _gpu_probe(agent) -> dict:
    return next(p for p in _cli(agent, "status")["probes"] if p["name"] == "gpu")


@pytest.mark.privileged
def test_agent_xid_is_an_operator_incident_and_nvml_failing_is_degraded(lab, lib, script,
                                                                       tmp_path):
    """The real agent (its own namespace, the GPU rules only): an XID of a lost GPU is a
    gpu_health incident, repeats merge into it, nothing is mitigated; NVML failing leaves
    the agent answering with its GPU source degraded, and it comes back."""
    from swarmlab.scenario import AgentProcess

    (tmp_path / "agent").mkdir()
    agent = AgentProcess(lab.victim, tmp_path / "agent", extra_config=(
        f"rules_file: {RULES}\ngpu:\n  sample_s: 0.2\n  nvml_library: {lib}\n"))
    agent.start()
    try:
        wait_for(lambda: _gpu_probe(agent)["state"] == "loaded", 10)
        uuid = script.gpus[0]["uuid"]
        script.xid(0, 79)
        entity = f"gpu:{uuid}:xid_fatal"

        def incident():
            found = [i for i in _cli(agent, "incidents") if i["entity"] == entity]
            return found[0] if found else None

        inc = wait_for(incident, 10)
        assert inc["event_class"] == "gpu_health" and inc["severity"] == "critical"
        script.xid(0, 79)                  # held back by the source (within 10 s)
        time.sleep(0.5)
        script.xid(1, 79)                  # another GPU: its own incident
        wait_for(lambda: any(i["entity"] == f"gpu:{script.gpus[1]['uuid']}:xid_fatal"
                             for i in _cli(agent, "incidents")), 10)
        assert len([i for i in _cli(agent, "incidents") if i["entity"] == entity]) == 1
        assert _cli(agent, "mitigations") == []          # never a block or a kill
        # the agent's /metrics (in its namespace): DCGM names with DCGM labels
        scrape = subprocess.run(
            ["ip", "netns", "exec", lab.victim, sys.executable, "-c",
             "import urllib.request as u; print(u.urlopen("
             "'http://127.0.0.1:9464/metrics', timeout=10).read().decode())"],
            capture_output=True, text=True, timeout=30, check=True).stdout
        host = os.uname().nodename
        assert f'DCGM_FI_DEV_XID_ERRORS{{Hostname="{host}",UUID="{uuid}",device="nvidia0",' \
               f'gpu="0",modelName="NVIDIA H200"}} 79.0' in scrape
        assert f'DCGM_FI_DEV_GPU_UTIL{{Hostname="{host}",UUID="{uuid}"' in scrape
        assert f'swarm_agent_gpu_xid_events_total{{UUID="{uuid}",xid="79"}} 2.0' in scrape

        script.fail = 15
        script.write()
        wait_for(lambda: _gpu_probe(agent)["state"] == "degraded", 10)
        assert "GPU is lost" in _gpu_probe(agent)["reason"]
        assert agent.proc.poll() is None
        script.fail = None
        script.write()
        wait_for(lambda: _gpu_probe(agent)["state"] == "loaded", 15)
    finally:
        agent.stop()
