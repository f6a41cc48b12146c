"""GPU authorization end to end (issue 10 item 6): real processes in real cgroups, the
stand-in NVML (tests/nvml/fake_nvml.c, through the real pynvml binding) listing them on a
GPU, and the real agent (its own network namespace; the policy rules only):

- an unauthorized workload's process that shows up in NVML is killed (a policy_violation
  incident on the workload's cgroup, a kill_process mitigation), while an authorized one
  keeps running;
- a scheduler's authorization (CLI -> AuthorizeGpu) survives a restart; revoking it makes
  the workload's process still on the GPU a violation at once (the revoke re-checks);
- bad input is exit 2 with one sentence and stores nothing;
- the exact kill refuses a process whose start time or cgroup is not the judged one.
(A viewer may list but not authorize: tests/integration/test_control_tls.py.)
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from agent.enforce.base import TargetNotFound
from agent.enforce.process import ProcessEnforcer, ProcessError, start_ticks
from agent.model import Mitigation, MitigationKind
from agent.sources.cgroups import cgroup2_mount
from swarmlab.breachlab import throwaway_cgroup
from swarmlab.lab import wait_for
from tests.nvml.fakenvml import Script, build

RULES = Path(__file__).resolve().parents[2] / "agent" / "rules" / "policy.yaml"
MIB = 1 << 20


@pytest.fixture(scope="module")
def lib(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("nvml"))


@pytest.fixture
def script(tmp_path, monkeypatch) -> Script:
    """One GPU; the state file named to the library (and the agents started here)."""
    s = Script(tmp_path / "nvml.state")
    s.gpu()
    s.write()
    monkeypatch.setenv("FAKE_NVML_STATE", str(s.path))
    return s


@pytest.fixture
def workloads() -> Iterator[Path]:
    """A throw-away cgroup for the test's workloads (children made with `workload`); its
    processes killed and every cgroup removed afterwards."""
    with throwaway_cgroup("swa-gpuauth") as outer:
        yield outer
        for child in sorted(outer.iterdir(), reverse=True):
            if child.is_dir():
                with contextlib.suppress(OSError):
                    (child / "cgroup.kill").write_text("1")
                with contextlib.suppress(TimeoutError):
                    wait_for(lambda: not (child / "cgroup.procs").read_text().strip(), 5)
                with contextlib.suppress(OSError):
                    child.rmdir()


def run_in(cg: Path) -> subprocess.Popen:
    """A sleeping process started inside cgroup `cg` (a GPU job, as far as NVML says)."""
    cg.mkdir(exist_ok=True)
    return subprocess.Popen(["sleep", "300"],
                            preexec_fn=lambda: (cg / "cgroup.procs").write_text(str(os.getpid())))


def path_of(cg: Path) -> str:
    """The cgroup's path as /proc/PID/cgroup names it."""
    return "/" + str(cg.relative_to(cgroup2_mount()))


def cli(agent, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "agent.cli.main", *args, "--json",
                           "--config", str(agent.config_path)],
                          capture_output=True, text=True, timeout=60)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def start_agent(lab, lib, tmp_path, authorized: str = ""):
    from swarmlab.scenario import AgentProcess

    (tmp_path / "agent").mkdir(exist_ok=True)
    agent = AgentProcess(lab.victim, tmp_path / "agent", extra_config=(
        f"rules_file: {RULES}\ngpu:\n  sample_s: 0.2\n  on_violation: kill\n  nvml_library: {lib}\n{authorized}"))
    agent.start()
    wait_for(lambda: next(p for p in json.loads(cli(agent, "status").stdout)["probes"]
                          if p["name"] == "gpu")["state"] == "loaded", 10)
    return agent


def incidents_of(agent, entity: str) -> list[dict]:
    return [i for i in json.loads(cli(agent, "incidents").stdout) if i["entity"] == entity]


