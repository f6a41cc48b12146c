"""Cgroup v2: resolving a service's cgroup safely, and freezing it (FREEZE_CGROUP, and the
freeze half of ISOLATE_SERVICE; the network half is in agent.enforce.isolate).

Targets are paths in the cgroup v2 hierarchy, "/system.slice/foo.service" (the form
/proc/PID/cgroup shows). The agent never freezes or cuts its own cgroup or one of its
ancestors (the root included): that would cut the agent off, or the whole node.

A cgroup delegated to a user has a cgroup.freeze the agent may not write (no
CAP_DAC_OVERRIDE): its processes are stopped with SIGSTOP instead (agent.enforce.stop), and
apply says so with PartiallyApplied. Either way the tenant who owns such a cgroup can undo
it (cgroup.freeze = 0, SIGCONT) or move processes out of it; reconcile freezes or stops them
again, follows a process that left (stopped where it is now), and reports each of these in
Drift.notes for the incident.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from agent import cgroupview
from agent.enforce import stop
from agent.enforce.base import Drift, EnforceError, PartiallyApplied, UnsupportedMitigation
from agent.model import Mitigation, MitigationKind

NFT_CGROUP_BASE = Path("/sys/fs/cgroup")   # nft 1.0.6 resolves cgroupv2 paths under this
FREEZE_KINDS = (MitigationKind.ISOLATE_SERVICE, MitigationKind.FREEZE_CGROUP)
# Cgroup names that are safe to quote in an nft command: no quotes, spaces or "..".
_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9_.@:+\-]+$")


log = logging.getLogger("swarm_agent")


class CgroupError(EnforceError):
    """A cgroup target is invalid, absent, or the agent's own; nothing was changed."""


class FreezeRefused(CgroupError):
    """The kernel refused the write to cgroup.freeze (permission: a delegated cgroup)."""


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
    """The cgroup v2 path of a process as the host names it ("/" when it is in the root,
    or when it cannot be read or named: callers exempt nothing by "/")."""
    return cgroupview.cgroup_of(pid) or "/"


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
        what = f"cannot {'freeze' if frozen else 'thaw'} cgroup {cg.path}: {e.strerror}"
        if e.errno in (errno.EACCES, errno.EPERM):
            raise FreezeRefused(what + _owner(cg)) from None
        raise CgroupError(what) from None


def _owner(cg: Cgroup) -> str:
    try:
        st = (cg.fs_path / "cgroup.freeze").stat()
    except OSError:
        return ""
    if st.st_uid == 0:
        return ""
    return (f" (its cgroup.freeze belongs to uid {st.st_uid}, mode {st.st_mode & 0o777:o}: "
            "a delegated cgroup, and the agent holds no CAP_DAC_OVERRIDE)")


@dataclass
class Hold:
    """How the processes of one cgroup are held still. `refused`: why the freezer was
    refused (None: the freezer holds them); `stopped`: the processes this enforcer sent
    SIGSTOP (continued on lift); `watched`: every process seen in the cgroup while held
    (followed when it leaves); `left`: those found outside, and where."""

    refused: str | None = None
    stopped: set[stop.Ident] = field(default_factory=set)
    watched: set[stop.Ident] = field(default_factory=set)
    left: dict[stop.Ident, str] = field(default_factory=dict)
    holdouts: list[int] = field(default_factory=list)

    def substitute(self) -> PartiallyApplied:
        held = f"{len(self.stopped)} processes stopped with SIGSTOP instead"
        refused = [f"the freezer: {self.refused}"]
        if self.holdouts:
            refused.append(f"processes {self.holdouts} did not stop (uninterruptible, "
                           "traced, or continued as fast as they were stopped)")
        return PartiallyApplied([held], refused)


