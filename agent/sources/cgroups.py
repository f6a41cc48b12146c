"""Names for what the kernel reports by number: cgroup v2 ids -> paths, and a process's
ancestry (comms up to pid 1) from /proc. Both are best effort and cheap: a process or a
cgroup that is already gone gives None or a shorter list, never an error."""
from __future__ import annotations

import ctypes
import errno
import os
import struct
import time
from pathlib import Path

from agent import cgroupview
from agent.cgroupview import cgroup2_mount  # noqa: F401 (used here and re-exported)

RESCAN_S = 1.0          # at most one walk of the cgroup tree per second
MAX_ANCESTORS = 16
class CgroupNames:
    """cgroup id (bpf_get_current_cgroup_id: the cgroup directory's inode) -> path
    relative to the v2 root ("/system.slice/nginx.service"), cached."""

    def __init__(self, root: Path | None = None):
        self.root = root or cgroup2_mount()
        self._paths: dict[int, str] = {}
        self._scanned_at = 0.0
        self._handle_off = False        # open_by_handle_at refused (no CAP_DAC_READ_SEARCH)

    def path(self, cgroup_id: int, pid: int | None = None) -> str | None:
        if self.root is None or not cgroup_id:
            return None
        hit = self._paths.get(cgroup_id)
        if hit is not None:
            return hit
        if pid and self._from_proc(cgroup_id, pid):
            return self._paths[cgroup_id]
        # The process may be gone already (`sh -c 'x & exit 0'` exits in a millisecond,
        # before a loaded agent reads its exec) and a walk ran less than RESCAN_S ago:
        # the cgroup is opened by its id instead, one syscall, no walk.
        if self._by_handle(cgroup_id):
            return self._paths[cgroup_id]
        if time.monotonic() - self._scanned_at >= RESCAN_S:
            self._scan()
        return self._paths.get(cgroup_id)

    def _from_proc(self, cgroup_id: int, pid: int) -> bool:
        # The process's own view, checked by inode: it may have moved since the event.
        try:
            rel = cgroupview.cgroup_of(pid)
            if rel is not None and os.stat(self.root / rel.lstrip("/")).st_ino == cgroup_id:
                self._paths[cgroup_id] = rel
                return True
        except OSError:
            pass
        return False

    def _by_handle(self, cgroup_id: int) -> bool:
        """The path of cgroup `cgroup_id` by open_by_handle_at (a cgroup2 file handle is
        its 64-bit id: FILEID_KERNFS), checked by inode on the opened directory. Needs
        CAP_DAC_READ_SEARCH; False without it, for a removed cgroup, or off the root."""
        if self._handle_off:
            return False
        try:
            mount_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fd = _open_by_handle(mount_fd, cgroup_id)
        finally:
            os.close(mount_fd)
        if fd is None:
            return False
        if fd < 0:                              # EPERM, ENOSYS: not here, stop asking
            self._handle_off = True
            return False
        try:
            if os.fstat(fd).st_ino != cgroup_id:
                return False
            full = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return False
        finally:
            os.close(fd)
        root = str(self.root).rstrip("/")
        if full.endswith(" (deleted)") or not (full == root or full.startswith(root + "/")):
            return False
        self._paths[cgroup_id] = full[len(root):] or "/"
        return True

    def _scan(self) -> None:
        self._scanned_at = time.monotonic()
        for dirpath, _dirs, _files in os.walk(self.root):
            try:
                ino = os.stat(dirpath).st_ino
            except OSError:
                continue
            rel = "/" + os.path.relpath(dirpath, self.root)
            self._paths[ino] = "/" if rel == "/." else rel


FILEID_KERNFS = 0xFE     # include/linux/exportfs.h: a kernfs node's 64-bit id


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * 8)]


_libc = ctypes.CDLL(None, use_errno=True)


def _open_by_handle(mount_fd: int, cgroup_id: int) -> int | None:
    """An O_PATH fd on the cgroup directory with id `cgroup_id` under `mount_fd`; None
    when there is none (removed: ESTALE), -1 when the kernel refuses the call here."""
    fh = _FileHandle(8, FILEID_KERNFS)
    fh.f_handle[:] = list(struct.pack("=Q", cgroup_id & (2**64 - 1)))
    fd = _libc.open_by_handle_at(mount_fd, ctypes.byref(fh),
                                 os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    if fd >= 0:
        return fd
    err = ctypes.get_errno()
    return -1 if err in (errno.EPERM, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL) else None


def ancestors(ppid: int, limit: int = MAX_ANCESTORS) -> list[str]:
    """comms of `ppid`, its parent, ... up to pid 1 (as far as /proc still has them)."""
    out: list[str] = []
    pid = ppid
    while pid > 0 and len(out) < limit:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        # comm may hold spaces and parentheses: it ends at the last ")".
        head, _, rest = stat.rpartition(")")
        out.append(head.split("(", 1)[1])
        if pid == 1:
            break
        pid = int(rest.split()[1])
    return out
