"""Events never carry stale bytes of earlier paths: the process probe builds paths in a
per-CPU scratch buffer (the dentry walk) and copies them into events. A long path walked
then a short one on the same CPU: the short event's raw bytes after its path are zero
(not the tail of the long one), for the executable's path of every event (proc_ctx) and
the opened file's path of file.open. The raw ring-buffer record is what is checked, not
the decoded string (the decoder honours the length, so it would hide a leak)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.config import CREDENTIAL_PATHS, Breach, Config, Probes
from agent.sources import abi
from agent.sources.proc import ProcProbe
from tests.conftest import skip_unsupported
from tests.integration.test_proc_probe import require_proc_probe

pytestmark = pytest.mark.privileged
TRUE = os.path.realpath("/bin/true")


@pytest.fixture
def deep(tmp_path: Path) -> Path:
    """A directory whose path is ~200 bytes long (removed with tmp_path)."""
    d = tmp_path.joinpath(*(["d" * 40] * 4))
    d.mkdir(parents=True)
    return d


@pytest.fixture
def probe(tmp_path: Path, deep: Path):
    """The process probe reporting every exec, with `deep` a watched credential directory;
    its raw records are kept in probe.raw. Closed after the test."""
    require_proc_probe()
    cfg = Config(state_dir=str(tmp_path / "state"),
                 breach=Breach(credential_paths=(*CREDENTIAL_PATHS, f"{deep}/")),
                 probes=Probes(process_owners=str(tmp_path / "owners")))
    p = ProcProbe(cfg, all_execs=True)
    p.open()
    if p.status()[abi.ProcProg.EXEC]["state"] != "loaded":
        p.close()
        skip_unsupported(f"exec program not loaded: {p.status()[abi.ProcProg.EXEC]}")
    p.raw = []
    decode = p._decode

    def keep(record: bytes):
        p.raw.append(bytes(record))
        return decode(record)

    p._decode = keep
    yield p
    p.close()


def on_cpu(cpu: int):
    return lambda: os.sched_setaffinity(0, {cpu})


def records(probe: ProcProbe, pred, timeout_s: float = 10.0) -> list:
    """Decoded raw records (ctypes structures) satisfying pred, polled until one is seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        probe.poll()
        found = [ev for ev in map(abi.decode, probe.raw) if ev is not None and pred(ev)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def tail(buf, used: int) -> bytes:
    return bytes(buf)[used:]


def test_short_exec_after_long_carries_no_stale_path(probe, deep):
    cpu = min(os.sched_getaffinity(0))
    long_exe = deep / "t"
    shutil.copy(TRUE, long_exe)
    for _ in range(3):      # the long path is the last walk on this CPU before the short one
        first = subprocess.Popen([str(long_exe)], preexec_fn=on_cpu(cpu))
        second = subprocess.Popen([TRUE], preexec_fn=on_cpu(cpu))
        assert first.wait(timeout=20) == 0 and second.wait(timeout=20) == 0
    execs = records(probe, lambda ev: ev.hdr.kind == abi.EventKind.PROC_EXEC
                    and ev.proc.pid == second.pid)
    [long_ev] = records(probe, lambda ev: ev.hdr.kind == abi.EventKind.PROC_EXEC
                        and ev.proc.pid == first.pid)
    assert long_ev.proc.exe_path_len > 200          # the long walk did fill the buffer
    [ev] = execs
    p = ev.proc
    assert bytes(p.exe_path[:p.exe_path_len]).split(b"\0")[:2] == [b"true", b"bin"]
    assert p.exe_path_len < 40
    assert tail(p.exe_path, p.exe_path_len) == bytes(abi.PATH_LEN - p.exe_path_len)
    exits = records(probe, lambda e: e.hdr.kind == abi.EventKind.PROC_EXIT and e.proc.pid == second.pid)
    assert exits and all(tail(e.proc.exe_path, e.proc.exe_path_len)
                         == bytes(abi.PATH_LEN - e.proc.exe_path_len) for e in exits)


OPENS = """
import sys
open(sys.argv[1], "w").close()
open("/etc/shadow", "rb").close()
"""


def test_short_open_after_long_carries_no_stale_path(probe, deep):
    cpu = min(os.sched_getaffinity(0))
    child = subprocess.Popen([sys.executable, "-c", OPENS, str(deep / ("f" * 30))],
                             preexec_fn=on_cpu(cpu))
    assert child.wait(timeout=20) == 0
    [long_ev] = records(probe, lambda ev: ev.hdr.kind == abi.EventKind.FILE_OPEN
                        and ev.proc.pid == child.pid and ev.path[0] == ord("f"))
    assert long_ev.path_len > 150
    [ev] = records(probe, lambda ev: ev.hdr.kind == abi.EventKind.FILE_OPEN
                   and ev.proc.pid == child.pid and ev.path[0] == ord("s"))
    assert bytes(ev.path[:ev.path_len]) == b"shadow\0etc\0"
    assert tail(ev.path, ev.path_len) == bytes(abi.PATH_LEN - ev.path_len)
    assert tail(ev.proc.exe_path, ev.proc.exe_path_len) == bytes(abi.PATH_LEN
                                                                 - ev.proc.exe_path_len)
