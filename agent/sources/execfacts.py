"""The exec policy's facts about an executed file (issue 10 item 2): where it lies, as far
as a workload could have written it there, and its SHA-256.

What the attacker controls, and so what is never used to decide: argv, comm, the path it
spelled to execve (`filename`), the names of its files. What it does not control: the
inode it runs (the kernel's (dev, ino) of mm->exe_file), that inode's link count and
filesystem, whether it is a memfd, the dentries the kernel walked for its path (a symlink
is already resolved there), its cgroup and uid.

exe_location, from those facts only:
  "memfd"    a memfd_create() file (fileless: runc's re-exec, or a dropper);
  "deleted"  unlinked (i_nlink 0): deleted after exec, or an O_TMPFILE;
  "shm"      below /dev/shm, or on the host /dev/shm's filesystem (a bind mount of it
             elsewhere has the same device);
  "tmp"      below /tmp or /var/tmp, or on their filesystems where those are their own
             mounts (the same for bind mounts); a container's /tmp is its own: the walk
             ends at the container's root, so its "/tmp/x" is "tmp" too;
  ""         anywhere else. A workload can write elsewhere too (its container's
             overlay, an emptyDir): that is what exe_sha256 and the deny lists are for.

exe_sha256 is read through /proc/PID/exe (the very file the process runs, deleted or a
memfd alike; the path is never resolved again), checked to be the kernel's inode, and
cached by (dev, ino, mtime, size), bounded. Files over the size limit are not read:
exe_sha256 None, exe_sha256_state "too_large"; a process gone before it was read:
"gone"; another file by then (it exec'd again): "changed". The kernel refuses
writes to a regular file while it is executed (ETXTBSY), but an unsealed memfd can be
rewritten through its own fd after the exec, so its hash is of the bytes when read:
deny fileless programs by location (memfd) rather than trust the hash alone.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import OrderedDict

from agent.sources import abi

# Where anyone may write: /run/lock is 1777 on Debian too.
TMP_DIRS = ("/tmp", "/var/tmp", "/run/lock")
SHM_DIRS = ("/dev/shm",)
HASH_CACHE = 4096
CHUNK = 1 << 20
FS_MAGIC = {0x01021994: "tmpfs", 0x858458f6: "ramfs", 0x958458f6: "hugetlbfs",
            0x794c7630: "overlayfs", 0xef53: "ext4", 0x58465342: "xfs",
            0x9123683e: "btrfs", 0x6969: "nfs", 0x65735546: "fuse", 0x73717368: "squashfs"}

FileId = tuple[int, int]
# Filesystems whose files the agent never opens or stats on its event loop: a FUSE mount
# is the workload's own daemon, which can hold a request for ever (and a hung network
# filesystem can too): FUSE, NFS, CIFS/SMB2, 9P, Ceph.
UNREAD_FS = frozenset({0x65735546, 0x6969, 0xFF534D42, 0xFE534D42, 0x01021997, 0x00C36400})


def kernel_dev(st_dev: int) -> int:
    """stat()'s st_dev as the kernel's dev_t (MAJOR << 20 | MINOR)."""
    return (os.major(st_dev) << 20) | os.minor(st_dev)


def own_mount_devs(dirs: tuple[str, ...], root: str = "/") -> frozenset[int]:
    """Kernel dev_t of those of `dirs` that are filesystems of their own (not the root's:
    then a file on that device is in one of them, wherever it is mounted)."""
    try:
        root_dev = os.stat(root).st_dev
    except OSError:
        return frozenset()
    out = set()
    for d in dirs:
        try:
            st = os.stat(os.path.join(root, d.lstrip("/")))
        except OSError:
            continue
        if st.st_dev != root_dev:
            out.add(kernel_dev(st.st_dev))
    return frozenset(out)


def _below(path: str | None, dirs: tuple[str, ...]) -> bool:
    return path is not None and any(path.startswith(d + "/") for d in dirs)


TMPFS_MAGIC, RAMFS_MAGIC = 0x01021994, 0x858458f6


def location(walked: str | None, nature: int, dev: int, tmp_devs: frozenset[int] = frozenset(),
             shm_devs: frozenset[int] = frozenset(), magic: int = 0) -> str:
    """exe_location (module docstring) from the kernel's walked path (in the process's
    own mount namespace), exe_nature bits and the file's kernel dev_t."""
    if nature & abi.EXE_MEMFD:
        return "memfd"
    if nature & abi.EXE_UNLINKED:
        return "deleted"
    if _below(walked, SHM_DIRS) or dev in shm_devs:
        return "shm"
    if _below(walked, TMP_DIRS) or dev in tmp_devs or nature & abi.EXE_IN_WRITABLE:
        return "tmp"    # the last: below the host's /tmp... in its filesystem, however mounted
    if magic in (TMPFS_MAGIC, RAMFS_MAGIC):
        return "tmpfs"  # a tmpfs of its own (a user namespace's mount, an emptyDir)
    if nature & abi.EXE_DEEP:
        return "deep"   # more directories deep than the kernel looks: nobody installs there
    return ""


def dir_ids(dirs: tuple[str, ...], root: str = "/") -> list[FileId]:
    """(kernel dev_t, inode) of those of `dirs` that exist (map writable_dirs)."""
    out = []
    for d in dirs:
        try:
            st = os.stat(os.path.join(root, d.lstrip("/")))
        except OSError:
            continue
        out.append((kernel_dev(st.st_dev), st.st_ino))
    return out


