"""Executables a package manager replaced: a new file at a path the host already ran.

An upgrade (apt, dpkg) gives /usr/bin/curl a new inode and hash; without this, the next
cron run of curl is "an executable never seen on this node". A new file counts as the old
one's replacement only when ALL of these hold (narrow on purpose; an attacker can ride
anything wider):
- it runs in no container (host cgroups only: a container's root cannot plant it);
- its path is in a directory packages install into and only root writes (PACKAGE_DIRS:
  /usr/bin, /usr/lib..., not /usr/local, /opt or a home): a host user's own tool at
  ~/bin/tool, replaced by that user after the daily unattended upgrade, stays new;
- the same path ran before, as a file the node knew, on the same device (same filesystem)
  but another inode: dpkg and rpm write a new file and rename it over the old one, never
  in place (a file rewritten in place by whoever could write it stays new);
- a package manager (PACKAGE_MANAGERS, itself a file the node knew) ran on the host as
  root (a user's `dpkg -l` installs nothing) AFTER that last run of the old file and at
  most REPLACE_WITHIN_S before this one.
Residual risk, said plainly: root on the host who overwrites a binary in place (same path,
same filesystem) after a package manager ran and before the binary's next run is not
reported as a new executable (its other features, connections and listeners, still are);
root on the host has other ways in anyway. What is accepted is counted (status
"replaced_exes") and the path's history is bounded (least recently run evicted)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

from agent.detect.anomaly.features import Known, exe_key, package_path

PACKAGE_MANAGERS = frozenset(("/usr/bin/dpkg", "/bin/dpkg", "/usr/bin/rpm", "/bin/rpm",
                              "/sbin/apk", "/usr/bin/pacman"))
REPLACE_WITHIN_S = 26 * 3600     # a daily job runs the upgraded binary up to a day later


def _dev(exe_id: Any) -> str:
    """The device part of a kernel file id ("259:2:131000" -> "259:2")."""
    return str(exe_id).rsplit(":", 1)[0] if exe_id else ""


def _root(f: dict[str, Any]) -> bool:
    """Run as root (effective uid where the event has it)."""
    uid = f.get("euid", f.get("uid"))
    return uid is not None and int(uid) == 0


class Replacements:
    def __init__(self, limit: int, d: dict[str, Any] | None = None):
        d = d or {}
        self.limit = limit
        # path -> [key, file id, last_ns]; kept across restarts (the engine's state): a
        # file changed in place while the agent was down is still a changed file
        self.paths: OrderedDict[str, list] = OrderedDict(
            (str(p), [str(k), str(i), int(t)]) for p, k, i, t in d.get("paths", ())[-limit:])
        pm = d.get("pm_ns")
        self.pm_ns: int | None = None if pm is None else int(pm)   # last known PM run as root
        self.accepted = int(d.get("accepted", 0))

    def dump(self) -> dict[str, Any]:
        return {"paths": [[p, *v] for p, v in self.paths.items()], "pm_ns": self.pm_ns,
                "accepted": self.accepted}

    def rebase(self, delta: int) -> None:
        for v in self.paths.values():
            v[2] += delta
        if self.pm_ns is not None:
            self.pm_ns += delta

    def unchanged(self, f: dict[str, Any]) -> bool:
        """Whether the exec's path never ran before as another file (in this bounded
        history): a first run, or the same file again."""
        prev = self.paths.get(f.get("exe"))    # type: ignore[arg-type]
        return prev is None or prev[0] == exe_key(f)

    def exec(self, f: dict[str, Any], node: Known, now: int) -> str | None:
        """One exec on this host; the old file's key when its file was taken as a
        package's replacement (then known to the node; the engine makes it known to every
        profile that knew the old one), else None."""
        path, key = f.get("exe"), exe_key(f)
        if not key or not isinstance(path, str) or f.get("container") or f.get("container_id"):
            return None
        if not package_path(path):
            return None
        file_id = str(f.get("exe_id") or "")
        dev = _dev(file_id)
        accepted = None
        prev = self.paths.get(path)
        if key not in node.exes and prev is not None and prev[0] != key and dev and \
                _dev(prev[1]) == dev and prev[1] != file_id and prev[0] in node.exes and \
                self.pm_ns is not None and prev[2] <= self.pm_ns <= now and \
                now - self.pm_ns <= REPLACE_WITHIN_S * 1e9:
            node.exes.add(key)
            self.accepted += 1
            accepted = prev[0]
        if path in PACKAGE_MANAGERS and key in node.exes and _root(f):
            self.pm_ns = now
        self.paths[path] = [key, file_id, now]
        self.paths.move_to_end(path)
        if len(self.paths) > self.limit:
            self.paths.popitem(last=False)
        return accepted
