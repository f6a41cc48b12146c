"""32-bit syscalls (`int $0x80`, x86-64 ia32 emulation) against the real kernel: the
syscalls:* tracepoints never fire for them, so proc.bpf.o's raw_syscalls:sys_exit handler
(probes/compat.bpf.h) must report them. A 64-bit static non-PIE program built here with
gcc (tests/integration/int80.c) opens a watched scratch file with the i386 open, and
duplicates a TCP socket onto fd 1 (i386 dup2) and onto fd 0 (i386 fcntl64 F_DUPFD), and
attaches to its child with the i386 ptrace."""
from __future__ import annotations

import platform
import shutil
import socket
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from agent.config import Breach, Config, Probes
from agent.detect.rules import Detector, load_rules
from agent.sources.abi import ProcProg
from agent.sources.proc import ProcProbe
from tests.conftest import skip_unsupported
from tests.integration.test_proc_identity import probe  # noqa: F401 (fixture)

pytestmark = pytest.mark.privileged
SOURCE = Path(__file__).with_name("int80.c")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("compat")
    (d / "etc").mkdir()
    (d / "etc/shadow").write_text("root:*:1::::::\n")
    if platform.machine() != "x86_64" or not Path("/proc/sys/abi/vsyscall32").exists():
        skip_unsupported("no x86-64 ia32 emulation here")
    if shutil.which("gcc") is None:
        skip_unsupported("no gcc to build the int 0x80 program")
    subprocess.run(["gcc", "-static", "-no-pie", "-O1", "-o", str(d / "int80"), str(SOURCE)],
                   check=True, timeout=120)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def cfg(root: Path) -> Config:
    return Config(state_dir=str(root / "state"),
                  breach=Breach(credential_paths=(f"{root}/etc/shadow",), read_paths=()),
                  probes=Probes(process_owners=str(root / "owners")))


@pytest.fixture(scope="module")
def detector(cfg: Config) -> Detector:
    return Detector(load_rules(), cfg)


_SEEN: list = []


def events_of(probe, pid: int, kind: str, timeout_s: float = 10.0) -> list:
    deadline = time.monotonic() + timeout_s
    while True:
        _SEEN.extend(probe.poll())
        found = [e for e in _SEEN if e.kind == kind and e.fields["pid"] == pid]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def fired(detector: Detector, events) -> set[str]:
    return {f.rule for e in events for f in detector.evaluate(e, e.mono_ns)}


def int80(root: Path, *args: str) -> int:
    child = subprocess.Popen([str(root / "int80"), *args], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL)
    assert child.wait(timeout=30) == 0
    return child.pid


def test_the_compat_handler_is_attached(probe):
    st = probe.status()[ProcProg.COMPAT_EXIT]
    assert st["state"] == "loaded", st


def test_i386_open_of_a_watched_file(probe, detector, root):
    pid = int80(root, "open", str(root / "etc/shadow"))
    opens = events_of(probe, pid, "file.open")
    assert [(e.fields["path"], e.fields["write"], e.fields["syscall"]) for e in opens] == \
        [(str(root / "etc/shadow"), True, "open")]
    assert any(r.startswith("breach.credential_write") for r in fired(detector, opens))


def test_i386_open_of_another_file_is_quiet(probe, root):
    other = root / "other"
    other.write_text("")
    pid = int80(root, "open", str(other))
    assert events_of(probe, pid, "file.open", timeout_s=1.0) == []


@pytest.mark.parametrize("how,newfd", [("dup2", 1), ("fcntl", 0)])
def test_i386_socket_onto_a_standard_stream(probe, detector, root, how, newfd):
    with socket.create_server(("127.0.0.1", 0)) as srv:
        pid = int80(root, how, str(srv.getsockname()[1]))
        dups = events_of(probe, pid, "proc.stdio_dup")
    assert [(e.fields["newfd"], e.fields["syscall"]) for e in dups] == \
        [(newfd, "dup2" if how == "dup2" else "fcntl")]
    assert any(r.startswith("breach.socket_dup") for r in fired(detector, dups))


def test_i386_ptrace_attach(probe, root):
    pid = int80(root, "ptrace", "-")
    [ev] = events_of(probe, pid, "proc.ptrace")
    f = ev.fields
    assert (f["request"], f["result"]) == ("attach", 0)
    assert f["target_tgid"] == f["target_pid"] and f["target_tgid"] != pid


def test_off_by_config_is_said_in_status(cfg, root):
    """probes.compat_syscalls false: the handler is not loaded, and status says what passes
    unseen while ia32 emulation is on; the rest of the probe runs."""
    p = ProcProbe(replace(cfg, probes=replace(cfg.probes, compat_syscalls=False)))
    p.open()
    try:
        st = p.status()
        pid = int80(root, "open", str(root / "etc/shadow"))
        time.sleep(0.3)
        assert [e for e in p.poll() if e.fields.get("pid") == pid] == []
    finally:
        p.close()
    assert st[ProcProg.COMPAT_EXIT]["state"] == "degraded"
    assert "compat_syscalls is false" in st[ProcProg.COMPAT_EXIT]["reason"]
    assert "ia32 emulation is on" in st[ProcProg.COMPAT_EXIT]["reason"]
    assert st[ProcProg.OPENAT]["state"] == "loaded"
