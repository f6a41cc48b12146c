"""The process probe against the real kernel: proc.bpf.o is loaded once for the module
and triggered by tiny real actions in child processes (the test process itself is the
"agent" and is never reported). Its tracepoints are host-global, so every assertion
matches the pids this test started. The breach rules run on the decoded events."""
from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from agent.config import CREDENTIAL_PATHS, Breach, Config, Probes
from agent.detect.rules import Detector, load_rules
from agent.sources import capability
from agent.sources.abi import PROC_OBJECT, ProcProg
from agent.sources.proc import ProcProbe
from tests.conftest import skip_unsupported

pytestmark = pytest.mark.privileged
REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
NOBODY = 65534


@pytest.fixture(scope="module")
def watched(tmp_path_factory) -> Path:
    """A temp dir that is both the agent's state dir and a credential dir (removed after)."""
    d = tmp_path_factory.mktemp("proc_probe")
    (d / "creds").mkdir()
    (d / "state").mkdir()       # exists before the probe resolves its watches, as in real life
    (d / "home/u/.ssh").mkdir(parents=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def service_exe(watched: Path) -> Path:
    """A service's executable: a copy of the Python interpreter (its own inode)."""
    exe = watched / "svc-bin"
    shutil.copy(os.path.realpath(PY), exe)
    return exe


@pytest.fixture(scope="module")
def cfg(watched: Path, service_exe: Path) -> Config:
    return Config(state_dir=str(watched / "state"), breach=Breach(
        services=(str(service_exe),), credential_paths=(*CREDENTIAL_PATHS, f"{watched}/creds/")),
        probes=Probes(process_owners=str(watched / "owners")))  # not the host's registrations


def id_of(path: str) -> str:
    st = os.stat(path)
    return f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}:{st.st_ino}"


def require_proc_probe() -> None:
    """Build the probes (a no-op when up to date); skip where this kernel cannot run them."""
    if shutil.which("clang") is None and not PROC_OBJECT.exists():
        skip_unsupported("no clang to build probes/proc.bpf.o")
    subprocess.run(["make", "-s", "-C", str(REPO / "probes")], check=True, timeout=300)
    caps = capability.probe()
    for need in ("btf", "tracepoint", "tracefs"):
        if not caps[need][0]:
            skip_unsupported(f"{need}: {caps[need][1]}")


def loaded_probe(cfg: Config) -> Iterator[ProcProbe]:
    """A process probe for `cfg`, every program loaded (else a skip), closed afterwards."""
    require_proc_probe()
    p = ProcProbe(cfg)
    p.open()
    bad = {k: v for k, v in p.status().items()
           if v["state"] != "loaded" and k != ProcProg.MODULE_LOAD}
    if bad:
        p.close()
        skip_unsupported(f"process probe degraded here: {bad}")
    yield p
    p.close()


@pytest.fixture(scope="module")
def probe(cfg: Config):
    """The loaded probe of this module's config; closed after the module."""
    yield from loaded_probe(cfg)


@pytest.fixture(scope="module")
def detector(cfg: Config) -> Detector:
    return Detector(load_rules(), cfg)


_SEEN: list = []   # every event polled in this module: one poll may hold several tests' events


def wait_for(probe: ProcProbe, pred, count: int = 1, timeout_s: float = 10.0) -> list:
    """Polls until `count` events seen satisfy pred (or the timeout); returns them."""
    deadline = time.monotonic() + timeout_s
    while True:
        _SEEN.extend(probe.poll())
        found = [e for e in _SEEN if pred(e)]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def rules_fired(detector: Detector, event) -> set[str]:
    return {f.rule for f in detector.evaluate(event, event.mono_ns)}


SERVICE = """
import ctypes, subprocess, sys
ctypes.CDLL(None).prctl(15, b"nginx", 0, 0, 0)   # PR_SET_NAME: look like a web server
sys.exit(subprocess.run(["sh", "-c", "exit 3"]).returncode)
"""


