"""KILL_PROCESS: ending an unprivileged actor's processes (agent.respond.authority), when its
breach cannot be answered on a cgroup of its own.

Target: the acting pid ("1234"); params {"uid": N}, the actor's real uid, and optionally
{"ppid": P}, its parent when it acted. What is killed: the members of that process's POSIX
session (setsid: a login shell and what it started, a daemonised attack and its children)
whose real uid is N; when the actor has already exited (`sh -c 'cat x >> /etc/passwd'` is
done in milliseconds), those of its parent's session, if the parent runs as N. Never
another user's process (a root `sudo` in the same session, the sshd above it), never PID 1
or the agent itself, never uid 0 (root's breach is answered with isolation instead).

Races, which the attacker controls the timing of: the acting process may have exited and
its pid been reused by the time the agent acts. Each candidate is pinned with a pidfd
first and its uid and session read again afterwards, so a signal goes only to a process
that matched while pinned; a reused pid of another user is refused ("belongs to uid M").
First every process group of the session is stopped at once (kill(-pgid, SIGSTOP): the
kernel gives a group signal to a child forked meanwhile too, so pid hopping by
fork-and-exit stops), then the members of the actor's uid are killed, one pidfd each,
sweeping until a scan finds nobody; other uids' processes stopped with their group (a
setuid program, root's sudo in the user's job) are continued. A process that left the session
(setsid, before the kill) is out of its reach: the incident is escalated for a human.

A policy rule's kill (policy.gpu_unauthorized: params {"start_ticks": T, "cgroup": C}) is
exact: only that process, pinned with a pidfd and then checked to still be the process the
evidence named (its start time T, field 22 of /proc/PID/stat) in the workload it was
judged in (cgroup C); a reused pid or a process that moved cgroups is refused, nothing is
signalled. An exec policy kill (params also {"exe_id": "maj:min:ino"}) then sweeps the
denied program's forks: the processes of cgroup C running that inode, started no earlier
(_sweep_forks). Its uid may be 0 (a container's root is a tenant; the host's own GPU services
are never judged violations: agent.gpugrant). NVML reports the host's pids: an agent
outside the host's pid namespace refuses (its /proc would name other processes).

A kill cannot be undone: lift does nothing, reconcile does nothing (re-killing a pid after
a restart could hit an innocent reuse), and applying the same mitigation again (a renewal)
does not signal twice.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Sequence

from agent import cgroupview
from agent.enforce.base import (Drift, EnforceError, InvalidTarget, TargetNotFound,
                                UnsupportedMitigation)
from agent.model import Mitigation, MitigationKind

PROC = Path("/proc")
SWEEP_ROUNDS = 20          # kill sweeps over a session, until one finds nobody
SWEEP_CONFIRM_S = 0.01     # the pause before the exec kill's sweep confirms an empty cgroup


class ProcessError(EnforceError):
    """A kill was refused (another user's process, root, the agent); nothing was signalled."""


def parse_pid(target: str) -> int:
    text = target.strip()
    if not text.isdigit() or len(text) > 10:
        raise InvalidTarget(f"not a process id: {target!r}")
    return int(text)


def identity(pid: int) -> tuple[int, int]:
    """(real uid, session id) of `pid`; TargetNotFound when it is gone."""
    try:
        status = (PROC / str(pid) / "status").read_text()
        stat = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        raise TargetNotFound(f"process {pid} has exited") from None
    uid = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("Uid:"))
    # comm (field 2) may hold spaces and parentheses: the fields after it follow the last ')'.
    rest = stat.rsplit(")", 1)[1].split()
    return uid, int(rest[3])                  # state ppid pgrp session ...


def start_ticks(pid: int) -> int | None:
    """When the process now holding `pid` started (field 22 of /proc/PID/stat)."""
    try:
        rest = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(rest[19]) if len(rest) > 19 else None


def cgroup_of(pid: int) -> str | None:
    """The process's cgroup v2 path as the host names it, None when it is gone."""
    return cgroupview.cgroup_of(pid, str(PROC))


def _cgroup_procs(cgroup: str) -> list[int]:
    """The processes of cgroup v2 `cgroup` (its cgroup.procs), none when unreadable."""
    if not cgroup.startswith("/") or "/../" in cgroup + "/":
        return []
    root = cgroupview.cgroup2_mount()      # the host's hierarchy (host paths join it)
    if root is None:
        return []
    try:
        text = (root / cgroup.lstrip("/") / "cgroup.procs").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split() if x.isdigit()]


