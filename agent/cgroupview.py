"""A process's cgroup v2 path as the host names it, whatever cgroup namespace the agent
runs in.

/proc/PID/cgroup is rendered relative to the READER's cgroup namespace. An agent in a
container of its own cgroup namespace (the Kubernetes DaemonSet: not privileged, so
containerd, CRI-O, Docker and Podman give it one on a cgroup v2 host) reads a job at
/kubepods.slice/pod-1/c1 as "/../../pod-1/c1": no grant, system cgroup or policy scope
would ever match it, and an exact comparison with such a path would act on anything.

So the namespace's root is located once, in the host's hierarchy (/sys/fs/cgroup, which
(or /sys/fs/cgroup/unified), which the DaemonSet mounts from the host): the cgroup there whose cgroup.procs lists this
process. Paths are then joined to it. Where it cannot be found (the mount is the
namespace's own, or the agent moved), a path that climbs out of the namespace ("/..")
has no host name: None, and callers treat the process as unresolved (never acted on).
"""
from __future__ import annotations

import os
import posixpath
import threading
from pathlib import Path

MAX_SCAN = 200_000        # cgroups looked through for the agent's own, once

_lock = threading.Lock()
_ns_root: str | None = None     # the agent's cgroup namespace root, host path ("/": none)
_found = False


def _read(pid: int | str, proc: str) -> str | None:
    try:
        for line in Path(f"{proc}/{pid}/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:].strip() or "/"
    except OSError:
        pass
    return None


def _lists(cgroup: Path, pid: int) -> bool:
    try:
        return str(pid) in (cgroup / "cgroup.procs").read_text().split()
    except OSError:
        return False


def cgroup2_mount() -> Path | None:
    """Where the unified (v2) hierarchy is mounted: /sys/fs/cgroup, or
    /sys/fs/cgroup/unified on hybrid hosts."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            return Path(left.split()[4])
    return None


PROC_CGROUP_INIT_INO = 0xEFFFFFFB   # the initial cgroup namespace (include/linux/proc_ns.h)


def _initial_namespace() -> bool | None:
    """Whether this process is in the host's (initial) cgroup namespace; None: unknown."""
    try:
        return os.stat("/proc/self/ns/cgroup").st_ino == PROC_CGROUP_INIT_INO
    except OSError:
        return None


def _locate(root: Path | None = None) -> str | None:
    """The host path of this process's cgroup namespace root; None if not found."""
    pid = os.getpid()
    own = _read("self", "/proc")
    root = root or cgroup2_mount()
    if own is None or root is None:
        return None
    initial = _initial_namespace()
    if _lists(root / own.lstrip("/"), pid):
        if initial is False and own in ("", "/"):
            # in a namespace of our own and this mount is rooted where we are: it is the
            # namespace's own mount, not the host's, and says nothing of where that is
            return None
        return "/"          # the paths we read are the host's (no namespace of our own)
    seen = 0
    for dirpath, dirnames, _ in os.walk(root):
        seen += 1
        if seen > MAX_SCAN:
            return None
        if _lists(Path(dirpath), pid):
            host = "/" + os.path.relpath(dirpath, root).removeprefix(".").lstrip("/")
            rel = own.rstrip("/")           # our path inside the namespace
            if rel in ("", "/"):
                return host
            return host[: -len(rel)] or "/" if host.endswith(rel) else None
        dirnames.sort()
    return None


def namespace_root() -> str | None:
    """Where this process's cgroup namespace is rooted in the host's hierarchy ("/": the
    host's own namespace), found once; None when it could not be found."""
    global _ns_root, _found
    with _lock:
        if not _found:
            _ns_root, _found = _locate(), True
        return _ns_root


def host_path(path: str | None) -> str | None:
    """A path read from /proc/PID/cgroup, as the host names it; None when unknown."""
    if path is None or not path.startswith("/"):
        return None
    root = namespace_root()
    if root is None:
        return None if path.startswith("/..") else path
    full = "/" + posixpath.normpath(posixpath.join(root, path.lstrip("/"))).lstrip("/")
    return None if full.startswith("/..") else full


def cgroup_of(pid: int | str, proc: str = "/proc") -> str | None:
    """The process's cgroup v2 path as the host names it ("0::" line of
    /proc/PID/cgroup); None when it is gone, has no v2 line, or cannot be named."""
    return host_path(_read(pid, proc))
