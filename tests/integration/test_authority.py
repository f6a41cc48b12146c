"""Authority with real processes: an unprivileged user's breach never isolates the node.

The process enforcer kills only the actor's session members of its own uid (real
processes, real pidfds); and a real agent (`swarm-agent run` in the lab's victim
namespace, its real process probe) answers a credential write by uid 65534 (nobody) --
a node-scoped rule, with a management allowlist so node isolation would go ahead for
root -- on the writer's throw-away cgroup, or, from the root cgroup, by killing it.

Scoping: the agent owns only its namespace's processes (the writer runs there) and gets
only breach.credential_write, with credential_paths set to one file the test creates.
"""
from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from swarmlab.breachlab import (SERVICE, agent_config, cgroup_path, scoped_rules, service_exe,
                             service_name, throwaway_cgroup)
from agent.enforce.base import InvalidTarget, TargetNotFound
from agent.enforce.cgroup import cgroup2_mount
from agent.enforce.process import ProcessEnforcer, ProcessError
from swarmlab.lab import sh, wait_for
from agent.model import Mitigation, MitigationKind
from swarmlab.scenario import AgentProcess
from tests.integration.test_breach_e2e import agent_stopped, cli, echoes, started

pytestmark = pytest.mark.privileged
NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
DEADLINE_S = 10.0
# The unprivileged writer: told when to write, then waits (bounded) to be frozen or killed.
WRITER = r"""
import sys, time
print("ready", flush=True)
sys.stdin.readline()
open(sys.argv[1], "a").close()
print("wrote", flush=True)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    time.sleep(0.1)
"""


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_kill_process_kills_only_the_actors_session_members(setpriv):
    # One session: a root sleeper, then nobody's shell (the actor) and its child.
    inner = "sleep 60 & echo $!; exec sleep 61"
    outer = f"sleep 60 & echo $!; exec {' '.join(AS_NOBODY)} sh -c '{inner}'"
    actor = subprocess.Popen(["sh", "-c", outer], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    other = subprocess.Popen([*AS_NOBODY, "sleep", "60"], start_new_session=True)
    assert actor.stdout is not None
    root_sleeper, child = int(actor.stdout.readline()), int(actor.stdout.readline())
    try:
        wait_for(lambda: Path(f"/proc/{actor.pid}/status").read_text().count(f"\t{NOBODY}") >= 1,
                 5.0)
        enf = ProcessEnforcer()
        with pytest.raises(ProcessError, match="belongs to uid 0"):
            enf.check(str(root_sleeper), {"uid": NOBODY})
        with pytest.raises(ProcessError, match="root"):
            enf.check(str(child), {"uid": 0})
        with pytest.raises(InvalidTarget):
            enf.check("12ab", {"uid": NOBODY})
        assert enf.is_allowlisted(str(os.getpid())) and enf.is_allowlisted("1")

        enf.apply(Mitigation(MitigationKind.KILL_PROCESS, str(child), 0.0, None,
                             params={"uid": NOBODY}), 0.0)
        assert actor.wait(timeout=5) == -9                    # the actor's shell
        wait_for(lambda: not alive(child), 5.0)               # and its child
        assert alive(root_sleeper)                            # root's, same session: spared
        assert other.poll() is None                           # nobody's other session: spared
        with pytest.raises(TargetNotFound, match="has exited"):
            enf.check(str(actor.pid), {"uid": NOBODY})
    finally:
        for pid in (root_sleeper, child):
            if alive(pid):
                os.kill(pid, 9)
        for p in (actor, other):
            p.kill()
            p.wait()


def write_now(writer: subprocess.Popen[str]) -> None:
    """Tell a WRITER to write, once it is ready; return when it has."""
    assert writer.stdout is not None and writer.stdin is not None
    assert writer.stdout.readline().strip() == "ready"
    writer.stdin.write("go\n")
    writer.stdin.flush()
    # The agent may act between the open and the print: killed (end of output, "") or
    # frozen (nothing more, ever): the callers check which. Never wait past the deadline.
    if select.select([writer.stdout], [], [], DEADLINE_S)[0]:
        assert writer.stdout.readline().strip() in ("wrote", "")


def _watched_file() -> Path:
    d = Path(tempfile.mkdtemp(prefix="swa-auth-", dir="/tmp"))
    d.chmod(0o755)
    f = d / "shadow"
    f.write_text("")
    os.chown(f, NOBODY, NOBODY)
    return f


def _agent(lab, tmp: Path, watched: Path) -> AgentProcess:
    rules = scoped_rules(tmp / "rules", ("breach.credential_write",))
    # A management allowlist: without it node isolation is refused anyway, and this test
    # could not tell authority from that refusal.
    agent = AgentProcess(lab.victim, tmp, (
        f"rules_file: {rules}\ninterfaces: [v0]\n"
        "allowlist:\n  management: [192.0.2.0/24]\n"
        f"breach:\n  services: []\n  credential_paths: [{watched}]\n"
        "  read_paths: []\n"))
    return started(agent, "handle_sys_exit_openat")


@pytest.mark.parametrize("own_cgroup", [True, False], ids=["own-cgroup", "root-cgroup"])
def test_unprivileged_credential_write_never_isolates_the_node(lab, tmp_path, setpriv,
                                                              own_cgroup):
    watched = _watched_file()
    agent = _agent(lab, tmp_path, watched)
    with agent_stopped(agent), throwaway_cgroup("swa-auth") as cg:
        home = cg if own_cgroup else cgroup2_mount()
        script = f'echo $$ > "{home}/cgroup.procs" && exec "$@"'
        writer = subprocess.Popen(
            ["sh", "-c", script, "sh", "ip", "netns", "exec", lab.victim, *AS_NOBODY,
             "/usr/bin/python3", "-c", WRITER, str(watched)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            start_new_session=True)
        try:
            write_now(writer)
            if own_cgroup:
                wait_for(lambda: "frozen 1" in (cg / "cgroup.events").read_text(), DEADLINE_S)
                entity, kind, target = (f"cgroup:{cgroup_path(cg)}", "isolate_service",
                                        cgroup_path(cg))
            else:
                assert writer.wait(timeout=DEADLINE_S) == -9     # killed, not the node
                entity, kind, target = (f"user:{NOBODY}", "kill_process", str(writer.pid))
            wait_for(lambda: any(i["entity"] == entity for i in cli(agent, "incidents")), 5.0)
            (inc,) = cli(agent, "incidents")
            assert (inc["entity"], inc["state"]) == (entity, "escalated")
            assert inc["rules"] == ["breach.credential_write@2"]
            (m,) = cli(agent, "mitigations")
            assert (m["kind"], m["target"]) == (kind, target)
            timeline = cli(agent, "incident", inc["id"])
            assert f"actor uid {NOBODY} is unprivileged" in str(timeline)
            # The kernel's own view: no node isolation rule (the forward chain stays empty).
            fwd = sh("nft", "list", "chain", "inet", "swarm_agent", "isolate_fwd",
                     ns=lab.victim).stdout
            assert "drop" not in fwd
        finally:
            writer.kill()
            writer.wait()
            shutil.rmtree(watched.parent, ignore_errors=True)


def test_unprivileged_service_shell_cannot_isolate_the_node(lab, tmp_path, setpriv):
    """A service (by its executable) run by nobody starts a shell from the root cgroup:
    breach.service_shell fires with scope service and, the process being in no service
    cgroup, would fall back to the node; authority answers it by killing the actor's
    session instead. (A process merely renamed like a service is no service at all:
    tests/integration/test_proc_identity.py.)"""
    name = service_name()
    agent = AgentProcess(lab.victim, tmp_path, agent_config(
        name, scoped_rules(tmp_path / "rules"),
        "allowlist:\n  management: [192.0.2.0/24]\n"))
    agent.start()
    victim = lab.addr("victim")
    with agent_stopped(agent):
        script = f'echo $$ > "{cgroup2_mount()}/cgroup.procs" && exec "$@"'
        svc = subprocess.Popen(
            ["sh", "-c", script, "sh", "ip", "netns", "exec", lab.victim, *AS_NOBODY,
             str(service_exe(name)), "-c", SERVICE, name, victim, "9100", "60"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            assert svc.stdout is not None and svc.stdin is not None
            assert svc.stdout.readline().strip() == "ready"
            svc.stdin.write("exec\n")
            svc.stdin.flush()
            assert svc.wait(timeout=DEADLINE_S) == -9            # its session was killed
            wait_for(lambda: cli(agent, "incidents") != [], 5.0)
            (inc,) = cli(agent, "incidents")
            assert (inc["entity"], inc["state"]) == (f"user:{NOBODY}", "escalated")
            assert inc["rules"] == ["breach.service_shell@2"]
            assert [m["kind"] for m in cli(agent, "mitigations")] == ["kill_process"]
            fwd = sh("nft", "list", "chain", "inet", "swarm_agent", "isolate_fwd",
                     ns=lab.victim).stdout
            assert "drop" not in fwd
            # The node keeps serving: a root echo server in the victim still answers.
            with subprocess.Popen(["ip", "netns", "exec", lab.victim, "/usr/bin/python3", "-c",
                                   SERVICE, service_name(), victim, "9101", "20"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as ok:
                assert ok.stdout is not None and ok.stdout.readline().strip() == "ready"
                assert echoes(lab.attacker, victim, 9101)
                ok.kill()
        finally:
            svc.kill()
            svc.wait()


# Moves every process of cgroup argv[1] to argv[2] once argv[1] is frozen (or its parent
# is: then this process is frozen too and never gets to).
MOVER = r"""
import sys, time
src, dst = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    if "frozen 1" in open(src + "/cgroup.events").read():
        for pid in open(src + "/cgroup.procs").read().split():
            open(dst + "/cgroup.procs", "w").write(pid)
        print("moved", flush=True)
        break
    time.sleep(0.02)
time.sleep(30)
"""


def test_an_actor_cannot_move_out_of_the_isolation_of_a_cgroup_delegated_to_it(lab, tmp_path,
                                                                             setpriv):
    """systemd delegates a subtree to each user (user@UID.service; `systemd-run --user`
    runs below it): the user owns its cgroup.procs and creates cgroups there. Writing from
    one of them, with a process of its own in a sibling ready to move it out of the
    freeze, the actor is isolated at the top of what was delegated: nothing escapes."""
    watched = _watched_file()
    agent = _agent(lab, tmp_path, watched)
    with agent_stopped(agent), throwaway_cgroup("swa-deleg") as top:
        for name in ("", "cgroup.procs", "cgroup.threads", "cgroup.subtree_control"):
            os.chown(top / name, NOBODY, NOBODY)
        subprocess.run([*AS_NOBODY, "mkdir", str(top / "a"), str(top / "b")], check=True)
        into = lambda cg: ["sh", "-c", f'echo $$ > "{cg}/cgroup.procs" && exec "$@"', "sh"]
        mover = subprocess.Popen([*into(top / "b"), *AS_NOBODY, "/usr/bin/python3", "-c", MOVER,
                                  str(top / "a"), str(top / "b")], stdout=subprocess.PIPE,
                                 text=True, start_new_session=True)
        writer = subprocess.Popen(
            [*into(top / "a"), "ip", "netns", "exec", lab.victim, *AS_NOBODY,
             "/usr/bin/python3", "-c", WRITER, str(watched)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            write_now(writer)
            wait_for(lambda: "frozen 1" in (top / "cgroup.events").read_text(), DEADLINE_S)
            (m,) = cli(agent, "mitigations")
            assert (m["kind"], m["target"]) == ("isolate_service", cgroup_path(top))
            time.sleep(1.0)
            assert (top / "a" / "cgroup.procs").read_text().split() == [str(writer.pid)]
            assert "frozen 1" in (top / "a" / "cgroup.events").read_text()
        finally:
            for p in (writer, mover):
                p.kill()
                p.wait()
            for sub in ("a", "b"):
                with contextlib.suppress(OSError):
                    (top / sub / "cgroup.kill").write_text("1")
                with contextlib.suppress(TimeoutError):
                    wait_for(lambda: not (top / sub / "cgroup.procs").read_text().strip(), 5.0)
                with contextlib.suppress(OSError):
                    (top / sub).rmdir()
            shutil.rmtree(watched.parent, ignore_errors=True)


def test_a_cgroup_shared_with_another_user_is_not_isolated_for_one_of_them(lab, tmp_path,
                                                                           setpriv):
    """One leaf cgroup holds root's daemon and two users' processes (ssh.service without
    pam_systemd, cron.service, php-fpm pools): nobody's write kills nobody's session;
    the cgroup is neither frozen nor cut, the other user's process runs on."""
    watched = _watched_file()
    agent = _agent(lab, tmp_path, watched)
    with agent_stopped(agent), throwaway_cgroup("swa-shared") as cg:
        into = ["sh", "-c", f'echo $$ > "{cg}/cgroup.procs" && exec "$@"', "sh", "ip", "netns",
                "exec", lab.victim]
        other_uid = ["setpriv", f"--reuid={NOBODY - 1}", f"--regid={NOBODY - 1}", "--clear-groups"]
        daemon = subprocess.Popen([*into, "sleep", "60"], start_new_session=True)
        other = subprocess.Popen([*into, *other_uid, "sleep", "60"], start_new_session=True)
        writer = subprocess.Popen([*into, *AS_NOBODY, "/usr/bin/python3", "-c", WRITER,
                                   str(watched)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, start_new_session=True)
        try:
            assert writer.stdout is not None and writer.stdin is not None
            assert writer.stdout.readline().strip() == "ready"
            wait_for(lambda: f"\t{NOBODY - 1}\t" in Path(f"/proc/{other.pid}/status").read_text(), 5.0)
            writer.stdin.write("go\n")
            writer.stdin.flush()
            assert writer.stdout.readline().strip() in ("wrote", "")   # "": killed first
            assert writer.wait(timeout=DEADLINE_S) == -9
            (m,) = cli(agent, "mitigations")
            assert (m["kind"], m["target"]) == ("kill_process", str(writer.pid))
            (inc,) = cli(agent, "incidents")
            assert f"it also holds processes of uid {NOBODY - 1}" in str(cli(agent, "incident", inc["id"]))
            assert "frozen 0" in (cg / "cgroup.events").read_text()
            assert other.poll() is None and daemon.poll() is None
        finally:
            for p in (writer, other, daemon):
                p.kill()
                p.wait()
            shutil.rmtree(watched.parent, ignore_errors=True)


def test_an_actor_that_has_already_exited_gets_its_parents_session_killed(lab, tmp_path,
                                                                          setpriv):
    """The usual shape: a shell runs `sh -c 'echo ... >> FILE'`, a child that is gone
    milliseconds later, before the agent acts. The kill falls back to the child's parent
    (the evidence's ppid), still only if it runs as the actor's uid: the shell and its
    session die, not just nothing."""
    watched = _watched_file()
    agent = _agent(lab, tmp_path, watched)
    with agent_stopped(agent):
        script = f'echo $$ > "{cgroup2_mount()}/cgroup.procs" && exec "$@"'
        inner = f"read go; sh -c 'echo x >> {watched}'; echo wrote; exec sleep 60"
        shell = subprocess.Popen(["sh", "-c", script, "sh", "ip", "netns", "exec", lab.victim,
                                  *AS_NOBODY, "sh", "-c", inner], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            assert shell.stdout is not None and shell.stdin is not None
            wait_for(lambda: f"\t{NOBODY}\t" in Path(f"/proc/{shell.pid}/status").read_text(), 5.0)
            shell.stdin.write("go\n")
            shell.stdin.flush()
            assert shell.stdout.readline().strip() in ("wrote", "")    # "": killed first
            assert shell.wait(timeout=DEADLINE_S) == -9            # the session's shell
            (m,) = cli(agent, "mitigations")
            assert (m["kind"], m["state"]) == ("kill_process", "active")
            assert m["target"] != str(shell.pid)                  # the child, long gone
        finally:
            shell.kill()
            shell.wait()
            shutil.rmtree(watched.parent, ignore_errors=True)


def test_the_parent_fallback_is_checked_like_the_actor(setpriv):
    gone = subprocess.Popen(["true"])
    gone.wait()
    root_parent = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        enf = ProcessEnforcer()
        with pytest.raises(ProcessError, match="belongs to uid 0"):
            enf.check(str(gone.pid), {"uid": NOBODY, "ppid": root_parent.pid})
        with pytest.raises(ProcessError, match="PID 1 or the agent"):
            enf.check(str(gone.pid), {"uid": NOBODY, "ppid": os.getpid()})
        with pytest.raises(TargetNotFound, match="has exited"):
            enf.check(str(gone.pid), {"uid": NOBODY, "ppid": 1})     # never PID 1's session
        with pytest.raises(TargetNotFound, match="has exited"):
            enf.check(str(gone.pid), {"uid": NOBODY})
    finally:
        root_parent.kill()
        root_parent.wait()


HOPPER = r"""
import os, sys, time
print(os.getpid(), flush=True)
for _ in range(8):                       # hoppers: each a new pid every fork
    if os.fork() == 0:
        print("hopping", flush=True)   # eight hoppers may write on one line
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if os.fork():
                os._exit(0)
        os._exit(0)
time.sleep(20)                           # the anchor
"""


def _session_members(sid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[3]) == sid and alive(int(d.name)):
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def test_kill_process_catches_a_pid_hopping_session(setpriv):
    """A member that forks and exits in a loop changes pid faster than one /proc scan:
    the kill sweeps the session until a scan finds nobody."""
    actor = subprocess.Popen([*AS_NOBODY, sys.executable, "-c", HOPPER], stdout=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        assert actor.stdout is not None
        anchor = int(actor.stdout.readline())
        assert "hopping" in actor.stdout.readline()     # the first hopper runs
        ProcessEnforcer().apply(Mitigation(MitigationKind.KILL_PROCESS, str(anchor), 0.0, None,
                                           params={"uid": NOBODY}), 0.0)
        wait_for(lambda: _session_members(anchor) == [], 2.0)
        time.sleep(0.5)                           # and nothing comes back
        assert _session_members(anchor) == []
    finally:
        for pid in _session_members(actor.pid):
            os.kill(pid, 9)
        actor.kill()
        actor.wait()