def stays_running(proc: subprocess.Popen, agent, samples: int = 5) -> None:
    """The process outlives `samples` sampling periods of the agent (0.2 s each)."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(samples * 0.2 + 0.5)
    assert proc.poll() is None, "an authorized process was killed"


@pytest.mark.privileged
def test_unauthorized_gpu_process_is_killed_authorized_one_runs(lab, lib, script, workloads,
                                                                tmp_path):
    ok_cg, bad_cg = workloads / "train", workloads / "miner"
    agent = start_agent(lab, lib, tmp_path, authorized=(
        f"  authorized:\n    - workload: {path_of(ok_cg)}\n      gpus: [0]\n"))
    ok = bad = None
    try:
        ok, bad = run_in(ok_cg), run_in(bad_cg)
        script.procs += [{"gpu": 0, "pid": ok.pid, "mem": 512 * MIB},
                         {"gpu": 0, "pid": bad.pid, "mem": 256 * MIB}]
        script.write()
        assert bad.wait(10) == -9                       # SIGKILL, by the agent
        entity = f"cgroup:{path_of(bad_cg)}"
        [inc] = wait_for(lambda: incidents_of(agent, entity), 10)
        assert inc["event_class"] == "policy_violation" and "policy.gpu_unauthorized@1" in \
            inc["rules"]
        kills = [(m["kind"], m["target"]) for m in json.loads(cli(agent, "mitigations").stdout)]
        assert kills == [("kill_process", str(bad.pid))]
        stays_running(ok, agent)
        assert incidents_of(agent, f"cgroup:{path_of(ok_cg)}") == []
        listed = json.loads(cli(agent, "gpu", "list").stdout)
        assert [(a["workload"], a["gpu"], a["source"]) for a in listed] == \
            [(path_of(ok_cg), "0", "config")]
    finally:
        for p in (ok, bad):
            if p is not None:
                p.kill()
                p.wait()
        agent.stop()


@pytest.mark.privileged
def test_authorization_survives_restart_and_revoke_makes_a_violation(lab, lib, script,
                                                                    workloads, tmp_path):
    job_cg = workloads / "job-7"
    agent = start_agent(lab, lib, tmp_path)
    job = None
    try:
        cli(agent, "gpu", "authorize", path_of(job_cg), "0", "--job", "job-7")
        job = run_in(job_cg)
        script.procs.append({"gpu": 0, "pid": job.pid, "mem": 1024 * MIB})
        script.write()
        stays_running(job, agent)
        agent.stop()
        agent.start()                                   # the same state directory
        listed = json.loads(cli(agent, "gpu", "list").stdout)
        assert [(a["workload"], a["gpu"], a["source"], a["job"]) for a in listed] == \
            [(path_of(job_cg), "0", "api", "job-7")]
        stays_running(job, agent)                       # judged again at the first sample
        done = json.loads(cli(agent, "gpu", "revoke", path_of(job_cg)).stdout)
        assert done["revoked"] == 1 and done["rechecked"] == 1
        assert job.wait(10) == -9
        [inc] = wait_for(lambda: incidents_of(agent, f"cgroup:{path_of(job_cg)}"), 10)
        assert inc["event_class"] == "policy_violation"
        audit = json.loads(cli(agent, "audit").stdout)
        assert {e["method"] for e in audit} >= {"AuthorizeGpu", "RevokeGpu"}
    finally:
        if job is not None:
            job.kill()
            job.wait()
        agent.stop()


BAD_AUTHORIZE = [
    (("relative/path", "0"), "is not a workload"),
    (("/", "all"), "root cgroup"),
    (("/a/b", "GPU0"), "is not a GPU"),
    (("/a/b",), "at least one GPU"),
    (("container:abc", "0"), "64-hex-digit"),
    (("/a/b", "all", "1"), "alone"),
]


@pytest.mark.privileged
def test_bad_authorize_input_is_exit_2_with_one_sentence(lab, lib, script, tmp_path):
    """Every bad input against one agent (an agent start per case cost ~10 s each)."""
    agent = start_agent(lab, lib, tmp_path)
    try:
        for args, says in BAD_AUTHORIZE:
            done = cli(agent, "gpu", "authorize", *args, check=False)
            assert done.returncode == 2, (args, done)
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1 and says in lines[0] and "Traceback" not in done.stderr, args
        assert json.loads(cli(agent, "gpu", "list").stdout) == []
        gone = cli(agent, "gpu", "revoke", "/never/authorized", check=False)
        assert gone.returncode == 4 and "no GPU authorization" in gone.stderr
    finally:
        agent.stop()


@pytest.mark.privileged
def test_exact_kill_refuses_another_process_or_cgroup(workloads):
    """The pinned kill of a policy rule: a wrong start time (a reused pid) or a process
    that left the judged cgroup is refused, nothing is signalled; the right one dies."""
    a_cg, b_cg = workloads / "a", workloads / "b"
    proc = run_in(a_cg)
    b_cg.mkdir()
    try:
        enforcer = ProcessEnforcer()
        start = start_ticks(proc.pid)

        def kill(**params) -> None:
            enforcer.apply(Mitigation(MitigationKind.KILL_PROCESS, str(proc.pid), 0.0, None,
                                      params={"start_ticks": start, "cgroup": path_of(a_cg),
                                              **params}), 0.0)
        with pytest.raises(TargetNotFound, match="another process"):
            kill(start_ticks=start + 1)
        (b_cg / "cgroup.procs").write_text(str(proc.pid))
        with pytest.raises(ProcessError, match="moved from cgroup"):
            kill()
        assert proc.poll() is None
        kill(cgroup=path_of(b_cg))
        assert proc.wait(5) == -9
        with pytest.raises(ProcessError, match="PID 1 or the agent"):
            enforcer.apply(Mitigation(MitigationKind.KILL_PROCESS, str(os.getpid()), 0.0, None,
                                      params={"start_ticks": 1, "cgroup": "/"}), 0.0)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.privileged
def test_a_process_moved_out_of_its_authorized_workload_is_judged_again(lab, lib, script,
                                                                        workloads, tmp_path):
    """Judged authorized at first sight, then moved (by whoever may write the other
    cgroup's cgroup.procs) into a workload with no grant: the periodic re-check (every
    2 s) judges it where it is now and it is killed."""
    ok_cg, other_cg = workloads / "train", workloads / "elsewhere"
    agent = start_agent(lab, lib, tmp_path, authorized=(
        f"  authorized:\n    - workload: {path_of(ok_cg)}\n      gpus: all\n"))
    job = None
    try:
        job = run_in(ok_cg)
        script.procs.append({"gpu": 0, "pid": job.pid, "mem": 512 * MIB})
        script.write()
        stays_running(job, agent)
        other_cg.mkdir()
        (other_cg / "cgroup.procs").write_text(str(job.pid))
        assert job.wait(10) == -9
        wait_for(lambda: incidents_of(agent, f"cgroup:{path_of(other_cg)}"), 10)
        assert incidents_of(agent, f"cgroup:{path_of(ok_cg)}") == []
    finally:
        if job is not None:
            job.kill()
            job.wait()
        agent.stop()


@pytest.mark.privileged
def test_device_open_of_an_unauthorized_workload_is_killed_before_nvml(lab, lib, script,
                                                                      workloads, tmp_path):
    """The kernel side: the process probe reports an open of a character device of
    gpu.device_major at the open (no NVML involved: the stand-in lists nobody). There is
    no NVIDIA driver here, so the test names another major, the memory devices' (1:
    /dev/full), and opens that; the workload with a grant keeps running, the other one's
    process is killed, the incident is its workload's (policy.gpu_device_open@1)."""
    ok_cg, bad_cg = workloads / "train", workloads / "intruder"
    agent = start_agent(lab, lib, tmp_path, authorized=(
        f"  device_major: 1\n  authorized:\n    - workload: {path_of(ok_cg)}\n"
        f"      gpus: [0]\n"))
    procs = []
    try:
        for cg in (ok_cg, bad_cg):
            cg.mkdir()
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", lab.victim, "sh", "-c",
                 "exec 3</dev/full; exec sleep 300"],
                preexec_fn=lambda cg=cg: (cg / "cgroup.procs").write_text(str(os.getpid()))))
        ok, bad = procs
        assert bad.wait(10) == -9
        [inc] = wait_for(lambda: incidents_of(agent, f"cgroup:{path_of(bad_cg)}"), 10)
        assert "policy.gpu_device_open@1" in inc["rules"]
        stays_running(ok, agent)
        assert incidents_of(agent, f"cgroup:{path_of(ok_cg)}") == []
        assert script.procs == []                       # NVML never listed either
    finally:
        for p in procs:
            p.kill()
            p.wait()
        agent.stop()