def _runs(pid: int, ino: int, st_dev: int | None, since: int, uid: int | None) -> bool:
    """Whether `pid` runs the executable inode `ino` on device `st_dev` (as stat() gives
    it; None: any), started at `since` or later, as real uid `uid` (None: any)."""
    try:
        st = os.stat(PROC / str(pid) / "exe")
    except OSError:
        return False
    if st.st_ino != ino or (st_dev is not None and st.st_dev != st_dev):
        return False
    start = start_ticks(pid)
    if start is None or start < since:
        return False
    if uid is not None:
        try:
            return identity(pid)[0] == uid
        except (TargetNotFound, StopIteration, ValueError):
            return False
    return True


PROC_PID_INIT_INO = 0xEFFFFFFC      # the initial pid namespace's inode (include/linux/proc_ns.h)


def host_pid_namespace() -> bool:
    """Whether the agent sees the host's pids: its pid namespace is the initial one (by
    its fixed inode number, whichever procfs is mounted), else NSpid has one level."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino == PROC_PID_INIT_INO
    except OSError:
        pass
    try:
        for line in (PROC / "self" / "status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return len(line.split()) == 2
    except OSError:
        return False
    return True             # a kernel without NSpid (< 4.1) has no nested pid namespaces


def _stop_then_kill(fds: list[int]) -> None:
    """SIGSTOP every pinned process first (a stopped process forks no more), then SIGKILL
    them; one already gone is passed over."""
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for fd in fds:
            try:
                signal.pidfd_send_signal(fd, sig)
            except ProcessLookupError:
                pass


def _pin(pid: int) -> int | None:
    """A pidfd on `pid` (None when it is gone): signals through it reach this process only."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def _uid_param(params: dict[str, Any]) -> int:
    uid = params.get("uid")
    if isinstance(uid, bool) or not isinstance(uid, int) or uid < 0:
        raise InvalidTarget("kill_process needs the actor's uid (params {\"uid\": N})")
    if uid == 0:
        raise ProcessError("refusing to kill root's processes: root's breach is answered "
                           "with isolation")
    return uid


