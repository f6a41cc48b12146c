"""What the configured executables and watched files are on this host, by identity: the
kernel's (dev, ino) of what stat() finds at each configured path now. The process probe
fills its kernel maps from this and names what events carry: an executable is "a shell"
or "a package manager" only if it is the very file the host has at that path, never
because it is called so (comm), copied (another inode) or sits at the same path in a
container (another filesystem). Re-resolved on a timer: upgrades replace binaries and
useradd/vipw/sed -i replace /etc/shadow by rename, so inodes change.
"""
from __future__ import annotations

import ctypes
import glob
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Callable

from agent.config import EXE_LISTS, Config, breach_lists, split_pattern

FileId = tuple[int, int]        # (kernel dev_t: MAJOR << 20 | MINOR, inode number)


def file_id(st: os.stat_result, path: str | None = None, follow: bool = True,
            mountinfo: str = "/proc/self/mountinfo") -> FileId:
    """The kernel's view of a stat result: (the superblock's dev_t, the inode number).
    stat(2)'s st_dev is not always the superblock's: btrfs reports each subvolume's own
    anonymous device, while the kernel's inode->i_sb->s_dev is the filesystem's. With
    the path stat()ed, the superblock's dev_t is the one /proc/self/mountinfo gives for
    the mount statx(STATX_MNT_ID) names (`mountinfo`: that of the mount namespace the
    path is in, e.g. /proc/PID/mountinfo for /proc/PID/fd/N)."""
    dev = os.major(st.st_dev), os.minor(st.st_dev)
    if path is not None:
        dev = _superblock_dev(path, follow, mountinfo) or dev
    return (dev[0] << 20) | dev[1], st.st_ino


class _Statx(ctypes.Structure):
    _fields_ = [("mask", ctypes.c_uint32), ("_pad", ctypes.c_uint8 * 140),
                ("mnt_id", ctypes.c_uint64), ("_rest", ctypes.c_uint8 * 104)]


_STATX_MNT_ID = 0x1000
_AT_FDCWD, _AT_SYMLINK_NOFOLLOW = -100, 0x100
_LIBC = ctypes.CDLL(None, use_errno=True)
# mountinfo file -> (when read, mount id -> (major, minor) of its superblock). Mount ids
# are reused after an unmount: a table is trusted for MOUNTS_TTL_S, then read again.
_MOUNTS: dict[str, tuple[float, dict[int, tuple[int, int]]]] = {}
MOUNTS_TTL_S = 1.0


def _superblock_dev(path: str, follow: bool,
                    mountinfo: str = "/proc/self/mountinfo") -> tuple[int, int] | None:
    """(major, minor) of the superblock under `path`; None when statx cannot tell."""
    buf = _Statx()
    try:
        flags = 0 if follow else _AT_SYMLINK_NOFOLLOW
        if _LIBC.statx(_AT_FDCWD, os.fsencode(path), flags, _STATX_MNT_ID, ctypes.byref(buf)):
            return None
    except (AttributeError, ValueError):    # a libc without statx; a NUL in the path
        return None
    if not buf.mask & _STATX_MNT_ID:
        return None
    now = time.monotonic()
    at, table = _MOUNTS.get(mountinfo, (0.0, {}))
    if buf.mnt_id not in table or now - at > MOUNTS_TTL_S:
        table = {}
        try:
            with open(mountinfo) as f:
                for line in f:
                    mid, _parent, majmin = line.split(" ", 3)[:3]
                    major, minor = majmin.split(":")
                    table[int(mid)] = int(major), int(minor)
        except (OSError, ValueError):
            return None
        if len(_MOUNTS) > 256:
            _MOUNTS.clear()
        _MOUNTS[mountinfo] = (now, table)
    return table.get(buf.mnt_id)


def id_text(ident: FileId) -> str:
    dev, ino = ident
    return f"{dev >> 20}:{dev & 0xFFFFF}:{ino}"


@dataclass(frozen=True)
class Watch:
    """One resolved file watch: rule id (pattern index) and path_flags."""

    rule_id: int
    flags: int


