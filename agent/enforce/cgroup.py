"""Cgroup v2: resolving a service's cgroup safely, and freezing it (FREEZE_CGROUP, and the
freeze half of ISOLATE_SERVICE; the network half is in agent.enforce.isolate).

Targets are paths in the cgroup v2 hierarchy, "/system.slice/foo.service" (the form
/proc/PID/cgroup shows). The agent never freezes or cuts its own cgroup or one of its
ancestors (the root included): that would cut the agent off, or the whole node.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from agent.enforce.base import Drift, EnforceError, UnsupportedMitigation
from agent.model import Mitigation, MitigationKind

NFT_CGROUP_BASE = Path("/sys/fs/cgroup")   # nft 1.0.6 resolves cgroupv2 paths under this
FREEZE_KINDS = (MitigationKind.ISOLATE_SERVICE, MitigationKind.FREEZE_CGROUP)
# Cgroup names that are safe to quote in an nft command: no quotes, spaces or "..".
_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9_.@:+\-]+$")


class CgroupError(EnforceError):
    """A cgroup target is invalid, absent, or the agent's own; nothing was changed."""


@dataclass(frozen=True, order=True)
class Cgroup:
    """A resolved cgroup. `path` is "/a/b" in the hierarchy, `level` its depth (the root
    is 0, as nft's `socket cgroupv2 level` counts), `nft_path` the path nft resolves
    relative to /sys/fs/cgroup (they differ on hybrid hosts: "unified/a/b")."""

    level: int
    path: str
    nft_path: str
    fs_path: Path


def _mounts(mountinfo: str) -> list[tuple[Path, str, str]]:
    """(mount point, root within the filesystem, filesystem type) of each mount."""
    out = []
    with open(mountinfo) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            out.append((Path(fields[4]), fields[3], right.split(" ", 1)[0]))
    return out


def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> Path:
    """Where the whole cgroup v2 hierarchy is mounted, at or under /sys/fs/cgroup (where
    nft resolves cgroup paths); bind mounts of a part of it do not count."""
    for point, root, fstype in _mounts(mountinfo):
        if fstype == "cgroup2" and root == "/" and (
                point == NFT_CGROUP_BASE or NFT_CGROUP_BASE in point.parents):
            return point
    raise CgroupError(f"cgroup v2 is not mounted at or under {NFT_CGROUP_BASE}")


def ensure_cgroup2() -> str | None:
    """Mount cgroup v2 at /sys/fs/cgroup when no cgroup v2 is visible (None on success,
    else why not). `ip netns exec` gives the agent a private mount namespace with a fresh
    /sys and no cgroup mounts, and nft resolves cgroup paths under /sys/fs/cgroup; a mount
    made there is invisible to the rest of the host."""
    try:
        cgroup2_mount()
        return None
    except CgroupError:
        pass
    if any(point == NFT_CGROUP_BASE for point, _, _ in _mounts("/proc/self/mountinfo")):
        # A cgroup v1 layout lives there: mounting over it would hide it from this namespace.
        return f"cgroup v2 is not mounted and {NFT_CGROUP_BASE} holds another filesystem"
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"cgroup2", str(NFT_CGROUP_BASE).encode(), b"cgroup2", 0, None) != 0:
        err = ctypes.get_errno()
        return f"cgroup v2 is not mounted and mounting it failed: {os.strerror(err)}"
    return None


def own_cgroup(pid: int | str = "self") -> str:
    """The cgroup v2 path of a process ("/" when it is in the root)."""
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip() or "/"
    return "/"


def normalise(target: str) -> str:
    """"system.slice/x.service/" -> "/system.slice/x.service"; CgroupError if unsafe."""
    parts = [p for p in target.strip().split("/") if p]
    for p in parts:
        if p in (".", "..") or not _SAFE_COMPONENT.match(p):
            raise CgroupError(f"not a cgroup path: {target!r}")
    return "/" + "/".join(parts)


def resolve(target: str, root: Path | None = None) -> Cgroup:
    """The existing cgroup `target`; CgroupError when it is absent, the root, or not
    reachable by nft (cgroup v2 not under /sys/fs/cgroup)."""
    path = normalise(target)
    if path == "/":
        raise CgroupError("the root cgroup holds the whole node: isolate the node instead")
    root = root or cgroup2_mount()
    fs_path = root / path.lstrip("/")
    if not (fs_path / "cgroup.freeze").is_file():
        raise CgroupError(f"no cgroup {path} (looked in {root})")
    try:
        nft_path = str(fs_path.relative_to(NFT_CGROUP_BASE))
    except ValueError:
        raise CgroupError(f"cgroup v2 is mounted at {root}, outside {NFT_CGROUP_BASE} "
                          "where nftables looks for cgroups") from None
    return Cgroup(path.count("/"), path, nft_path, fs_path)


def contains(outer: str, inner: str) -> bool:
    """Whether cgroup `outer` is `inner` or one of its ancestors."""
    return outer == "/" or inner == outer or inner.startswith(outer + "/")


