"""File policy against the real kernel: fanotify permission events answered by the agent's
FilePolicy (in this test process, or the real agent), openers that are real processes in
real cgroup v2 groups (throw-away, removed after), files in a temp directory. What the
opener's own open(2) returns is the evidence; the agent's counters are checked beside it."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from agent.config import Config
from agent.enforce.cgroup import cgroup2_mount
from agent.filepolicy import FilePolicy
from agent.model import EventClass
from agent.policyconfig import FileRule, Policy
from swarmlab.breachlab import remove_cgroup, throwaway_cgroup
from swarmlab.lab import wait_for
from swarmlab.scenario import Scenario

pytestmark = pytest.mark.privileged
FILE_RULES = Path(__file__).resolve().parents[2] / "agent" / "rules" / "files.yaml"
# Opens `path` as asked and prints OK or the errno's name: the opener's own view.
OPENER = """
import errno, os, sys
path, how = sys.argv[1], sys.argv[2]
flags = {"r": os.O_RDONLY, "w": os.O_WRONLY | os.O_APPEND, "path": os.O_PATH}
try:
    if how == "reopen":      # an O_PATH fd reopened for reading through /proc
        fd = os.open(path, os.O_PATH)
        os.close(os.open(f"/proc/self/fd/{fd}", os.O_RDONLY))
    elif how == "exec":
        os.execv(path, [path])
    else:
        os.close(os.open(path, flags[how]))
    print("OK")
except OSError as e:
    print(errno.errorcode[e.errno])
