"""The freezer's stand-in: stopping a cgroup's processes with SIGSTOP, for a cgroup whose
cgroup.freeze the agent may not write.

Why it is needed: a cgroup delegated to a user (systemd's user@UID.service subtree, rootless
podman or docker, a service with Delegate= and User=) has cgroup.freeze owned by that user,
mode 0644, and the unit's root holds no CAP_DAC_OVERRIDE (packaging/README.md says why).
CAP_KILL lets it signal any process, so it stops the cgroup's processes instead.

Why it is a sound substitute there: SIGSTOP cannot be caught, blocked or ignored, and it
stops every thread of a process, as the freezer does; a stopped process forks no more, so
sweeping the subtree until a sweep finds nobody new stops a fork storm too (the freezer does
that in one write). What the freezer has that SIGSTOP lacks: a resumption its owner cannot
do. Not here: the owner of a delegated cgroup can write 0 to its cgroup.freeze as easily as
it can SIGCONT its own processes (from any process of its uid outside the cgroup), so in
both cases the agent's answer is the same: reconcile finds the processes running again and
stops them again, and says so in the incident (agent.enforce.cgroup).

Races, which the tenant controls: a pid read from cgroup.procs may exit and be reused before
the signal. Each process is pinned with a pidfd and checked again while pinned (the same
start time, still inside the cgroup) before it is signalled, so a reused pid of somebody
else is never stopped or continued. A process is named by (pid, start time): its identity.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from agent import cgroupview

PROC = Path("/proc")
SWEEPS = 20          # sweeps of the subtree, until one finds no new process
SETTLE_S = 1.0       # how long a signalled process may take to show it is stopped

Ident = tuple[int, int]          # (pid, start time in clock ticks)


@dataclass
class Stopped:
    """What one stop() did: `stopped` the processes it signalled (or found stopped by it
    before), `holdouts` the pids still running after SETTLE_S (uninterruptible sleep, a
    tracer holding them, or the owner continuing them as fast as they are stopped)."""

    stopped: set[Ident] = field(default_factory=set)
    fresh: set[Ident] = field(default_factory=set)     # signalled now, running before
    holdouts: list[int] = field(default_factory=list)


def stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time) of `pid`; None when it is gone."""
    try:
        rest = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        return rest[0], int(rest[19])
    except (OSError, IndexError, ValueError):
        return None


def cgroup_of(pid: int) -> str | None:
    """The cgroup v2 path of `pid` as the host names it; None when it is gone."""
    return cgroupview.cgroup_of(pid, str(PROC))


def inside(path: str, cgroup: str | None) -> bool:
    return cgroup is not None and (cgroup == path or cgroup.startswith(path + "/"))


def members(fs_path: Path) -> list[int]:
    """Every process in the cgroup at `fs_path` and in the cgroups below it."""
    out: list[int] = []
    for d, _, _ in os.walk(fs_path):
        try:
            out += [int(p) for p in (Path(d) / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            continue
    return out


def identity(pid: int) -> Ident | None:
    st = stat(pid)
    return None if st is None else (pid, st[1])


def send(ident: Ident, sig: int, within: str | None = None) -> bool:
    """Signal the process `ident` (pinned by a pidfd, its start time and, with `within`,
    its cgroup checked while pinned); whether it was signalled."""
    pid, start = ident
    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return False
    try:
        st = stat(pid)
        if st is None or st[1] != start or (within is not None
                                            and not inside(within, cgroup_of(pid))):
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


def running(fs_path: Path, protect: Iterable[int]) -> list[int]:
    """The cgroup's processes that are neither stopped nor dead."""
    skip = set(protect)
    return [p for p in members(fs_path) if p not in skip
            and (st := stat(p)) is not None and st[0] not in "TtZX"]


def stop(path: str, fs_path: Path, protect: Iterable[int],
         known: set[Ident] | None = None) -> Stopped:
    """SIGSTOP every process of the cgroup `path` (its subtree included), sweeping until a
    sweep finds no process not yet signalled, then waiting up to SETTLE_S for all of them
    to show as stopped (a process that runs again is signalled again). `known`: processes
    stopped by an earlier call (kept in `stopped`); `fresh` holds every process that was
    running and is signalled now."""
    skip = {1, os.getpid(), *protect}
    out = Stopped(stopped=set(known or ()))
    for _ in range(SWEEPS):
        new = 0
        for pid in members(fs_path):
            st = stat(pid) if pid not in skip else None
            if st is None or st[0] in "TtZX":
                if st is not None and st[0] in "Tt":
                    out.stopped.add((pid, st[1]))
                continue
            ident = (pid, st[1])
            if send(ident, signal.SIGSTOP, within=path):
                new += ident not in out.fresh
                out.fresh.add(ident)
                out.stopped.add(ident)
        if not new:
            break
    deadline = time.monotonic() + SETTLE_S
    while (late := running(fs_path, skip)) and time.monotonic() < deadline:
        for pid in late:
            if (ident := identity(pid)) is not None and send(ident, signal.SIGSTOP, path):
                out.fresh.add(ident)
                out.stopped.add(ident)
        time.sleep(0.01)
    out.holdouts = late
    return out


def resume(idents: Iterable[Ident]) -> int:
    """SIGCONT the processes `idents` that still are who they were (wherever they are now);
    how many were continued."""
    return sum(send(i, signal.SIGCONT) for i in idents)


def escaped(path: str, idents: Iterable[Ident]) -> list[tuple[Ident, str]]:
    """The processes of `idents` still alive (same start time) but outside cgroup `path`,
    with the cgroup each is in now."""
    out = []
    for ident in idents:
        if identity(ident[0]) != ident:
            continue
        where = cgroup_of(ident[0])
        if where is not None and not inside(path, where):
            out.append((ident, where))
    return out