class ProcessEnforcer:
    """The Enforcer (agent.enforce.base) for KILL_PROCESS."""

    def __init__(self, protect: Sequence[int] = ()):
        self._protect = {1, os.getpid(), *protect}
        self._own_cgroup = cgroup_of(os.getpid())      # an exec kill never reaches into it
        self._done: set[str] = set()            # mitigation ids already carried out

    def check(self, target: str, params: dict[str, Any]) -> str:
        """The normalised pid; raises InvalidTarget, TargetNotFound or ProcessError."""
        if "start_ticks" in params:
            pid = parse_pid(target)
            try:
                fd = self._pin_exact(pid, params)
            except TargetNotFound:
                if isinstance(params.get("exe_id"), str) and params.get("sweep", True):
                    return str(pid)      # gone: apply still sweeps its forks
                raise
            os.close(fd)
            return str(pid)
        self._lead(parse_pid(target), _uid_param(params), params)
        return str(parse_pid(target))

    def _lead(self, pid: int, uid: int, params: dict[str, Any]) -> int:
        """The process whose session is killed: `pid`, or its parent (params "ppid") when
        `pid` has exited; checked as the actor's (uid) and not protected."""
        ppid = params.get("ppid")
        if isinstance(ppid, bool) or not isinstance(ppid, int) or ppid <= 1:
            ppid = None
        for p in (pid,) if ppid is None else (pid, ppid):
            if p in self._protect:
                raise ProcessError(f"refusing to kill process {p}: PID 1 or the agent itself")
            try:
                owner, _ = identity(p)
            except TargetNotFound:
                continue
            if owner != uid:
                raise ProcessError(f"process {p} belongs to uid {owner}, not the actor's uid "
                                   f"{uid} (its pid was reused?): nothing killed")
            return p
        raise TargetNotFound(f"process {pid} has exited" + (
            "" if ppid is None else f", and so has its parent {ppid}"))

    def members(self, sid: int, uid: int) -> list[int]:
        """The processes of session `sid` running as `uid` (PID 1 and the agent excepted)."""
        out = []
        for d in PROC.iterdir():
            if not d.name.isdigit() or int(d.name) in self._protect:
                continue
            try:
                if identity(int(d.name)) == (uid, sid):
                    out.append(int(d.name))
            except (TargetNotFound, StopIteration, IndexError, ValueError, OSError):
                continue
        return out

    def _stop_groups(self, sid: int) -> set[int]:
        """SIGSTOP every process group of session `sid` at once (kill(-pgid)): the kernel
        delivers a group signal to a child forked meanwhile too, so a process hopping
        pids by fork-and-exit is stopped wherever it is. Never a group holding PID 1 or
        the agent. Returns the groups stopped."""
        groups, holds_protected = set(), set()
        for d in PROC.iterdir():
            if not d.name.isdigit():
                continue
            try:
                rest = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if len(rest) > 3 and int(rest[3]) == sid:
                groups.add(int(rest[2]))
            if int(d.name) in self._protect and len(rest) > 2:
                holds_protected.add(int(rest[2]))
        groups -= holds_protected | {os.getpgid(0)}
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGSTOP)
            except (ProcessLookupError, PermissionError):
                pass
        return groups

    def _resume_others(self, groups: set[int], uid: int) -> None:
        """SIGCONT what _stop_groups stopped that is not the actor's (another uid's process
        in its job: a setuid program, root's sudo)."""
        for d in PROC.iterdir():
            if not d.name.isdigit():
                continue
            try:
                rest = (d / "stat").read_text().rsplit(")", 1)[1].split()
                if int(rest[2]) in groups and identity(int(d.name))[0] != uid:
                    os.kill(int(d.name), signal.SIGCONT)
            except (OSError, IndexError, ValueError, StopIteration, TargetNotFound):
                continue

    def _sweep(self, sid: int, uid: int, pinned: list[int], lead_pid: int) -> None:
        """Stop, then kill, the session's members of `uid`, again and again until a scan
        finds none (SWEEP_ROUNDS at most): a member that forked between a scan and its
        SIGSTOP (pid hopping: fork, parent exits, child forks...) leaves a child the next
        scan finds, and a stopped process forks no more."""
        for _ in range(SWEEP_ROUNDS):
            fresh: list[int] = []
            for p in self.members(sid, uid):
                if p != lead_pid and (fd := _pin(p)) is not None:
                    try:
                        same = identity(p) == (uid, sid)
                    except (TargetNotFound, StopIteration, IndexError, ValueError, OSError):
                        same = False
                    if same:
                        fresh.append(fd)
                    else:
                        os.close(fd)
            try:
                _stop_then_kill(pinned + fresh)
            finally:
                for fd in fresh:
                    os.close(fd)
            if not fresh and not pinned:
                return
            pinned, lead_pid = [], -1

    def _pin_exact(self, pid: int, params: dict[str, Any]) -> int:
        """A pidfd on `pid`, once it is checked to be the process params name (start
        time, cgroup); the caller closes it. Raises TargetNotFound or ProcessError."""
        start, cgroup = params.get("start_ticks"), params.get("cgroup")
        if isinstance(start, bool) or not isinstance(start, int) or not isinstance(cgroup, str):
            raise InvalidTarget("an exact kill needs params start_ticks (int) and cgroup")
        if pid in self._protect:
            raise ProcessError(f"refusing to kill process {pid}: PID 1 or the agent itself")
        if "exe_id" in params and cgroup == self._own_cgroup:
            raise ProcessError(f"refusing to kill process {pid}: it runs in the agent's own "
                               f"cgroup {cgroup}")
        if not host_pid_namespace():
            raise ProcessError("the agent is not in the host's pid namespace, where NVML's "
                               "process ids are: nothing killed")
        fd = _pin(pid)
        if fd is None:
            raise TargetNotFound(f"process {pid} has exited")
        # Read after pinning: if the pid named the judged process when pinned, these reads
        # show it; if it had been reused, they show another start time.
        if start_ticks(pid) != start:
            os.close(fd)
            raise TargetNotFound(f"process {pid} has exited (the pid now names another "
                                 "process): nothing killed")
        now_in = cgroup_of(pid)
        if now_in != cgroup:
            os.close(fd)
            raise ProcessError(f"process {pid} moved from cgroup {cgroup} to {now_in} since "
                               "it was judged: nothing killed (judged again where it is)")
        return fd

    def _sweep_forks(self, params: dict[str, Any]) -> int:
        """An exec policy kill: the denied program may have forked before the SIGKILL
        landed (a fork stays in its cgroup and runs the same inode). Stop, then kill,
        every process of the cgroup running that inode that started no earlier than it,
        each pinned with a pidfd and checked again after pinning, round after round until
        one finds none (a stopped process forks no more). Returns how many were killed.
        What identifies them is the kernel's (inode, cgroup, start time), nothing the
        program says; a fork that exec'd another program is judged by its own exec."""
        ino = int(params["exe_id"].rsplit(":", 1)[1])
        st_dev = params.get("exe_st_dev") if isinstance(params.get("exe_st_dev"), int) else None
        uid = params.get("uid") if isinstance(params.get("uid"), int) else None
        cgroup, killed = params["cgroup"], 0
        since = max(params["start_ticks"], params.get("since_ticks") or 0)
        if cgroup == self._own_cgroup:
            return 0
        confirmed = False
        for _ in range(SWEEP_ROUNDS):
            fds = []
            for pid in _cgroup_procs(cgroup):
                if pid in self._protect or not _runs(pid, ino, st_dev, since, uid):
                    continue
                if (fd := _pin(pid)) is None:
                    continue
                if _runs(pid, ino, st_dev, since, uid) and cgroup_of(pid) == cgroup:
                    fds.append(fd)
                else:
                    os.close(fd)
            try:
                _stop_then_kill(fds)
            finally:
                for fd in fds:
                    os.close(fd)
            killed += len(fds)
            if not fds:
                if confirmed:
                    break
                # a fork the kill met half-way through clone() shows up a moment later:
                # one more look before calling the cgroup clean
                confirmed = True
                time.sleep(SWEEP_CONFIRM_S)
            else:
                confirmed = False
        return killed

    def setup(self, desired: Sequence[Mitigation], now: float) -> None:
        return None

    def apply(self, m: Mitigation, now: float) -> None:
        if m.kind is not MitigationKind.KILL_PROCESS:
            raise UnsupportedMitigation(f"the process enforcer does not enforce {m.kind.value}")
        if m.id in self._done:
            return
        if "start_ticks" in m.params:
            # the fork sweep, unless the violation was the file an interpreter or the
            # loader runs (a script): its inode is the interpreter's, shared with every
            # other shell of the workload, so only the process itself is killed
            exec_kill = isinstance(m.params.get("exe_id"), str) and m.params.get("sweep", True)
            try:
                fd = self._pin_exact(parse_pid(m.target), m.params)
            except TargetNotFound:
                # The denied program exited before the kill (fork and exit: a daemon):
                # its forks are found by inode, cgroup and start time all the same.
                if not exec_kill or not self._sweep_forks(m.params):
                    raise
                self._done.add(m.id)
                return
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except ProcessLookupError:
                pass             # it exited meanwhile: the same end
            finally:
                os.close(fd)
            if exec_kill:
                self._sweep_forks(m.params)
            self._done.add(m.id)
            return
        uid = _uid_param(m.params)
        pid = self._lead(parse_pid(m.target), uid, m.params)
        lead = _pin(pid)
        if lead is None:
            raise TargetNotFound(f"process {pid} has exited")
        try:
            owner, sid = identity(pid)        # read again now that the pid is pinned
            if owner != uid:
                raise ProcessError(f"process {pid} belongs to uid {owner}, not the actor's "
                                   f"uid {uid} (its pid was reused?): nothing killed")
            stopped = self._stop_groups(sid)
            try:
                self._sweep(sid, uid, [lead], pid)
            finally:
                self._resume_others(stopped, uid)
        finally:
            os.close(lead)
        self._done.add(m.id)

    def lift(self, m: Mitigation) -> None:
        return None         # a killed process stays dead

    def reconcile(self, desired: Sequence[Mitigation], now: float) -> Drift:
        return Drift()

    def remove(self) -> None:
        return None

    def is_allowlisted(self, target: str) -> bool:
        """PID 1 and the agent are never killed."""
        try:
            return parse_pid(target) in self._protect
        except InvalidTarget:
            return False
