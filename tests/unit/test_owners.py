"""Registrations of the host's agents (agent.sources.owners): who owns which network
namespace's processes, with real processes for live, dead and zombie owners."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from agent.sources.owners import Owner, OwnerConflict, Registry, process_start


def sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])


def test_a_live_owner_keeps_its_namespace_and_a_dead_one_is_replaced(tmp_path):
    reg, other = Registry(tmp_path / "owners"), sleeper()
    try:
        reg.claim(1111, other.pid)
        assert (tmp_path / "owners").stat().st_mode & 0o777 == 0o700
        with pytest.raises(OwnerConflict, match=f"already watched by the agent with pid {other.pid}"):
            reg.claim(1111, os.getpid())
        assert reg.live() == {1111: Owner(other.pid, process_start(other.pid))}
        other.kill()
        other.wait()
        assert reg.live() == {}                       # stale: skipped
        reg.claim(1111, os.getpid())                  # and replaced
        assert set(reg.live()) == {1111}
        reg.release(1111, other.pid)                  # not its registration any more
        assert set(reg.live()) == {1111}
        reg.release(1111, os.getpid())
        assert reg.live() == {}
    finally:
        other.kill()
        other.wait()


def test_a_zombie_or_a_recycled_pid_is_not_an_owner(tmp_path):
    child = sleeper()
    try:
        owner = Owner(child.pid, process_start(child.pid))
        assert owner.alive() and not Owner(child.pid, owner.start_ticks + 1).alive()
        child.kill()
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)   # exited, not reaped
        assert not owner.alive()
    finally:
        child.kill()
        child.wait()


def test_a_directory_others_can_write_is_refused(tmp_path):
    d = tmp_path / "owners"
    d.mkdir(mode=0o777)
    os.chmod(d, 0o777)
    with pytest.raises(RuntimeError, match="only root can write"):
        Registry(d).live()
    with pytest.raises(RuntimeError, match="only root can write"):
        Registry(d).claim(1, os.getpid())