"""


def cgroup_path(cg: Path) -> str:
    return "/" + str(cg.relative_to(cgroup2_mount()))


def open_from(cg: Path | None, path: Path | str, how: str = "r") -> str:
    """"OK" or the errno name ("EPERM") a one-shot opener in cgroup `cg` (None: this
    test's own cgroup) gets."""
    pre = f'echo $$ > "{cg}/cgroup.procs" && ' if cg else ""
    out = subprocess.run(["sh", "-c", pre + 'exec "$0" "$@"', sys.executable, "-c", OPENER,
                          str(path), how], capture_output=True, text=True, timeout=20)
    return out.stdout.strip() or out.stderr.strip()


@pytest.fixture
def restricted() -> Iterator[Path]:
    with throwaway_cgroup("swa-files") as cg:
        yield cg


@pytest.fixture
def outsider() -> Iterator[Path]:
    """A sibling cgroup no rule names (the test's own may be anywhere)."""
    with throwaway_cgroup("swa-files-ok") as cg:
        yield cg


class Running:
    """A FilePolicy answering on its thread in this process; `events` are what it emitted
    (its flush runs on a private loop driven by tick())."""

    def __init__(self, rules: tuple[FileRule, ...]):
        self.loop = asyncio.new_event_loop()
        self.events: list = []
        self.policy = FilePolicy(Config(policy=Policy(files=rules)))
        self.policy.start(self.loop, self.events.append)

    def tick(self) -> list:
        self.loop.run_until_complete(asyncio.sleep(0.01))   # runs call_soon_threadsafe'd flushes
        return self.events

    def close(self) -> None:
        self.policy.close()
        self.loop.close()


@pytest.fixture
def running() -> Iterator[list[Running]]:
    made: list[Running] = []
    yield made
    for r in made:
        r.close()


def start(made: list[Running], *rules: FileRule) -> Running:
    r = Running(rules)
    made.append(r)
    assert r.policy.state == "loaded", r.policy.status()
    return r


def test_denied_cgroup_gets_eperm_others_read(tmp_path, restricted, outsider, running):
    secret = tmp_path / "secret"
    secret.write_text("key")
    child = restricted / "job"
    child.mkdir()
    r = start(running, FileRule(name="secrets", paths=(str(secret),),
                                cgroups=(cgroup_path(restricted),)))
    assert open_from(restricted, secret, "r") == "EPERM"
    # Rate-limited per rule and opening cgroup: the first denial is reported at once...
    events = wait_for(lambda: [e for e in r.tick() if e.fields["cgroup"] == cgroup_path(restricted)], 5.0)
    assert len(events) == 1 and events[0].fields["opens"] == 1, events
    assert events[0].fields["path"] == str(secret)
    assert events[0].fields["exe"] == os.path.realpath(sys.executable)
    assert events[0].subject == f"file:secrets:cgroup:{cgroup_path(restricted)}"
    assert open_from(restricted, secret, "w") == "EPERM"
    assert open_from(child, secret, "r") == "EPERM"          # the whole subtree
    assert open_from(restricted, secret, "reopen") == "EPERM"  # O_PATH then /proc/self/fd
    assert open_from(outsider, secret, "r") == "OK"
    assert open_from(None, secret, "w") == "OK"              # the operator's shell's cgroup
    assert secret.read_text() == "key"                        # the agent's own open
    assert r.policy.denied["secrets"] == 4
    # ... the rest wait for the next report, which carries their count.
    assert len([e for e in r.tick() if e.fields["cgroup"] == cgroup_path(restricted)]) == 1
    r.policy.flush(time.monotonic() + 11)
    later = [e for e in r.events if e.fields["cgroup"] == cgroup_path(restricted)]
    assert [e.fields["opens"] for e in later] == [1, 2] and later[1].fields["opens_total"] == 3
    # A workload below the rule's cgroup is its own scope (its own incident).
    assert [e.fields["opens"] for e in r.events if e.fields["cgroup"] == cgroup_path(child)] == [1]


def test_directory_rule_covers_new_files_links_and_renames(tmp_path, restricted, running):
    """As an attacker who cannot open the files: names made after the mark by someone who
    can (a new file, a hard link elsewhere, a symlink, a rename out) lead to the same
    refusal; a subdirectory made later is covered from the next rescan."""
    d = tmp_path / "protected"
    d.mkdir()
    (d / "old").write_text("1")
    r = start(running, FileRule(name="dir", paths=(f"{d}/",), cgroups=(cgroup_path(restricted),)))
    (d / "new").write_text("2")                 # created after the marks: the directory's
    assert open_from(restricted, d / "new") == "EPERM"
    os.link(d / "old", tmp_path / "hardlink")   # a name outside the directory, same inode
    assert open_from(restricted, tmp_path / "hardlink") == "EPERM"
    (tmp_path / "symlink").symlink_to(d / "old")
    assert open_from(restricted, tmp_path / "symlink") == "EPERM"
    os.rename(d / "new", tmp_path / "moved")    # marked at its first open through the dir
    assert open_from(restricted, tmp_path / "moved") == "EPERM"
    (d / "sub").mkdir()
    (d / "sub" / "deep").write_text("3")
    r.policy.gate.rescan()
    assert open_from(restricted, d / "sub" / "deep") == "EPERM"
    assert open_from(restricted, tmp_path / "unrelated-does-not-exist") == "ENOENT"
    (tmp_path / "free").write_text("4")
    assert open_from(restricted, tmp_path / "free") == "OK"
    assert r.policy.status()["rules"]["dir"]["uncovered"] == []


def test_a_bind_mount_into_another_mount_namespace_is_covered(tmp_path, restricted, running):
    """A host file bind-mounted into a "container" (a private mount namespace, as a
    runtime's volume mount): the same inode, the same refusal."""
    secret = tmp_path / "secret"
    secret.write_text("key")
    (tmp_path / "mnt").write_text("")
    start(running, FileRule(name="s", paths=(str(secret),), cgroups=(cgroup_path(restricted),)))
    script = (f'echo $$ > "{restricted}/cgroup.procs" && exec unshare -m sh -c '
              f'"mount --bind {secret} {tmp_path}/mnt && cat {tmp_path}/mnt"')
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=20)
    assert out.returncode != 0 and "Operation not permitted" in out.stderr, out
    assert out.stdout == ""