class CgroupEnforcer:
    """The Enforcer for the freezer: FREEZE_CGROUP and the freeze of ISOLATE_SERVICE.

    It remembers which cgroups it froze, so lift and reconcile thaw only those (a cgroup
    somebody else froze is left alone). `agent_cgroup` defaults to this process's."""

    def __init__(self, root: Path | None = None, agent_cgroup: str | None = None):
        self._root = root
        self._agent = agent_cgroup
        self._frozen: dict[str, Mitigation] = {}     # mitigation id -> mitigation
        self._holds: dict[str, Hold] = {}            # cgroup path -> how it is held

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
        """Freeze m.target; CgroupError (absent, the agent's own) changes nothing. Where
        the freezer is refused, its processes are stopped with SIGSTOP and
        PartiallyApplied says so (the mitigation is in force, by the substitute)."""
        if m.kind not in FREEZE_KINDS:
            raise UnsupportedMitigation(f"the cgroup freezer does not enforce {m.kind.value}")
        cg = self.check(m.target)
        hold, _ = self._hold(cg)
        self._frozen[m.id] = m
        if hold.refused is not None:
            raise hold.substitute()

    def _hold(self, cg: Cgroup) -> tuple[Hold, set[stop.Ident]]:
        """Freeze `cg`, else stop its processes; its Hold and the processes found running
        and stopped now. Raises CgroupError for any failure but a refused freezer."""
        hold = self._holds.get(cg.path) or Hold()
        fresh: set[stop.Ident] = set()
        try:
            set_frozen(cg, True)
            hold.refused = None
        except FreezeRefused as e:
            hold.refused = str(e).split(": ", 1)[-1]
            got = stop.stop(cg.path, cg.fs_path, (), known=hold.stopped)
            hold.stopped |= got.stopped
            hold.holdouts, fresh = got.holdouts, got.fresh
        self._holds[cg.path] = hold
        self._watch(cg, hold)
        return hold, fresh

    @staticmethod
    def _watch(cg: Cgroup, hold: Hold) -> None:
        """Add the cgroup's processes to those followed; forget the dead."""
        hold.watched = {i for i in hold.watched if stop.identity(i[0]) == i}
        hold.watched |= {i for p in stop.members(cg.fs_path)
                         if (i := stop.identity(p)) is not None}

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
            self._release(path)

    def _release(self, path: str) -> bool:
        """Thaw `path` (if this enforcer froze it) and continue what it stopped; whether
        anything was released."""
        hold = self._holds.pop(path, None)
        done = False
        if hold is None or hold.refused is None:
            done = self._thaw(path)
        if hold is not None:
            done = stop.resume(hold.stopped) > 0 or done
        return done

    def reconcile(self, desired: Sequence[Mitigation], now: float) -> Drift:
        """Freeze every desired cgroup that is not frozen; thaw those we froze that are no
        longer desired. Desired cgroups that no longer exist are skipped."""
        drift = Drift()
        want: dict[str, Mitigation] = {}
        for m in desired:
            if m.kind in FREEZE_KINDS and (m.expires_at is None or m.expires_at > now):
                want[m.id] = m
        paths: set[str] = set()
        first: CgroupError | None = None
        for m in want.values():
            try:
                cg = self.check(m.target)
            except CgroupError:
                continue
            if cg.path in paths:
                continue
            paths.add(cg.path)
            try:
                self._repair(cg, m, drift)
            except CgroupError as e:
                log.error("cannot hold cgroup", extra={"cgroup": cg.path, "error": str(e)})
                first = first or e
        for m in self._frozen.values():
            path = _norm_or_none(m.target)
            if path and path not in paths and self._release(path):
                drift.elements_removed.append(f"frozen:{path}")
        self._frozen = want
        if first is not None and not drift:
            raise first
        return drift

    def _repair(self, cg: Cgroup, m: Mitigation, drift: Drift) -> None:
        """Freeze `cg` again, or stop its processes again, when someone undid it; follow
        the processes that left it. Notes what the tenant did for the incident."""
        known = self._holds.get(cg.path)
        frozen = (cg.fs_path / "cgroup.freeze").read_text().strip() == "1"
        if frozen and known is not None and known.refused is None:
            self._watch(cg, known)
            hold = known
        elif frozen and known is None:
            hold, _ = self._hold(cg)           # after a restart: this agent froze it before
        else:
            hold, fresh = self._hold(cg)
            if hold.refused is None:
                drift.elements_added.append(f"frozen:{cg.path}")
                if known is not None:
                    drift.notes.append((m.id, f"cgroup {cg.path} was thawed by somebody "
                                              "else (cgroup.freeze set to 0): frozen again"))
            elif fresh:
                pids = sorted(p for p, _ in fresh)
                drift.elements_added.append(f"stopped:{cg.path}:{len(fresh)}")
                if known is not None:
                    drift.notes.append((m.id, f"processes {pids} of {cg.path} were running "
                                              "again (continued with SIGCONT, or moved in): "
                                              "stopped again with SIGSTOP"))
        self._follow(cg, m, hold, drift)

    def _follow(self, cg: Cgroup, m: Mitigation, hold: Hold, drift: Drift) -> None:
        """Stop, where they are now, the processes that left the held cgroup (a tenant
        moving them out of its delegated subtree): a frozen process moved out is thawed."""
        for ident, where in stop.escaped(cg.path, hold.watched):
            state = stop.stat(ident[0])
            if ident in hold.left and state is not None and state[0] in "Tt":
                continue
            if not stop.send(ident, signal.SIGSTOP):
                continue
            hold.stopped.add(ident)
            drift.elements_added.append(f"followed:{ident[0]}:{where}")
            again = "again " if ident in hold.left else ""
            hold.left[ident] = where
            drift.notes.append((m.id, f"process {ident[0]} left {cg.path} for {where} while "
                                      f"held: stopped {again}with SIGSTOP where it is (the "
                                      f"network of {where} is not cut)"))

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

    def hold(self, target: str) -> Hold | None:
        """How `target` is held now (None: not by this enforcer)."""
        path = _norm_or_none(target)
        return None if path is None else self._holds.get(path)


def _norm_or_none(target: str) -> str | None:
    try:
        return normalise(target)
    except CgroupError:
        return None


def pids(cg: Cgroup) -> list[int]:
    """The processes directly in `cg` (for reports and tests)."""
    text = (cg.fs_path / "cgroup.procs").read_text()
    return [int(p) for p in text.split()]

