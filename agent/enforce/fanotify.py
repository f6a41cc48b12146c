"""Opens refused in the kernel: fanotify permission events (FAN_OPEN_PERM).

A `FileGate` holds one fanotify group per file rule (so an event says which rule's path was
opened) and one thread that answers every permission event of every group: `judge(rule,
pid)` says whether this opener may not open that rule's files; the answer FAN_DENY makes
the open(2) (read, write or exec) fail with EPERM. While the opener waits, its open is
blocked in the kernel, so answers must be quick and never missing:

- any error of ours (a /proc file gone, a judge that raised) answers ALLOW: the host's
  opens never hang on the agent and a bug of ours never locks anyone out;
- the agent's own opens are always allowed;
- closing the groups (stop, or the agent dying: the kernel closes its fds) answers every
  pending event ALLOW and removes every mark.

Marks are on inodes: a file's mark covers every name of it (hard links, bind mounts into
containers, renames, symlinks to it, /proc/PID/fd reopens); a directory's mark with
FAN_EVENT_ON_CHILD covers its files, those created later included. Each file seen through
a directory (at the walk, at each rescan, at its first open) gets its own inode mark too,
so a hard link made to it elsewhere stays covered. What an open does not cover: fds opened
before the mark, fds passed over a unix socket, O_PATH fds (they cannot read), and the
calls that take a path without opening (stat, unlink, rename, chmod, truncate(2)).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import select
import stat
import threading
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger(__name__)

FAN_CLOEXEC = 0x01
FAN_NONBLOCK = 0x02
FAN_CLASS_CONTENT = 0x04
FAN_UNLIMITED_MARKS = 0x20
FAN_MARK_ADD = 0x01
FAN_MARK_DONT_FOLLOW = 0x04   # a symlink put there since it was looked at is not followed
FAN_OPEN_PERM = 0x00010000
FAN_EVENT_ON_CHILD = 0x08000000
FAN_ALLOW = 0x01
FAN_DENY = 0x02
FAN_NOFD = -1
AT_FDCWD = -100
METADATA_VERSION = 3

MAX_DEPTH = 8            # directory levels below a configured directory that are marked
MAX_MARKS = 20_000       # inode marks per gate (directories first, then files)
READ_BYTES = 64 * 1024


class _Metadata(ctypes.Structure):    # struct fanotify_event_metadata (linux/fanotify.h)
    _fields_ = [("event_len", ctypes.c_uint32), ("vers", ctypes.c_uint8),
                ("reserved", ctypes.c_uint8), ("metadata_len", ctypes.c_uint16),
                ("mask", ctypes.c_uint64), ("fd", ctypes.c_int32), ("pid", ctypes.c_int32)]


class _Response(ctypes.Structure):    # struct fanotify_response
    _fields_ = [("fd", ctypes.c_int32), ("response", ctypes.c_uint32)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                ctypes.c_char_p]


class Unsupported(OSError):
    """fanotify permission events are not available here (the kernel lacks
    CONFIG_FANOTIFY_ACCESS_PERMISSIONS, or the agent lacks CAP_SYS_ADMIN)."""


def _init() -> int:
    fd = _libc.fanotify_init(FAN_CLASS_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK | FAN_UNLIMITED_MARKS,
                             os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        why = {errno.EPERM: "refused (EPERM): no CAP_SYS_ADMIN, or a seccomp filter without "
                            "fanotify_init",
               errno.EINVAL: "the kernel has no fanotify permission events "
                             "(CONFIG_FANOTIFY_ACCESS_PERMISSIONS)",
               errno.ENOSYS: "the kernel has no fanotify"}.get(err, os.strerror(err))
        raise Unsupported(err, f"fanotify: {why}")
    return fd


def _mark(group: int, mask: int, dirfd: int, path: str | None) -> None:
    flags = FAN_MARK_ADD | (FAN_MARK_DONT_FOLLOW if path is not None else 0)
    if _libc.fanotify_mark(group, flags, mask, dirfd,
                           os.fsencode(path) if path is not None else None) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


@dataclass
class Guarded:
    """One rule's paths as marked: `missing` paths do not exist (yet: the next rescan
    marks them), `uncovered` says what the bounds left out."""
    name: str
    paths: tuple[str, ...]
    group: int = -1
    # (st_dev, st_ino) of every mark made: the kernel keeps one until its inode goes, so
    # this only grows (an upper bound of what the kernel holds, bounded by MAX_MARKS)
    marked: set[tuple[int, int]] = field(default_factory=set)
    # configured path -> (missing, uncovered, inodes marked) at its last scan
    found: dict[str, tuple[list[str], list[str], set[tuple[int, int]]]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    uncovered: list[str] = field(default_factory=list)


Judge = Callable[[int, int], "str | None"]            # (rule index, pid) -> opener's cgroup if denied
Denied = Callable[[int, int, str, str, str], None]    # rule index, pid, cgroup, exe, path


class FileGate:
    """The groups, their marks and the answering thread. `judge` runs on that thread for
    every open of a marked file and must be quick; `denied` is called there after the
    answer. Raises Unsupported from the constructor when fanotify cannot be used."""

    def __init__(self, rules: list[tuple[str, tuple[str, ...]]], judge: Judge, denied: Denied):
        self.rules = [Guarded(name, paths) for name, paths in rules]
        self._judge, self._denied = judge, denied
        self._own_pid = os.getpid()
        self._lock = threading.Lock()          # marks: the rescan and the thread add them
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread: threading.Thread | None = None
        self.answered = 0
        self.allowed_on_error = 0
        self.failed = ""          # why answering stopped (the groups are closed then)
        try:
            for g in self.rules:
                g.group = _init()
        except Unsupported:
            self.close()
            raise
        self.rescan()

    # -- marks -----------------------------------------------------------------------------

    def marks(self) -> int:
        return sum(len(g.marked) for g in self.rules)

    def rescan(self, files_only: bool = False) -> None:
        """(Re)mark the configured paths: every file path (a file replaced by a new inode,
        as editors and passwd do, gets its mark here), and unless `files_only` every
        directory tree too (new files, new subdirectories, paths that appeared). Marking
        an inode twice is harmless; a deleted inode's mark goes with it."""
        for g in self.rules:
            for path in g.paths:
                # a directory written without its trailing "/" is one all the same
                is_dir = (path.endswith("/") and len(path) > 1) or \
                    (os.path.isdir(path) and not os.path.islink(path))
                if files_only and is_dir:
                    continue
                missing: list[str] = []
                uncovered: list[str] = []
                seen: set[tuple[int, int]] = set()
                real = os.path.realpath(path)
                if os.path.exists(path) and real != path.rstrip("/"):
                    # a symlink on the way (maybe one a workload planted where the path
                    # was missing): marking where it leads could cover what load refuses
                    uncovered.append(f"{path}: a symlink on its way (to {real}): not marked")
                elif is_dir:
                    self._mark_tree(g, path.rstrip("/"), missing, uncovered, seen)
                else:
                    self._mark_path(g, path, FAN_OPEN_PERM, missing, uncovered, seen)
                with self._lock:
                    g.found[path] = (missing, uncovered, seen)
                    # the kernel keeps a mark until its inode goes: never forgotten here
                    g.marked |= seen
            g.missing = [m for f in g.found.values() for m in f[0]]
            g.uncovered = [u for f in g.found.values() for u in f[1]]

    def _mark_path(self, g: Guarded, path: str, mask: int, missing: list[str],
                   uncovered: list[str], seen: set[tuple[int, int]]) -> bool:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            missing.append(path)
            return False
        except OSError as e:
            uncovered.append(f"{path}: {e.strerror}")
            return False
        if stat.S_ISLNK(st.st_mode):
            uncovered.append(f"{path}: a symlink: not marked")
            return False
        key = (st.st_dev, st.st_ino)
        if key in seen:
            return True
        with self._lock:    # marks the kernel holds (counted since made: never fewer)
            if key not in g.marked and self.marks() >= MAX_MARKS:
                uncovered.append(f"{path}: past {MAX_MARKS} marks")
                return False
        try:
            _mark(g.group, mask, AT_FDCWD, path)
        except OSError as e:
            uncovered.append(f"{path}: {e.strerror}")
            return False
        with self._lock:
            g.marked.add(key)
        seen.add(key)
        return True

    def _mark_tree(self, g: Guarded, top: str, missing: list[str], uncovered: list[str],
                   seen: set[tuple[int, int]]) -> None:
        if not os.path.isdir(top):
            (missing if not os.path.exists(top) else uncovered).append(
                top + "/" if not os.path.exists(top) else f"{top}/: not a directory")
            return
        stack = [(top, 0)]
        files: list[str] = []
        while stack:        # directories first: they cover their files' opens
            d, depth = stack.pop()
            if not self._mark_path(g, d, FAN_OPEN_PERM | FAN_EVENT_ON_CHILD, missing, uncovered,
                                   seen):
                continue
            try:
                entries = list(os.scandir(d))
            except OSError as e:
                uncovered.append(f"{d}/: {e.strerror}")
                continue
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    if depth + 1 > MAX_DEPTH:
                        uncovered.append(f"{e.path}/: deeper than {MAX_DEPTH} levels")
                    else:
                        stack.append((e.path, depth + 1))
                elif e.is_file(follow_symlinks=False):
                    files.append(e.path)
        for f in files:     # hard links made elsewhere to these stay covered
            self._mark_path(g, f, FAN_OPEN_PERM, [], uncovered, seen)

    def _mark_fd(self, g: Guarded, fd: int) -> None:
        """A file opened through a directory mark gets its own inode mark (bounded)."""
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return
            key = (st.st_dev, st.st_ino)
            with self._lock:
                if key in g.marked or self.marks() >= MAX_MARKS:
                    return
                _mark(g.group, FAN_OPEN_PERM, fd, None)
                g.marked.add(key)
        except OSError:
            pass

    # -- answering -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="file-policy", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        """Answer until stopped. Should answering itself break (a read error, an event
        layout this code does not know), the groups are closed: the kernel then allows
        every waiting open and drops the marks -- never opens left waiting on nobody."""
        try:
            self._answer_all()
        except Exception as e:   # noqa: BLE001 -- fail open, say so
            self.failed = f"answering stopped: {e}; the groups were closed (nothing refused)"
            log.exception("file policy: answering failed; groups closed, opens allowed")
            for g in self.rules:
                if g.group >= 0:
                    os.close(g.group)
                    g.group = -1

    def _answer_all(self) -> None:
        poller = select.poll()
        by_fd = {}
        for i, g in enumerate(self.rules):
            poller.register(g.group, select.POLLIN)
            by_fd[g.group] = i
        poller.register(self._stop_r, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == self._stop_r:
                    return
                self._drain(by_fd[fd])

    def _drain(self, index: int) -> None:
        g = self.rules[index]
        try:
            buf = os.read(g.group, READ_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        size = ctypes.sizeof(_Metadata)
        off = 0
        while off + size <= len(buf):
            meta = _Metadata.from_buffer_copy(buf, off)
            if meta.event_len < size or meta.vers != METADATA_VERSION:
                raise OSError(errno.EPROTO, f"fanotify event version {meta.vers}, "
                                            f"length {meta.event_len}")
            off += meta.event_len
            if meta.fd != FAN_NOFD:
                self._answer(index, g, meta)

    def _answer(self, index: int, g: Guarded, meta: _Metadata) -> None:
        cgroup = exe = None
        try:
            if meta.pid > 0 and meta.pid != self._own_pid:
                cgroup = self._judge(index, meta.pid)
                if cgroup is not None:
                    exe = _readlink(f"/proc/{meta.pid}/exe")
        except Exception:   # noqa: BLE001 -- never leave an open hanging, never deny on our bug
            self.allowed_on_error += 1
            log.exception("file policy: judging an open failed; allowed")
            cgroup = None
        try:
            os.write(g.group, bytes(_Response(meta.fd, FAN_DENY if cgroup is not None else FAN_ALLOW)))
            self.answered += 1
            self._mark_fd(g, meta.fd)
            if cgroup is not None:
                self._denied(index, meta.pid, cgroup, exe or "", _readlink(f"/proc/self/fd/{meta.fd}"))
        except Exception:   # noqa: BLE001
            log.exception("file policy: answering an open failed")
        finally:
            os.close(meta.fd)

    # -- stop ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop answering and close the groups: the kernel allows whatever was pending and
        drops every mark."""
        if self._thread is not None:
            os.write(self._stop_w, b"x")
            self._thread.join(5.0)
            self._thread = None
        for g in self.rules:
            if g.group >= 0:
                os.close(g.group)
                g.group = -1
        for fd in (self._stop_r, self._stop_w):
            if fd >= 0:
                os.close(fd)
        self._stop_r = self._stop_w = -1


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""