@pytest.fixture
def containers() -> Iterator[tuple[Path, Path, str]]:
    """Two "containers" as Docker's systemd driver names them
    (/system.slice/docker-ID.scope); /system.slice made for them when absent, and removed
    after if so. The first's id is returned."""
    import secrets
    root = cgroup2_mount() / "system.slice"
    made_root = not root.exists()
    root.mkdir(exist_ok=True)
    ids = [secrets.token_hex(32) for _ in range(2)]
    cgs = [root / f"docker-{i}.scope" for i in ids]
    for cg in cgs:
        cg.mkdir()
    try:
        yield cgs[0], cgs[1], ids[0]
    finally:
        for cg in cgs:
            remove_cgroup(cg)
        if made_root:
            with contextlib.suppress(OSError):
                root.rmdir()


def test_container_rule_by_id(tmp_path, containers, running):
    denied, other, cid = containers
    secret = tmp_path / "secret"
    secret.write_text("key")
    r = start(running, FileRule(name="c", paths=(str(secret),), containers=(cid,)))
    assert open_from(denied, secret) == "EPERM"
    assert open_from(other, secret) == "OK"
    assert r.policy.denied["c"] == 1
    [event] = wait_for(lambda: r.tick(), 5.0)
    assert event.fields["container_id"] == cid


def test_exec_of_a_denied_file_is_refused(tmp_path, restricted, running):
    tool = tmp_path / "tool"
    tool.write_text("#!/bin/sh\necho ran\n")
    tool.chmod(0o755)
    start(running, FileRule(name="tools", paths=(str(tool),), cgroups=(cgroup_path(restricted),)))
    assert open_from(restricted, tool, "exec") == "EPERM"


def test_missing_path_is_reported_and_marked_when_it_appears(tmp_path, restricted, running):
    later = tmp_path / "later"
    r = start(running, FileRule(name="later", paths=(str(later),), cgroups=(cgroup_path(restricted),)))
    assert r.policy.status()["rules"]["later"]["missing"] == [str(later)]
    assert "not present" in r.policy.reason
    later.write_text("x")
    assert open_from(restricted, later) == "OK"    # not marked yet: said so in status
    r.policy.gate.rescan()
    r.policy._judge_state()
    assert open_from(restricted, later) == "EPERM"
    assert r.policy.status()["rules"]["later"]["missing"] == [] and r.policy.reason == ""


def test_a_file_replaced_by_a_new_inode_is_marked_again(tmp_path, restricted, running):
    """passwd, editors and config managers replace a file (write a new one, rename it
    over): the new inode has no mark until the next per-tick rescan of the file paths."""
    secret = tmp_path / "secret"
    secret.write_text("old")
    r = start(running, FileRule(name="s", paths=(str(secret),), cgroups=(cgroup_path(restricted),)))
    (tmp_path / "secret.new").write_text("new")
    os.rename(tmp_path / "secret.new", secret)
    r.policy.gate.rescan(files_only=True)
    assert open_from(restricted, secret) == "EPERM"
    # the old inode's mark went with it in the kernel; the count is an upper bound
    assert r.policy.status()["rules"]["s"]["marks"] == 2


def test_a_judge_that_fails_allows(tmp_path, restricted, running):
    secret = tmp_path / "secret"
    secret.write_text("key")
    r = start(running, FileRule(name="s", paths=(str(secret),), cgroups=(cgroup_path(restricted),)))

    def broken(index: int, pid: int):
        raise RuntimeError("a bug of ours")
    r.policy.gate._judge = broken
    assert open_from(restricted, secret) == "OK"
    assert r.policy.gate.allowed_on_error == 1


def test_answering_that_breaks_closes_the_groups(tmp_path, restricted, running):
    """Should the answering loop itself fail, the groups are closed: the waiting open and
    every later one go through (fail open), and status says so."""
    secret = tmp_path / "secret"
    secret.write_text("key")
    r = start(running, FileRule(name="s", paths=(str(secret),), cgroups=(cgroup_path(restricted),)))

    def broken(index: int) -> None:
        raise OSError(5, "a read that failed")
    r.policy.gate._drain = broken
    assert open_from(restricted, secret) == "OK"
    assert open_from(restricted, secret) == "OK"
    assert r.policy.status()["state"] == "degraded"
    assert "answering stopped" in r.policy.reason