def test_renamed_process_is_no_service(probe, detector):
    """An unprivileged process renamed "nginx" (prctl) starting a shell: the shell is seen
    (an interpreter by identity), but nothing below it is a service."""
    svc = subprocess.Popen([PY, "-c", SERVICE], user=NOBODY)
    assert svc.wait(timeout=20) == 3
    [ex] = wait_for(probe, lambda e: e.kind == "proc.exec" and e.fields["ppid"] == svc.pid)
    f = ex.fields
    assert (f["comm"], f["parent_comm"], f["argv"]) == ("sh", "nginx", ["sh", "-c", "exit 3"])
    assert f["filename"].endswith("/sh") and (f["uid"], f["euid"]) == (NOBODY, NOBODY)
    assert f["exe"] == os.path.realpath("/bin/sh") and f["exe_is"] == ["shells"]
    assert f["ancestor_exes"][0] == os.path.realpath(PY) and "services" not in f["ancestors_are"]
    assert "program" in f["reason"] and f["stdio_inet"] == 0
    assert f["cgroup_id"] > 0 and ex.subject == f"pid:{f['pid']}"
    assert rules_fired(detector, ex) == set()


def test_shell_from_a_service_and_its_exit(probe, detector, service_exe):
    """The same script run by the service's executable (by inode): a service shell."""
    svc = subprocess.Popen([str(service_exe), "-c", SERVICE])
    assert svc.wait(timeout=20) == 3
    [ex] = wait_for(probe, lambda e: e.kind == "proc.exec" and e.fields["ppid"] == svc.pid)
    f = ex.fields
    assert f["parent_is"] == ["services"] and f["ancestor_exes"][0] == str(service_exe)
    assert {"program", "service_child"} <= set(f["reason"])
    assert rules_fired(detector, ex) == {"breach.service_shell@2"}
    [end] = wait_for(probe, lambda e: e.kind == "proc.exit" and e.fields["pid"] == f["pid"])
    assert (end.fields["exit_status"], end.fields["signal"]) == (3, 0)


OPENS = """
import sys
open("/etc/shadow", "rb").close()
for p in sys.argv[1:]:
    open(p, "w").close()
"""


def test_opens_of_watched_paths(probe, detector, watched):
    state = watched / "state"
    state.mkdir(exist_ok=True)
    creds, keys = watched / "creds/shadow", watched / "home/u/.ssh/authorized_keys"
    other = watched / "unwatched.txt"
    child = subprocess.Popen([PY, "-c", OPENS, str(state / "agent.db"), str(creds), str(keys),
                              str(other)])
    assert child.wait(timeout=20) == 0
    events = wait_for(probe, lambda e: e.kind == "file.open" and e.fields["pid"] == child.pid,
                      count=4)
    by_path = {e.subject: e for e in events}
    assert set(by_path) == {"/etc/shadow", str(state / "agent.db"), str(creds), str(keys)}
    shadow = by_path["/etc/shadow"].fields
    assert (shadow["write"], shadow["pattern"], shadow["syscall"]) == (False, "/etc/shadow*", "openat")
    assert shadow["file_id"] == id_of("/etc/shadow") and shadow["match"] == "file"
    assert rules_fired(detector, by_path["/etc/shadow"]) == set()
    assert rules_fired(detector, by_path[str(state / "agent.db")]) == {"breach.agent_tamper@2"}
    assert by_path[str(creds)].fields["created"] and by_path[str(creds)].fields["match"] == "dir"
    assert rules_fired(detector, by_path[str(creds)]) == {"breach.credential_write@2"}
    assert by_path[str(keys)].fields["pattern"] == "*/.ssh/authorized_keys"   # by names
    assert by_path[str(keys)].fields["match"] == "name"
    assert rules_fired(detector, by_path[str(keys)]) == {"breach.credential_write@2"}


TRACER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
pid = int(sys.argv[1])
if libc.ptrace(16, pid, None, None) != 0:          # PTRACE_ATTACH
    sys.exit(10 + ctypes.get_errno())
