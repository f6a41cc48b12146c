"""Who a process on a GPU is, from /proc: the pid NVML reports -> its cgroup v2 path,
container id, real and effective uid, executable, comm, start time, network namespace
(its owning agent, agent.sources.owners) and the GPU device files it holds open. Standard library only (the GPU source runs standalone, `python3 -m
agent.sources.gpu`, on machines without the agent's dependencies).

What an attacker controls: comm and argv (display only here, never identity); nothing
else in this record is the process's to set. A pid NVML listed may have exited and its
number been reused between NVML's answer and these reads: `start_ticks` (the kernel's
start time of the process now holding the pid, read first and checked again last) names
the process the record describes, and `gpu_device_fds` (open files that are NVIDIA
character devices, major 195, or /dev/nvidia*) says whether that process holds a GPU at
all. A record whose pid is gone says so (`resolved` False) and carries no identity.
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from agent import cgroupview

NVIDIA_MAJOR = 195        # /dev/nvidia0.. and /dev/nvidiactl (nvidia-uvm's is dynamic)
MAX_FDS = 4096            # open files looked at per process (a GPU job holds tens)
# Container runtimes' cgroup names: docker-<id>.scope, /docker/<id>, cri-containerd-<id>,
# crio-<id>, libpod-<id>, /kubepods/.../<id>: a 64-hex-digit id in the last components.
_CONTAINER_RE = re.compile(r"(?:^|[/-])([0-9a-f]{64})(?:\.scope)?$")


def cgroup_of(pid: int, proc: str = "/proc") -> str | None:
    """The process's cgroup v2 path as the host names it ("0::" line), None when gone,
    v1 only, or outside the agent's cgroup namespace where it cannot be named."""
    return cgroupview.cgroup_of(pid, proc)


def container_of(cgroup: str | None) -> str | None:
    """The container id in a cgroup path, None outside a container: the outermost
    component that names one (the host's runtime made it; below it, a container with a
    delegated subtree names its own cgroups, maybe after another container)."""
    if not cgroup:
        return None
    for part in cgroup.split("/"):
        m = _CONTAINER_RE.search(part)
        if m:
            return m.group(1)
    return None


def start_ticks(pid: int, proc: str = "/proc") -> int | None:
    """Field 22 of /proc/PID/stat: when the process started (clock ticks after boot)."""
    try:
        stat_line = Path(f"{proc}/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may hold spaces and parentheses: the fields after it start at the last ")".
    rest = stat_line.rpartition(")")[2].split()
    return int(rest[19]) if len(rest) > 19 else None


def _ids(pid: int, proc: str) -> tuple[int | None, int | None, str | None]:
    uid = euid = comm = None
    try:
        for line in Path(f"{proc}/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                parts = line.split()
                uid, euid = int(parts[1]), int(parts[2])
            elif line.startswith("Name:"):
                comm = line.partition(":")[2].strip()
    except (OSError, ValueError, IndexError):
        pass
    return uid, euid, comm


def gpu_device_fds(pid: int, proc: str = "/proc") -> int:
    """How many of the process's open files are NVIDIA GPU devices."""
    n = 0
    try:
        with os.scandir(f"{proc}/{pid}/fd") as it:
            for i, entry in enumerate(it):
                if i >= MAX_FDS:
                    break
                try:
                    st = os.stat(entry.path)
                    if stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev) == NVIDIA_MAJOR or
                                                     os.readlink(entry.path).startswith("/dev/nvidia")):
                        n += 1
                except OSError:
                    continue
    except OSError:
        pass
    return n


def identify(pid: int, proc: str = "/proc") -> dict:
    """The identity fields of `pid` (module docstring); `resolved` False when the
    process is gone or changed while it was read."""
    before = start_ticks(pid, proc)
    if before is None:
        return {"pid": pid, "resolved": False}
    cgroup = cgroup_of(pid, proc)
    uid, euid, comm = _ids(pid, proc)
    try:
        exe = os.readlink(f"{proc}/{pid}/exe")
    except OSError:
        exe = None        # a kernel thread, or no permission
    fds = gpu_device_fds(pid, proc)
    try:   # which agent owns the process (agent.sources.owners): its network namespace
        netns = os.stat(f"{proc}/{pid}/ns/net").st_ino
    except OSError:
        netns = None
    if start_ticks(pid, proc) != before:
        return {"pid": pid, "resolved": False}
    return {"pid": pid, "resolved": True, "start_ticks": before, "cgroup": cgroup,
            "container_id": container_of(cgroup), "uid": uid, "euid": euid, "exe": exe,
            "comm": comm, "gpu_device_fds": fds, "netns": netns}