def test_agent_stopped_or_killed_leaves_no_hanging_open(tmp_path, restricted):
    """The real agent, SIGSTOPped while a denied workload's open waits on it, then killed:
    the kernel drops its fanotify fds and the waiting open proceeds. A graceful stop
    leaves no marks either."""
    secret = tmp_path / "secret"
    secret.write_text("key")
    path = cgroup_path(restricted)
    cfg = (f"rules_file: {FILE_RULES}\npolicy:\n  files:\n"
           f"    - {{name: secrets, paths: [{secret}], cgroups: [{path}]}}\n")
    with Scenario(cfg) as sc:
        assert open_from(restricted, secret) == "EPERM"
        os.kill(sc.agent.pid, signal.SIGSTOP)
        try:
            pre = f'echo $$ > "{restricted}/cgroup.procs" && '
            waiting = subprocess.Popen(["sh", "-c", pre + f'exec cat "{secret}"'],
                                       stdout=subprocess.PIPE, text=True)
            time.sleep(0.5)
            assert waiting.poll() is None      # blocked in open(2), waiting for the agent
            os.kill(sc.agent.pid, signal.SIGKILL)
        finally:
            os.kill(sc.agent.pid, signal.SIGCONT)
        out, _ = waiting.communicate(timeout=10)
        assert out == "key"
        sc.agent.proc.wait(10)
    assert open_from(restricted, secret) == "OK"


def test_denial_becomes_a_policy_violation_incident(tmp_path, restricted):
    """The real agent: a refused open becomes one incident of class policy_violation
    (repeats join it) within a second or so; status and metrics count it per rule."""
    secret = tmp_path / "secret"
    secret.write_text("key")
    path = cgroup_path(restricted)
    cfg = (f"rules_file: {FILE_RULES}\npolicy:\n  files:\n"
           f"    - {{name: secrets, paths: [{tmp_path}/], cgroups: [{path}]}}\n")
    with Scenario(cfg) as sc:
        t0 = time.monotonic()
        assert open_from(restricted, secret) == "EPERM"
        entity = f"file:secrets:cgroup:{path}"

        def incident():
            with sc.agent.store() as store:
                found = store.incidents(entity=entity)
            return found[0] if found else None
        inc = wait_for(incident, 10.0)
        took_s = time.monotonic() - t0
        assert open_from(restricted, secret, "w") == "EPERM"
        st = json.loads(subprocess.run(
            [sys.executable, "-m", "agent.cli.main", "status", "--json", "--config",
             str(sc.agent.config_path)], capture_output=True, text=True, timeout=60).stdout)
        with sc.agent.store() as store:
            assert len(store.incidents(event_class=EventClass.POLICY_VIOLATION)) == 1
    assert open_from(restricted, secret) == "OK"      # a graceful stop leaves no mark
    assert inc.event_class is EventClass.POLICY_VIOLATION
    assert inc.rules == ["policy.file_denied@1"], inc
    assert took_s < 2.0
    probes = {p["name"]: p for p in st["probes"]}
    assert probes["file_policy"]["state"] == "loaded", probes
    assert int(st["counters"]["files.denied.secrets"]) == 2
    assert int(st["counters"]["files.marks"]) >= 2


def test_bad_file_policy_exits_2(tmp_path):
    bad = tmp_path / "config.yaml"
    bad.write_text("policy:\n  files:\n    - {name: x, paths: [etc/shadow], cgroups: [/a]}\n")
    exe = Path(sys.executable).with_name("swarm-agent")
    for args in (["check-config"], ["run"]):
        out = subprocess.run([str(exe), *args, "--config", str(bad)], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 2, out
        assert "policy.files[x].paths: 'etc/shadow' is not an absolute path" in out.stderr
        assert "Traceback" not in out.stderr
