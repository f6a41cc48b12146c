"""One host, several agents: which agent owns the processes of which network namespace.

The model (README, "Running it"): an agent owns the processes of its own network
namespace; the agent in the host's initial namespace (the host agent) also owns those of
every namespace that has no live agent of its own. So a container's processes are the
host agent's until an agent runs in that container's namespace, and one event gets one
response.

Every agent registers its namespace in a directory shared by the host's agents
(`probes.process_owners`, root's only): a file named after the namespace's inode holding
the owner's pid and start time. The host agent's kernel filter skips the namespaces
registered by other live agents (map foreign_netns), and forgets an owner in the kernel
the moment it exits; a registration whose process is gone (or is another process with a
recycled pid) is stale: ignored, and replaced by the next agent of that namespace.
"""
from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path


class OwnerConflict(RuntimeError):
    """Another live agent already owns the processes of this network namespace."""


@dataclass(frozen=True, slots=True)
class Owner:
    pid: int
    start_ticks: int     # /proc/<pid>/stat field 22: tells a recycled pid apart

    def alive(self) -> bool:
        return process_start(self.pid) == self.start_ticks


def process_start(pid: int) -> int | None:
    """The start time of a running (not zombie) process, None when there is none."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()     # after "pid (comm) ": state is first
    if len(fields) < 20 or fields[0] in ("Z", "X", "x"):
        return None
    return int(fields[19])


def netns_inode(path: str = "/proc/thread-self/ns/net") -> int:
    return os.stat(path).st_ino


PF_KTHREAD = 0x00200000


def initial_netns_inode() -> int | None:
    """The host's initial network namespace: that of kernel threads (kthreadd is pid 2 in
    the host's pid namespace), else that of pid 1 (inside a pid namespace); None when
    neither can be read."""
    try:
        raw = Path("/proc/2/stat").read_text()
        if int(raw[raw.rfind(")") + 2:].split()[6]) & PF_KTHREAD:
            return netns_inode("/proc/2/ns/net")
    except (OSError, ValueError, IndexError):
        pass
    try:
        return netns_inode("/proc/1/ns/net")
    except OSError:
        return None


class Registry:
    """The shared directory of registrations; claim() and release() one's own, live()
    reads everyone's."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)

    def _checked_dir(self, create: bool) -> bool:
        """False when the directory does not exist (and create is False); raises when
        someone other than root could write registrations into it."""
        if create:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            st = os.lstat(self.dir)
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            raise RuntimeError(f"probes.process_owners {self.dir} must be a directory that only "
                               "root can write: anyone who can write there can hide a namespace")
        return True

    def _read(self, path: Path) -> Owner | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        with os.fdopen(fd) as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_uid not in (0, os.geteuid()):
                return None
            try:
                pid, start = (int(x) for x in f.read(64).split())
            except ValueError:
                return None
        return Owner(pid, start)

    def claim(self, netns: int, pid: int) -> None:
        """Register `pid` as the owner of `netns`; OwnerConflict when another live agent
        already is."""
        self._checked_dir(create=True)
        path, start = self.dir / str(netns), process_start(pid)
        for _ in range(3):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                owner = self._read(path)
                if owner is not None and owner.pid != pid and owner.alive():
                    raise OwnerConflict(
                        f"the processes of network namespace {netns} are already watched by "
                        f"the agent with pid {owner.pid}") from None
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)       # stale, or an earlier registration of ours
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{pid} {start}\n")
            return
        raise OwnerConflict(f"could not register network namespace {netns} in {self.dir}")

    def release(self, netns: int, pid: int) -> None:
        """Remove our registration of `netns` (not one another agent made since)."""
        path = self.dir / str(netns)
        owner = self._read(path)
        if owner is not None and owner.pid == pid:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def live(self) -> dict[int, Owner]:
        """netns inode -> its live owner. Stale registrations are skipped, not removed:
        removing races with an agent that replaces one (claim() does that)."""
        if not self._checked_dir(create=False):
            return {}
        out = {}
        for entry in os.scandir(self.dir):
            if not entry.name.isdigit():
                continue
            owner = self._read(Path(entry.path))
            if owner is not None and owner.alive():
                out[int(entry.name)] = owner
        return out