@dataclass
class Resolved:
    """A snapshot of the host: executables and watches by identity."""

    exes: dict[FileId, tuple[str, frozenset[str]]] = field(default_factory=dict)
    files: dict[FileId, Watch] = field(default_factory=dict)
    # (dir id, name, exact) -> watch; name "" is every file in the directory
    dirs: dict[tuple[FileId, str, bool], Watch] = field(default_factory=dict)
    names: dict[tuple[str, str], Watch] = field(default_factory=dict)   # "*/dir/name"
    paths: dict[FileId, str] = field(default_factory=dict)   # watched files' paths now
    dir_paths: set[str] = field(default_factory=set)         # watched directories' paths now
    system_dirs: set[FileId] = field(default_factory=set)    # system_exec_dirs' "DIR/*" dirs


def on_host(root: str, path: str) -> str:
    """Where the agent sees the host's `path` (breach.host_root: "/" or a bind mount)."""
    return path if root in ("", "/") else os.path.join(root, path.lstrip("/"))


def resolve_exes(cfg: Config) -> dict[FileId, tuple[str, frozenset[str]]]:
    """(dev, ino) -> (the configured path that found it, the lists it is in)."""
    root = cfg.breach.host_root
    cut = 0 if root in ("", "/") else len(root.rstrip("/"))
    out: dict[FileId, tuple[str, set[str]]] = {}
    for name in EXE_LISTS:
        for pattern in getattr(cfg.breach, name):
            seen = on_host(root, pattern)
            for path in sorted(glob.glob(seen)) if glob.has_magic(pattern) else [seen]:
                try:
                    st = os.stat(path)      # follows /bin -> /usr/bin, python3 -> python3.11
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                _, lists = out.setdefault(file_id(st, path), (path[cut:], set()))
                lists.add(name)
    return {k: (p, frozenset(v)) for k, (p, v) in out.items()}


class ListedExes:
    """The executables of one config list, as a resolution the caller keeps current
    (`exes`: ProcProbe.resolved.exes, re-resolved on its timer with host_root and the
    kernel's device numbers): which of them a process runs now, by the kernel's identity
    of /proc/PID/exe."""

    def __init__(self, exes: Callable[[], dict[FileId, tuple[str, frozenset[str]]]],
                 name: str):
        self._exes, self.name = exes, name

    def of_process(self, pid: int) -> str | None:
        """The listed path of the executable `pid` runs now; None if unlisted or gone."""
        exe = f"/proc/{pid}/exe"
        try:
            st = os.stat(exe)
        except OSError:
            return None
        exes = self._exes()
        if not any(ino == st.st_ino for _, ino in exes):   # cheap: no mount table read
            return None
        hit = exes.get(file_id(st, exe, mountinfo=f"/proc/{pid}/mountinfo"))
        return hit[0] if hit is not None and self.name in hit[1] else None


def patterns(cfg: Config) -> list[tuple[str, str, int]]:
    """(how, text, path_flags) per distinct watch pattern; its index is its rule id."""
    from agent.sources import abi

    lists = breach_lists(cfg)
    reads = {split_pattern(p) for p in lists["read_paths"]}
    out: dict[tuple[str, str], int] = {}
    for p in (*lists["credential_paths"], *lists["agent_paths"], *lists["read_paths"]):
        how, text = split_pattern(p)
        flags = (abi.PATH_EXACT if how == "exact" else 0) | \
                (abi.PATH_READS if (how, text) in reads else 0)
        out[(how, text)] = out.get((how, text), 0) | flags
    return [(how, text, flags) for (how, text), flags in out.items()]


def watch_lists(cfg: Config, pats: list[tuple[str, str, int]]) -> list[list[str]]:
    """Per pattern (rule id): the names of the config's path lists that hold it."""
    lists = {n: {split_pattern(p) for p in v} for n, v in breach_lists(cfg).items()
             if n.endswith("_paths")}
    return [sorted(n for n, v in lists.items() if (how, text) in v) for how, text, _ in pats]