class ExeHasher:
    """SHA-256 of executed files, cached by (dev, ino, mtime_ns, size) with at most
    `entries` entries; files over `max_bytes` are not read."""

    def __init__(self, max_bytes: int, entries: int = HASH_CACHE, proc: str = "/proc"):
        self.max_bytes, self.entries, self.proc = max_bytes, entries, proc
        self._cache: OrderedDict[tuple[int, int, int, int, int], str] = OrderedDict()
        self.hashed = 0          # files read (cache misses)
        self._lock = threading.Lock()

    def digest(self, pid: int, exe: FileId) -> tuple[str | None, str]:
        """(hex digest or None, state: "ok", "too_large", "gone", "changed", "unreadable")
        of what `pid` runs, provided it is still the kernel's `exe` (dev, ino)."""
        try:
            fd = os.open(f"{self.proc}/{pid}/exe", os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError):
            return None, "gone"
        except OSError:
            return None, "unreadable"
        try:
            st = os.fstat(fd)
            # the inode number (st_dev is not the superblock's on btrfs subvolumes)
            if st.st_ino != exe[1]:
                return None, "changed"          # it exec'd something else since
            return self.digest_fd(fd, exe[0], st)
        except OSError:
            return None, "unreadable"
        finally:
            os.close(fd)

    def digest_fd(self, fd: int, dev: int, st: os.stat_result) -> tuple[str | None, str]:
        """The same for an open file `fd` (fstat `st`) on kernel device `dev`; OSError
        when it cannot be read."""
        # ctime too: a file's owner can put its mtime back after rewriting it (touch -d),
        # nobody can set its ctime
        key = (dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
        with self._lock:        # targets are read on their own threads (exectarget)
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit, "ok"
        if st.st_size > self.max_bytes:
            return None, "too_large"
        h = hashlib.sha256()
        left, offset = self.max_bytes + 1, 0
        while left > 0 and (chunk := os.pread(fd, min(CHUNK, left), offset)):
            h.update(chunk)
            left -= len(chunk)
            offset += len(chunk)
        if left <= 0:
            return None, "too_large"       # grew while read
        after = os.fstat(fd)
        if (after.st_mtime_ns, after.st_ctime_ns) != (st.st_mtime_ns, st.st_ctime_ns):
            return None, "changed"         # written while read: no stable content
        digest = h.hexdigest()
        with self._lock:
            self.hashed += 1
            self._cache[key] = digest
            while len(self._cache) > self.entries:
                self._cache.popitem(last=False)
        return digest, "ok"


def fs_name(magic: int) -> str:
    return FS_MAGIC.get(magic, f"0x{magic:x}" if magic else "")


CLK_TCK = os.sysconf("SC_CLK_TCK")


def _st_dev(pid: int, ino: int, proc: str = "/proc") -> int | None:
    """st_dev of what `pid` runs, while it still runs inode `ino`; None otherwise."""
    try:
        st = os.stat(f"{proc}/{pid}/exe")
    except OSError:
        return None
    return st.st_dev if st.st_ino == ino else None


def boottime_ticks(mono_ns: int) -> int:
    """A CLOCK_MONOTONIC time (the probe's bpf_ktime_get_ns) in /proc/PID/stat's clock
    ticks since boot (CLOCK_BOOTTIME: the same but for time suspended, read now)."""
    offset = time.clock_gettime_ns(time.CLOCK_BOOTTIME) - time.monotonic_ns()
    return (mono_ns + offset) // (1_000_000_000 // CLK_TCK)


def exec_fields(ev: abi.proc_exec_event, walked: str | None, cgroup: str | None,
                tmp_devs: frozenset[int], shm_devs: frozenset[int],
                hasher: ExeHasher | None) -> dict:
    """The proc.exec fields the exec policy matches on (module docstring); exe_sha256
    only with a hasher (a loaded rule reads it)."""
    from agent.sources.gpuproc import container_of
    exe = (ev.proc.exe.dev, ev.proc.exe.ino)
    known = exe[1] != 0
    memfd = bool(ev.exe_nature & abi.EXE_MEMFD)
    out = {"exe_path": None if memfd else walked,   # the kernel's walk (its mount namespace)
           "exe_location": location(walked, ev.exe_nature, exe[0], tmp_devs, shm_devs,
                                    ev.exe_magic)
           if known else None,
           "exe_fs": fs_name(ev.exe_magic), "exe_nlink": ev.exe_nlink,
           "exe_memfd": memfd,
           "exe_unlinked": bool(ev.exe_nature & abi.EXE_UNLINKED),
           "exe_known": known,
           # the process's start time in /proc/PID/stat's clock ticks: pins it
           "start_ticks": ev.start_ns // (1_000_000_000 // CLK_TCK) if ev.start_ns else None,
           # when it exec'd, in the same clock (CLOCK_BOOTTIME ticks): the start time is
           # its fork's, and a fork sweep must not reach processes started in between
           "exec_ticks": boottime_ticks(ev.hdr.ts_ns),
           # the file's device as stat() gives it (on overlayfs or a btrfs subvolume not
           # the superblock's the kernel names): what the fork sweep compares forks by
           "exe_st_dev": _st_dev(ev.proc.pid, exe[1])
           if known and ev.exe_magic not in UNREAD_FS else None,
           "container": container_of(cgroup)}
    if hasher is not None and known:
        if ev.exe_magic in UNREAD_FS:
            out["exe_sha256"], out["exe_sha256_state"] = None, "not_read"
        else:
            out["exe_sha256"], out["exe_sha256_state"] = hasher.digest(ev.proc.pid, exe)
    return out