os.waitpid(pid, 0)
libc.ptrace(17, pid, None, None)                   # PTRACE_DETACH
"""


def test_ptrace_of_another_users_process(probe, detector):
    target = subprocess.Popen(["sleep", "30"], user=NOBODY)
    try:
        tracer = subprocess.run([PY, "-c", TRACER, str(target.pid)], timeout=20)
        if tracer.returncode >= 10:
            skip_unsupported(f"ptrace attach refused here: {os.strerror(tracer.returncode - 10)}")
        assert tracer.returncode == 0
        [ev] = wait_for(probe, lambda e: e.kind == "proc.ptrace"
                        and e.fields["target_pid"] == target.pid)
    finally:
        target.kill()
        target.wait()
    f = ev.fields
    assert (f["request"], f["result"], f["uid"]) == ("attach", 0, 0)
    assert (f["target_tgid"], f["target_uid"], f["target_comm"]) == (target.pid, NOBODY, "sleep")
    assert rules_fired(detector, ev) == {"breach.ptrace_other_user@2"}   # root python: no debugger


REVERSE = """
import os, socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
for fd in (0, 1, 2):
    os.dup2(s.fileno(), fd)
os.execv("/bin/sh", ["sh", "-c", "exit 0"])
"""


def test_reverse_shell_shape(probe, detector):
    with socket.create_server(("127.0.0.1", 0)) as srv:
        child = subprocess.Popen([PY, "-c", REVERSE, str(srv.getsockname()[1])])
        conn, _ = srv.accept()
        assert child.wait(timeout=20) == 0
        conn.close()
    # the same pid execs python3 first (an interpreter: reported, plain stdio), then sh
    [ev] = wait_for(probe, lambda e: e.kind == "proc.exec" and e.fields["pid"] == child.pid
                    and e.fields["comm"] == "sh")
    f = ev.fields
    assert (f["comm"], f["stdin"], f["stdout"], f["stderr"], f["stdio_inet"]) == \
        ("sh", "inet", "inet", "inet", 3)
    assert {"program", "socket_stdio"} <= set(f["reason"])
    assert rules_fired(detector, ev) == {"breach.reverse_shell@2"}


LOADER = """
from agent.sources import libbpf
obj = libbpf.Object(__import__("sys").argv[1])
obj.load()
obj.close()
"""


def test_bpf_program_load_by_another_process(probe, detector):
    child = subprocess.Popen([PY, "-c", LOADER, str(PROC_OBJECT)], cwd=REPO)
    assert child.wait(timeout=60) == 0
    # libbpf's feature probes load programs too; the object's own carry their names
    # (BPF_OBJ_NAME_LEN: 15 characters).
    ev, *_ = wait_for(probe, lambda e: e.kind == "bpf.prog_load" and e.fields["pid"] == child.pid
                      and e.fields["prog_name"] == "handle_sys_ente", count=4)
    assert ev.fields["prog_type"] == 5 and ev.fields["insn_cnt"] > 0   # BPF_PROG_TYPE_TRACEPOINT
    assert rules_fired(detector, ev) == {"breach.bpf_load@2"}


def test_own_process_is_not_reported(probe):
    probe.poll()
    open("/etc/shadow", "rb").close()                 # the "agent" (this process) reads
    with open(os.devnull, "rb"):
        pass
    time.sleep(0.2)
    assert not [e for e in probe.poll() if e.fields["pid"] == os.getpid()]


def test_run_emits_on_the_loop_and_counts_losses(probe):
    got: list = []

    async def main():
        task = asyncio.create_task(probe.run(got.append))
        await asyncio.sleep(0.05)
        proc = await asyncio.create_subprocess_exec("sh", "-c", "exit 0")
        await proc.wait()
        deadline = time.monotonic() + 10
        while not any(e.kind == "proc.exec" and e.fields["pid"] == proc.pid for e in got):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        task.cancel()

    asyncio.run(main())
    per_cpu = probe.losses_per_cpu()
    assert len(per_cpu) >= os.cpu_count() and probe.losses() == sum(per_cpu)
