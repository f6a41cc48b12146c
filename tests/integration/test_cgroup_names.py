"""cgroup id -> path (agent.sources.cgroups.CgroupNames) for a process that is already gone.

The flaky exec policy test (a denied shell that forks and exits at once): a loaded agent
read the shell's exec after the shell had exited, so /proc could not name its cgroup, and
the tree had been walked less than RESCAN_S before, so the fresh cgroup was unknown: the
event had no cgroup, nothing was judged in it, the fork lived. The id is now opened by
handle (open_by_handle_at, FILEID_KERNFS) instead: real cgroups, a real exited process."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from agent.sources.cgroups import CgroupNames
from swarmlab.breachlab import throwaway_cgroup

pytestmark = pytest.mark.privileged


def _exited_in(cg) -> int:
    """The pid of a process that ran in `cg` and has exited (reaped)."""
    p = subprocess.Popen(["/bin/true"], preexec_fn=lambda: (cg / "cgroup.procs").write_text(
        str(os.getpid())))
    p.wait(10)
    return p.pid


def test_a_fresh_cgroup_of_an_exited_process_is_named_without_a_walk():
    names = CgroupNames()
    names.path(1)                          # a walk now: the next is RESCAN_S away
    with throwaway_cgroup("swa-cgnames") as cg:
        pid = _exited_in(cg)
        cgroup_id = os.stat(cg).st_ino
        assert names.path(cgroup_id, pid) == "/" + cg.name


def test_a_removed_cgroup_and_an_unknown_id_stay_unnamed():
    names = CgroupNames()
    with throwaway_cgroup("swa-cgnames") as cg:
        cgroup_id = os.stat(cg).st_ino
    names.path(1)
    assert names.path(cgroup_id) is None            # removed: ESTALE, no stale name
    assert names.path(2**62 + 12345) is None


def test_without_the_capability_it_falls_back_to_the_walk():
    """A cgroup the handle cannot open (the call refused: no CAP_DAC_READ_SEARCH) is
    named by the next walk, as before."""
    names = CgroupNames()
    names._handle_off = True
    names.path(1)
    with throwaway_cgroup("swa-cgnames") as cg:
        pid = _exited_in(cg)
        cgroup_id = os.stat(cg).st_ino
        assert names.path(cgroup_id, pid) is None       # the walk is rate-limited
        names._scanned_at = 0.0
        assert names.path(cgroup_id, pid) == "/" + cg.name


def test_a_denied_shell_read_late_still_has_its_fork_killed(lab, tmp_path):
    """The flaky test's situation made certain: the agent reads the denied shell's exec
    only after the shell forked and exited (the agent is stopped meanwhile, as a loaded
    one is late), and less than RESCAN_S after a walk of the cgroup tree (one made for a
    process of another fresh cgroup read late too). Without the open by handle the exec
    has no cgroup and the fork lives."""
    from tests.integration.test_exec_policy import SH, run, start_agent, stop_all, wait_for

    home = Path("/var/lib") / f"swa-cgnames-{os.getpid()}"
    home.mkdir()
    shell = home / "evil-sh"
    shutil.copy2(os.path.realpath(SH), shell)
    agent = start_agent(lab, tmp_path, f"  exec_denied_paths: [\"{shell}\"]\n")
    p = None
    with throwaway_cgroup("swa-cgnames") as outer:
        try:
            with _stopped(agent.pid):
                run(lab, outer / "before", "/bin/true").wait(10)
            time.sleep(0.2)                  # the agent reads it: a walk, now
            with _stopped(agent.pid):
                p = run(lab, outer / "forker", str(shell), "-c",
                        "(while :; do :; done) & exit 0")
                assert p.wait(10) == 0
            wait_for(lambda: not (outer / "forker" / "cgroup.procs").read_text().split(), 10)
        finally:
            stop_all(p)
            agent.stop()
            shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def _stopped(pid: int):
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