def check_not_agent(cg: Cgroup, agent_cgroup: str) -> None:
    if contains(cg.path, agent_cgroup):
        raise CgroupError(f"refusing to touch cgroup {cg.path}: it holds the agent itself "
                          f"({agent_cgroup})")


def is_frozen(cg: Cgroup) -> bool:
    """The kernel's own view: `frozen 1` in cgroup.events (set once every task stopped)."""
    try:
        events = (cg.fs_path / "cgroup.events").read_text()
    except FileNotFoundError:
        return False
    return "frozen 1" in events.splitlines()


def set_frozen(cg: Cgroup, frozen: bool) -> None:
    """Ask the kernel to freeze or thaw; the freeze completes asynchronously (is_frozen)."""
    try:
        (cg.fs_path / "cgroup.freeze").write_text("1" if frozen else "0")
    except OSError as e:
        raise CgroupError(f"cannot {'freeze' if frozen else 'thaw'} cgroup {cg.path}: "
                          f"{e.strerror}") from None


class CgroupEnforcer:
    """The Enforcer for the freezer: FREEZE_CGROUP and the freeze of ISOLATE_SERVICE.

    It remembers which cgroups it froze, so lift and reconcile thaw only those (a cgroup
    somebody else froze is left alone). `agent_cgroup` defaults to this process's."""

    def __init__(self, root: Path | None = None, agent_cgroup: str | None = None):
        self._root = root
        self._agent = agent_cgroup
        self._frozen: dict[str, Mitigation] = {}     # mitigation id -> mitigation

    @property
    def agent_cgroup(self) -> str:
        return self._agent or own_cgroup()

    def check(self, target: str) -> Cgroup:
        """Resolve `target` and refuse the agent's own cgroup and its ancestors."""
        cg = resolve(target, self._root)
        check_not_agent(cg, self.agent_cgroup)
        return cg

    def setup(self, desired: Sequence[Mitigation], now: float) -> None:
        self.reconcile(desired, now)

    def apply(self, m: Mitigation, now: float) -> None:
        """Freeze m.target; CgroupError (absent, the agent's own) changes nothing."""
        if m.kind not in FREEZE_KINDS:
            raise UnsupportedMitigation(f"the cgroup freezer does not enforce {m.kind.value}")
        cg = self.check(m.target)
        set_frozen(cg, True)
        self._frozen[m.id] = m

    def lift(self, m: Mitigation) -> None:
        """Thaw m.target unless another mitigation still wants it frozen; an absent cgroup
        (the service was stopped) is not an error."""
        if m.kind not in FREEZE_KINDS:
            return
        gone = [i for i, d in self._frozen.items()
                if i == m.id or normalise(d.target) == _norm_or_none(m.target)]
        for i in gone:
            del self._frozen[i]
        path = _norm_or_none(m.target)
        if path and path not in {normalise(d.target) for d in self._frozen.values()}:
            self._thaw(path)

    def reconcile(self, desired: Sequence[Mitigation], now: float) -> Drift:
        """Freeze every desired cgroup that is not frozen; thaw those we froze that are no
        longer desired. Desired cgroups that no longer exist are skipped."""
        drift = Drift()
        want: dict[str, Mitigation] = {}
        for m in desired:
            if m.kind in FREEZE_KINDS and (m.expires_at is None or m.expires_at > now):
                want[m.id] = m
        paths = set()
        for m in want.values():
            try:
                cg = self.check(m.target)
            except CgroupError:
                continue
            paths.add(cg.path)
            if (cg.fs_path / "cgroup.freeze").read_text().strip() != "1":
                set_frozen(cg, True)
                drift.elements_added.append(f"frozen:{cg.path}")
        for m in self._frozen.values():
            path = _norm_or_none(m.target)
            if path and path not in paths and self._thaw(path):
                drift.elements_removed.append(f"frozen:{path}")
        self._frozen = want
        return drift

    def remove(self) -> None:
        """Thaw every cgroup this enforcer froze."""
        for m in list(self._frozen.values()):
            self.lift(m)

    def is_allowlisted(self, target: str) -> bool:
        """True for the agent's own cgroup and its ancestors (never frozen)."""
        try:
            return contains(normalise(target), self.agent_cgroup)
        except CgroupError:
            return False

    def _thaw(self, path: str) -> bool:
        """Thaw `path` if it exists and is frozen; whether it was."""
        try:
            cg = resolve(path, self._root)
        except CgroupError:
            return False
        if (cg.fs_path / "cgroup.freeze").read_text().strip() != "1":
            return False
        set_frozen(cg, False)
        return True


def _norm_or_none(target: str) -> str | None:
    try:
        return normalise(target)
    except CgroupError:
        return None


def pids(cg: Cgroup) -> list[int]:
    """The processes directly in `cg` (for reports and tests)."""
    text = (cg.fs_path / "cgroup.procs").read_text()
    return [int(p) for p in text.split()]