def resolve_watches(pats: list[tuple[str, str, int]], into: Resolved, root: str = "/") -> None:
    """Watches by identity for every pattern: the directory (so that a file created or
    renamed into it later counts) and the files there now (so hard links count); and
    every file created in a directory holding watched names (CREATIONS), so that a
    temporary file later renamed over a watched one is attributed to its creator."""
    from agent.sources import abi

    holders: set[FileId] = set()
    for rule_id, (how, text, flags) in enumerate(pats):
        w = Watch(rule_id, flags)
        if how == "suffix":
            _, d, name = text.split("/")
            into.names.setdefault((d, name), w)
            continue
        if how == "prefix" and text.endswith("/"):
            _watch_dir(text, w, into, root)
            continue
        parent, _, name = text.rpartition("/")
        parent = parent or "/"
        try:
            dir_id = file_id(os.stat(on_host(root, parent)), on_host(root, parent))
            entries = list(os.scandir(on_host(root, parent)))
        except OSError:
            continue
        into.dirs.setdefault((dir_id, name, how == "exact"), w)
        into.dir_paths.add(parent)
        holders.add(dir_id)
        for entry in entries:
            if entry.name == name or (how == "prefix" and entry.name.startswith(name)):
                path = os.path.join(parent, entry.name)
                if entry.is_dir(follow_symlinks=False):
                    _watch_dir(path, w, into, root)     # /etc/sudoers.d
                else:
                    _watch_file(path, w, into, root)
    creations = Watch(abi.CREATIONS_ID, abi.PATH_CREATIONS)
    for dir_id in holders:
        into.dirs.setdefault((dir_id, "", False), creations)


def _watch_dir(d: str, w: Watch, into: Resolved, root: str) -> None:
    try:
        into.dirs.setdefault((file_id(os.stat(on_host(root, d)), on_host(root, d)), "", False), w)
        entries = list(os.scandir(on_host(root, d)))
    except OSError:
        return
    into.dir_paths.add(d.rstrip("/") or "/")
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):
            _watch_file(os.path.join(d, entry.name), w, into, root)


def _watch_file(path: str, w: Watch, into: Resolved, root: str) -> None:
    try:
        st = os.stat(on_host(root, path), follow_symlinks=False)
    except OSError:
        return
    if stat.S_ISREG(st.st_mode):
        fid = file_id(st, on_host(root, path), follow=False)
        into.files.setdefault(fid, w)
        into.paths.setdefault(fid, path)


def resolve(cfg: Config, pats: list[tuple[str, str, int]],
            before: Resolved | None = None) -> Resolved:
    r = Resolved(exes=resolve_exes(cfg), system_dirs=resolve_system_dirs(cfg))
    if before is not None:
        keep_running(before.exes, r.exes)
    resolve_watches(pats, r, cfg.breach.host_root)
    return r


def resolve_system_dirs(cfg: Config) -> set[FileId]:
    """The directories DIR of breach.system_exec_dirs patterns "DIR/*" (DIR literal): the
    rules' glob puts everything below DIR in the system's executables, so the kernel may
    skip those by the directory's identity. Other patterns give none (the kernel then
    sends more, never less, and the rules judge the path). lstat: a symlinked DIR is
    not followed (the kernel would see the target's files under another path)."""
    out = set()
    for pattern in cfg.breach.system_exec_dirs:
        d = pattern[:-2] if pattern.endswith("/*") else pattern[:-1]   # "/dir/": "/dir/*"
        if not pattern.endswith(("/*", "/")) or not d.startswith("/") or glob.has_magic(d):
            continue
        path = on_host(cfg.breach.host_root, d)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            out.add(file_id(st, path, follow=False))
    return out


def keep_running(old: dict[FileId, tuple[str, frozenset[str]]],
                 new: dict[FileId, tuple[str, frozenset[str]]], proc: str = "/proc") -> None:
    """An upgrade replaced a configured executable (dpkg upgrading dpkg): the processes
    still running the old one keep its identity while they run (its inode stays
    allocated, so no other file can take its number until they exit)."""
    gone = old.keys() - new.keys()
    if not gone:
        return
    try:
        pids = [d for d in os.listdir(proc) if d.isdigit()]
    except OSError:
        return
    for pid in pids:
        try:
            exe = f"{proc}/{pid}/exe"
            ident = file_id(os.stat(exe), exe, mountinfo=f"{proc}/{pid}/mountinfo")     # the running file, deleted or not
        except OSError:
            continue
        if ident in gone:
            new[ident] = old[ident]
            gone.discard(ident)
            if not gone:
                return


def walked_path(raw: bytes, length: int, flags: int, complete: int) -> str | None:
    """A path from the kernel's dentry walk (components leaf first, NUL terminated);
    None when the walk did not reach the root (too deep or too long: not trusted)."""
    if not flags & complete:
        return None
    parts = bytes(raw[:length]).split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    return "/" + "/".join(p.decode(errors="replace") for p in reversed(parts))
