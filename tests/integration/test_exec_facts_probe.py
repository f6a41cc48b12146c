"""The exec policy's kernel facts against the real kernel: proc.bpf.o loaded with the
exec_policy map switched on and off, real execs from /tmp, /dev/shm, a memfd, an
unlinked O_TMPFILE and through a symlink; the decoded proc.exec fields (exe_location,
exe_memfd, exe_unlinked, exe_sha256 of the file actually run)."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import Config, Probes
from agent.detect.execpolicy import ExecNeeds
from tests.integration.test_proc_probe import loaded_probe, wait_for

pytestmark = pytest.mark.privileged
SLEEP = os.path.realpath(shutil.which("sleep") or "/bin/sleep")
DIGEST = hashlib.sha256(Path(SLEEP).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    d = tmp_path_factory.mktemp("exec_facts")
    cfg = Config(state_dir=str(d), probes=Probes(process_owners=str(d / "owners")))
    for p in loaded_probe(cfg):
        p.set_exec_policy(ExecNeeds(every_exec=True, hash_exes=True))
        yield p


def exec_of(probe, proc: subprocess.Popen, argv0: str | None = None) -> dict:
    """The exec event of `proc` (the one with argv[0] `argv0`, when given)."""
    [ev] = wait_for(probe, lambda e: e.kind == "proc.exec" and e.fields["pid"] == proc.pid
                    and "policy" in e.fields["reason"]
                    and (argv0 is None or e.fields["argv"][:1] == [argv0]),
                    timeout_s=10)[-1:] or [None]
    assert ev is not None, "no exec event"
    return ev.fields


@pytest.fixture
def places():
    made = []
    yield made
    for p in made:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def test_locations_and_hash_from_the_kernels_facts(probe, places):
    tmp = Path("/tmp") / f"swa-facts-{os.getpid()}"
    shm = Path("/dev/shm") / f"swa-facts-{os.getpid()}"
    home = Path("/var/lib") / f"swa-facts-{os.getpid()}"
    places += [tmp, shm, home]
    tmp.mkdir()
    home.mkdir()
    shutil.copy2(SLEEP, tmp / "x")
    shutil.copy2(SLEEP, shm)
    shutil.copy2(SLEEP, home / "renamed")
    (tmp / "link").symlink_to(home / "renamed")      # spelled below /tmp, lies elsewhere
    cases = [([str(tmp / "x"), "5"], "tmp"), ([str(shm), "5"], "shm"),
             ([str(tmp / "link"), "5"], "")]
    for argv, where in cases:
        p = subprocess.Popen(argv)
        try:
            f = exec_of(probe, p)
        finally:
            p.kill()
            p.wait()
        assert (f["exe_location"], f["exe_sha256"], f["exe_sha256_state"]) == \
            (where, DIGEST, "ok"), argv
        assert f["exe_known"] and not f["exe_memfd"] and not f["exe_unlinked"]
    assert f["filename"] == str(tmp / "link") and f["exe_path"] == str(home / "renamed")


FILELESS = """
import os, sys
fd = os.memfd_create("payload", 0) if sys.argv[1] == "memfd" else \
    os.open(sys.argv[2], os.O_TMPFILE | os.O_RDWR, 0o700)
os.write(fd, open(sys.argv[3], "rb").read())
if sys.argv[1] == "tmpfile":       # no writer left: exec refuses a file open for writing
    ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    os.close(fd)
    fd = ro
os.execve(f"/proc/self/fd/{fd}", ["payload", "5"], {})
"""


@pytest.mark.parametrize("how", ["memfd", "tmpfile"])
def test_fileless_and_unlinked_executables(probe, places, how):
    home = Path("/var/lib") / f"swa-facts-{how}-{os.getpid()}"
    home.mkdir()
    places.append(home)
    p = subprocess.Popen([sys.executable, "-c", FILELESS, how, str(home), SLEEP])
    try:
        f = exec_of(probe, p, "payload")
    finally:
        p.kill()
        p.wait()
    assert f["exe_unlinked"] is True
    assert f["exe_location"] == ("memfd" if how == "memfd" else "deleted")
    assert f["exe_memfd"] is (how == "memfd")
    if how == "memfd":
        assert f["exe_fs"] == "tmpfs" and f["exe_path"] is None   # no path to glob
    assert f["exe_sha256"] == DIGEST


def test_the_map_off_keeps_ordinary_execs_in_the_kernel(probe, places):
    home = Path("/var/lib") / f"swa-facts-off-{os.getpid()}"
    home.mkdir()
    places.append(home)
    shutil.copy2(SLEEP, home / "plain")
    probe.set_exec_policy(ExecNeeds(every_exec=False, hash_exes=False))
    try:
        p = subprocess.Popen([str(home / "plain"), "0"])
        p.wait()
        seen = wait_for(probe, lambda e: e.kind == "proc.exec" and e.fields["pid"] == p.pid,
                        timeout_s=1.0)
        assert seen == []
    finally:
        probe.set_exec_policy(ExecNeeds(every_exec=True, hash_exes=True))
    p = subprocess.Popen([str(home / "plain"), "0"])
    p.wait()
    assert wait_for(probe, lambda e: e.kind == "proc.exec" and e.fields["pid"] == p.pid)


def test_writable_mode_sends_only_execs_of_files_where_a_workload_writes(probe, places):
    """EXEC_POLICY_WRITABLE (the writable location rule alone): /tmp, /dev/shm, a memfd
    reach user space, a program in /var/lib does not."""
    tmp = Path("/tmp") / f"swa-facts-w-{os.getpid()}"
    shm = Path("/dev/shm") / f"swa-facts-w-{os.getpid()}"
    home = Path("/var/lib") / f"swa-facts-w-{os.getpid()}"
    places += [tmp, shm, home]
    tmp.mkdir()
    home.mkdir()
    (tmp / "deep" / "er").mkdir(parents=True)
    for dest in (tmp / "deep" / "er" / "x", shm, home / "plain"):
        shutil.copy2(SLEEP, dest)
    probe.set_exec_policy(ExecNeeds(every_exec=True, hash_exes=False, writable_only=True))
    try:
        def reported(argv, argv0=None) -> bool:
            p = subprocess.Popen(argv)
            try:
                return bool(wait_for(probe, lambda e: e.kind == "proc.exec"
                                     and e.fields["pid"] == p.pid
                                     and "policy" in e.fields["reason"]
                                     and (argv0 is None or e.fields["argv"][:1] == [argv0]),
                                     timeout_s=2.0))
            finally:
                p.kill()
                p.wait()
        assert reported([str(tmp / "deep" / "er" / "x"), "5"])
        assert reported([str(shm), "5"])
        assert reported([sys.executable, "-c", FILELESS, "memfd", str(home), SLEEP], "payload")
        assert not reported([str(home / "plain"), "5"])
    finally:
        probe.set_exec_policy(ExecNeeds(every_exec=True, hash_exes=True))
