"""cgroup id -> path (agent.sources.cgroups.CgroupNames) for a process that is already gone.

The flaky exec policy test (a denied shell that forks and exits at once): a loaded agent
read the shell's exec after the shell had exited, so /proc could not name its cgroup, and
the tree had been walked less than RESCAN_S before, so the fresh cgroup was unknown: the
event had no cgroup, nothing was judged in it, the fork lived. The id is now opened by
handle (open_by_handle_at, FILEID_KERNFS) instead: real cgroups, a real exited process."""
from __future__ import annotations

import os
import subprocess

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
