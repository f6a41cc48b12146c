"""The exec policy end to end (issue 10 item 2): the real agent (its own network
namespace, the exec rules of agent/rules/exec.yaml with the test's lists), the real
process probe, real processes in real cgroups below a throw-away one:

- a denied path is killed; the same file at another path runs;
- a denied SHA-256 kills a renamed copy (same hash, other name); a denied cgroup;
- exec from /tmp, /dev/shm and a memfd inside a workload cgroup is killed (the test sets
  policy.exec_writable_action: kill); the same outside the workload cgroups runs;
- a denied program that forks before the kill lands: its forks are killed too;
- a reload adds and removes an exec rule (the kernel's exec_policy map is switched: a
  copied `sleep` is no watched program, so without the map its exec never reaches the
  agent), and a bad rule file in rules_extra changes nothing.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from agent.sources.cgroups import cgroup2_mount
from swarmlab.breachlab import throwaway_cgroup
from swarmlab.lab import wait_for

EXEC_RULES = Path(__file__).resolve().parents[2] / "agent" / "rules" / "exec.yaml"
SLEEP = shutil.which("sleep") or "/bin/sleep"
SH = shutil.which("sh") or "/bin/sh"
TAIL = shutil.which("tail") or "/usr/bin/tail"


@pytest.fixture
def workloads() -> Iterator[Path]:
    with throwaway_cgroup("swa-exec") as outer:
        yield outer


def path_of(cg: Path) -> str:
    return "/" + str(cg.relative_to(cgroup2_mount()))


def cli(agent, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "agent.cli.main", *args, "--json",
                           "--config", str(agent.config_path)],
                          capture_output=True, text=True, timeout=60)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def start_agent(lab, tmp_path: Path, policy: str, rules: Path = EXEC_RULES,
                extra: Path | None = None):
    from swarmlab.scenario import AgentProcess

    (tmp_path / "agent").mkdir(exist_ok=True)
    agent = AgentProcess(lab.victim, tmp_path / "agent", extra_config=(
        f"rules_file: {rules}\n" + (f"rules_extra: {extra}\n" if extra else "")
        + f"policy:\n{policy}"))
    agent.start()
    return agent


def run(lab, cg: Path, *argv: str, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    """`argv` exec'd in the agent's namespace, inside cgroup `cg` from its start."""
    cg.mkdir(exist_ok=True)
    return subprocess.Popen(["ip", "netns", "exec", lab.victim, *argv], pass_fds=pass_fds,
                            preexec_fn=lambda: (cg / "cgroup.procs").write_text(str(os.getpid())))


def killed(proc: subprocess.Popen, timeout_s: float = 10) -> bool:
    return proc.wait(timeout_s) == -9


def runs_on(proc: subprocess.Popen, s: float = 1.5) -> bool:
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(s)
    return proc.poll() is None


def incidents(agent) -> list[dict]:
    return json.loads(cli(agent, "incidents").stdout)


def stop_all(*procs) -> None:
    for p in procs:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()


def copy_sleep(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(SLEEP, dest)
    return dest


@pytest.mark.privileged
def test_denied_path_hash_and_cgroup_are_killed_the_same_file_elsewhere_runs(lab, workloads,
                                                                           tmp_path):
    home = Path("/var/lib") / f"swa-exec-{os.getpid()}"     # not a writable location
    denied = copy_sleep(home / "denied" / "miner")
    twin = copy_sleep(home / "ok" / "miner")                # the same bytes, another path
    renamed = home / "anything-else"                        # tail, renamed: hash denied
    shutil.copy2(TAIL, renamed)
    tail_digest = hashlib.sha256(Path(TAIL).read_bytes()).hexdigest()
    agent = start_agent(lab, tmp_path, (
        f"  exec_denied_paths: [\"{home}/denied/*\"]\n"
        f"  exec_denied_sha256: [\"{tail_digest}\"]\n"
        f"  exec_denied_cgroups: [\"{path_of(workloads)}/banned*\"]\n"))
    procs = []
    try:
        procs.append(ok := run(lab, workloads / "job", str(twin), "300"))
        procs.append(a := run(lab, workloads / "job", str(denied), "300"))
        assert killed(a)
        procs.append(b := run(lab, workloads / "job", str(renamed), "-f", "/dev/null"))
        assert killed(b)
        procs.append(c := run(lab, workloads / "banned-1", SLEEP, "300"))
        assert killed(c)
        assert runs_on(ok)
        rules = wait_for(lambda: {r for i in incidents(agent) for r in i["rules"]}, 10)
        assert rules == {"policy.exec_denied_path@1", "policy.exec_denied_sha256@1",
                         "policy.exec_denied_cgroup@1"}
        inc = next(i for i in incidents(agent) if "policy.exec_denied_path@1" in i["rules"])
        assert inc["entity"] == f"cgroup:{path_of(workloads / 'job')}"
        assert inc["event_class"] == "policy_violation"
        kills = {m["target"] for m in json.loads(cli(agent, "mitigations").stdout)
                 if m["kind"] == "kill_process"}
        assert kills == {str(a.pid), str(b.pid), str(c.pid)}
    finally:
        stop_all(*procs)
        agent.stop()
        shutil.rmtree(home, ignore_errors=True)


def memfd_exec(lab, cg: Path) -> subprocess.Popen:
    """sleep's bytes in a memfd, exec'd through /proc/self/fd/N (fileless)."""
    code = ("import os,sys; fd=os.memfd_create('payload', 0); "
            f"os.write(fd, open({SLEEP!r},'rb').read()); "
            "os.execve(f'/proc/self/fd/{fd}', ['payload', '300'], {})")
    return run(lab, cg, sys.executable, "-c", code)


@pytest.mark.privileged
def test_exec_from_writable_locations_in_a_workload_only(lab, workloads, tmp_path):
    tmp_copy = copy_sleep(Path("/tmp") / f"swa-exec-{os.getpid()}" / "dropper")
    shm_copy = copy_sleep(Path("/dev/shm") / f"swa-exec-{os.getpid()}")
    agent = start_agent(lab, tmp_path, (
        f"  exec_workload_cgroups: [\"{path_of(workloads)}/tenant\"]\n"
        "  exec_writable_action: kill\n"))
    procs = []
    try:
        outside = run(lab, workloads / "host", str(tmp_copy), "300")     # not a workload
        procs.append(outside)
        for argv in ((str(tmp_copy), "300"), (str(shm_copy), "300")):
            p = run(lab, workloads / "tenant", *argv)
            procs.append(p)
            assert killed(p), argv
        m = memfd_exec(lab, workloads / "tenant")
        procs.append(m)
        assert killed(m)
        below = run(lab, workloads / "tenant" / "sub", str(tmp_copy), "300")  # the subtree
        procs.append(below)
        assert killed(below)
        assert runs_on(outside)
        incs = [i for i in incidents(agent) if "policy.exec_writable_location@1" in i["rules"]]
        assert {i["entity"] for i in incs} == {f"cgroup:{path_of(workloads / 'tenant')}",
                                               f"cgroup:{path_of(workloads / 'tenant' / 'sub')}"}
    finally:
        stop_all(*procs)
        agent.stop()
        shutil.rmtree(tmp_copy.parent, ignore_errors=True)
        shm_copy.unlink(missing_ok=True)


@pytest.mark.parametrize("script", [
    "(while :; do :; done) & (while :; do :; done) & wait",
    "(while :; do :; done) & exit 0",      # a daemon: the denied program is gone at once
])
@pytest.mark.privileged
def test_forks_of_a_denied_program_die_with_it(lab, workloads, tmp_path, script):
    """A copied sh, denied: it forks busy subshells (the same inode) at once, long before
    the agent's kill can land, and may exit itself; every fork is killed, the cgroup
    empties."""
    home = Path("/var/lib") / f"swa-exec-fork-{os.getpid()}"
    home.mkdir()
    shell = home / "evil-sh"
    shutil.copy2(os.path.realpath(SH), shell)
    agent = start_agent(lab, tmp_path, f"  exec_denied_paths: [\"{shell}\"]\n")
    cg = workloads / "forker"
    p = None
    try:
        p = run(lab, cg, str(shell), "-c", script)
        assert p.wait(10) in (-9, 0)
        wait_for(lambda: not (cg / "cgroup.procs").read_text().split(), 10)
        [inc] = [i for i in incidents(agent) if i["entity"] == f"cgroup:{path_of(cg)}"]
        assert "policy.exec_denied_path@1" in inc["rules"]
    finally:
        stop_all(p)
        agent.stop()
        shutil.rmtree(home, ignore_errors=True)


OPERATOR_RULE = """rules:
  - id: site.no_{name}
    version: 1
    class: policy_violation
    severity: high
    action: kill
    description: the site's own exec rule
    match:
      - event: proc.exec
        where:
          exe_known: true
          exe_path: {{glob: "{path}"}}
"""


@pytest.mark.privileged
def test_reload_switches_the_kernel_filter_and_a_bad_file_changes_nothing(lab, workloads,
                                                                          tmp_path):
    home = Path("/var/lib") / f"swa-exec-reload-{os.getpid()}"
    target = copy_sleep(home / "forbidden")
    rules = tmp_path / "rules"
    rules.mkdir()
    # the packaged policy rules (none on proc.exec: the exec_policy map stays off)
    shutil.copy2(EXEC_RULES.with_name("policy.yaml"), rules / "policy.yaml")
    extra = tmp_path / "rules.d"            # missing at start: adds nothing
    agent = start_agent(lab, tmp_path, "  exec_workload_cgroups: [\"/nowhere\"]\n",
                        rules=rules, extra=extra)
    procs = []
    try:
        before = run(lab, workloads / "w", str(target), "300")
        procs.append(before)
        assert runs_on(before)
        extra.mkdir()
        (extra / "site.yaml").write_text(OPERATOR_RULE.format(name="forbidden", path=target))
        cli(agent, "rules", "reload")
        after = run(lab, workloads / "w", str(target), "300")
        procs.append(after)
        assert killed(after)
        assert before.poll() is None            # judged at exec: the older one is not
        [inc] = [i for i in incidents(agent) if "site.no_forbidden@1" in i["rules"]]
        # a bad file (a duplicate id) is rejected whole, FILE:LINE; the rule stays
        (extra / "zz.yaml").write_text(OPERATOR_RULE.format(name="forbidden", path="/x"))
        done = cli(agent, "rules", "reload", check=False)
        assert done.returncode != 0 and "zz.yaml:2" in done.stderr + done.stdout
        again = run(lab, workloads / "w", str(target), "300")
        procs.append(again)
        assert killed(again)
        # removing it switches the kernel filter off again: the exec runs
        (extra / "zz.yaml").unlink()
        (extra / "site.yaml").unlink()
        cli(agent, "rules", "reload")
        last = run(lab, workloads / "w", str(target), "300")
        procs.append(last)
        assert runs_on(last)
    finally:
        stop_all(*procs)
        agent.stop()
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.privileged
def test_freeze_holds_the_workloads_cgroup_not_its_neighbours(lab, workloads, tmp_path):
    """exec_writable_action freeze: the workload's cgroup is frozen (the kernel's own
    cgroup.events says so), a neighbour's is not."""
    tmp_copy = copy_sleep(Path("/tmp") / f"swa-exec-frz-{os.getpid()}" / "dropper")
    agent = start_agent(lab, tmp_path, (
        f"  exec_workload_cgroups: [\"{path_of(workloads)}/tenant\"]\n"
        "  exec_writable_action: freeze\n"))
    tenant, other = workloads / "tenant", workloads / "other"
    procs = []
    try:
        procs.append(run(lab, other, SLEEP, "300"))
        procs.append(p := run(lab, tenant, str(tmp_copy), "300"))
        wait_for(lambda: "frozen 1" in (tenant / "cgroup.events").read_text(), 10)
        assert p.poll() is None                     # held, not killed
        assert "frozen 0" in (other / "cgroup.events").read_text()
        kinds = {(m["kind"], m["target"]) for m in json.loads(cli(agent, "mitigations").stdout)}
        assert ("freeze_cgroup", path_of(tenant)) in kinds
    finally:
        with contextlib.suppress(OSError):
            (tenant / "cgroup.freeze").write_text("0")
        stop_all(*procs)
        agent.stop()
        shutil.rmtree(tmp_copy.parent, ignore_errors=True)
