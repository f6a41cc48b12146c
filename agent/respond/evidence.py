"""The evidence bundle of an investigation: what a security team needs to decide quickly,
collected from /proc at the moment the investigation opens.

- processes: every process in the workloads involved (their cgroups, host-view paths, and
  the pids the findings name with their ancestors and descendants): pid, ppid, uid, exe
  (the kernel's /proc/PID/exe), start time, and comm and cmdline marked as the process's
  own claim (it can set them to anything); shown as a tree by ppid.
- sockets: their TCP and UDP sockets, read from /proc/PID/net/{tcp,tcp6,udp,udp6} (the
  process's own network namespace, once per namespace) and tied to pids by the socket
  inodes in /proc/PID/fd: listening sockets apart from connections.
- recent: the workload's recent exec/connect events (the anomaly engine's `recent`, asked
  for each "cgroup:<path>" involved, or "node").
- gpu: the processes on the GPUs at the GPU source's last sample.
- agent: the agent's counters at that moment.

Bounded: `deadline` (monotonic seconds) is checked between steps and what is gathered
until then is kept (truncated: "time"); the caller also stops waiting at the deadline, so
a read that blocks (a process stuck in a FUSE fault holds its mmap lock, and its cmdline
with it) costs a thread, never the investigation. The bundle's JSON is at most
`max_bytes`: the longest lists are halved until it fits, and `truncated` says which.
Collecting never raises: what cannot be read is left out, and `errors` counts it.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import time
from typing import Any, Callable, Iterable, Mapping

from agent import cgroupview

MAX_PROCESSES = 512
MAX_SOCKETS = 2048
MAX_TEXT = 512              # characters of a cmdline kept
MAX_ANCESTORS = 8           # a named process's parents shown above it
CLAIM = "the process's own claim"
TCP_STATES = {1: "established", 2: "syn_sent", 3: "syn_recv", 4: "fin_wait1", 5: "fin_wait2",
              6: "time_wait", 7: "close", 8: "close_wait", 9: "last_ack", 10: "listen",
              11: "closing"}
_HZ = os.sysconf("SC_CLK_TCK")


class Bundle:
    """What collection has gathered so far (read by the waiting side at its deadline)."""

    def __init__(self, targets: Mapping[str, Any]):
        self.data: dict[str, Any] = {"targets": dict(targets), "processes": [],
                                     "listening": [], "connections": [], "recent": [],
                                     "gpu_processes": [], "agent": {}, "truncated": [],
                                     "errors": 0, "complete": False}

    def snapshot(self, max_bytes: int) -> dict[str, Any]:
        out = json.loads(json.dumps(self.data, default=str))
        if not out["complete"] and "time" not in out["truncated"]:
            out["truncated"].append("time")
        return fit(out, max_bytes)


def targets_of(entity: str, evidence: Mapping[str, Any]) -> dict[str, list]:
    """The cgroups and pids a finding involves (host-view cgroup paths)."""
    cgroups: set[str] = set()
    pids: set[int] = set()
    scope = evidence.get("scope")
    for source in (scope if isinstance(scope, Mapping) else {}, evidence):
        cg = source.get("cgroup")
        cgroups.update(c for c in ([cg] if isinstance(cg, str) else cg or [])
                       if isinstance(c, str) and c.startswith("/"))
        for key in ("pid", "pids"):
            v = source.get(key)
            for p in ([v] if isinstance(v, int) else v if isinstance(v, list) else []):
                if isinstance(p, int) and not isinstance(p, bool) and p > 0:
                    pids.add(p)
    kind, _, value = entity.partition(":")
    if kind == "cgroup" and value.startswith("/"):
        cgroups.add(value)
    if kind == "pid" and value.isdigit():
        pids.add(int(value))
    kept = sorted(cgroups)[:16]
    # The keys the anomaly engine's recent() takes: the findings' entities.
    workloads = [f"cgroup:{c}" for c in kept] or (["node"] if entity == "node" else [])
    # The executables the finding names (kernel file ids): their processes come first
    # when a workload has more than MAX_PROCESSES (decoys must not push them out).
    exe_ids = set()
    for source in (scope if isinstance(scope, Mapping) else {}, evidence):
        v = source.get("exe_id")
        exe_ids.update(x for x in ([v] if isinstance(v, str) else v if isinstance(v, list)
                                   else []) if isinstance(x, str))
    return {"cgroups": kept, "pids": sorted(pids)[:64], "workloads": workloads,
            "exe_ids": sorted(exe_ids)[:16]}


def collect(bundle: Bundle, *, deadline: float, proc: str = "/proc",
            recent: Callable[[str], list] | None = None,
            gpu_processes: Callable[[], list] | None = None,
            counters: Mapping[str, Any] | None = None) -> None:
    """Fill `bundle` (see the module docstring); returns when done or past `deadline`."""
    d = bundle.data
    t = d["targets"]
    if counters is not None:
        d["agent"] = dict(counters)
    pids, ancestors = _members(proc, t["cgroups"], t["pids"], deadline, d)
    if len(pids) > MAX_PROCESSES:
        pids = _first_what_matters(proc, pids, set(t["pids"]), set(t.get("exe_ids") or ()),
                                   deadline)
    for pid in (pids[:MAX_PROCESSES] + ancestors):
        if time.monotonic() > deadline:
            return
        if (p := _process(proc, pid)) is not None:
            if pid in ancestors:
                p["ancestor"] = True         # shown for context: not the workload's own
            d["processes"].append(p)
        else:
            d["errors"] += 1
    if len(pids) > MAX_PROCESSES:
        d["truncated"].append(f"processes: {len(pids)} found, {MAX_PROCESSES} kept")
    if time.monotonic() > deadline:
        return
    _sockets(proc, [p["pid"] for p in d["processes"] if not p.get("ancestor")], deadline, d)
    for workload in t.get("workloads") or []:
        if recent is None or time.monotonic() > deadline:
            break
        try:
            d["recent"].extend(recent(workload) or [])
        except Exception:   # noqa: BLE001 -- another part's hook: never fail the bundle
            d["errors"] += 1
    if gpu_processes is not None:
        try:
            d["gpu_processes"] = list(gpu_processes())
        except Exception:   # noqa: BLE001
            d["errors"] += 1
    d["complete"] = True


def _first_what_matters(proc: str, pids: list[int], named: set[int], exe_ids: set[str],
                        deadline: float) -> list[int]:
    """`pids` with the ones a cut must keep first: those the finding names, those running
    an executable it names, then those holding sockets; each group in pid order."""
    def rank(pid: int) -> int:
        if pid in named:
            return 0
        if time.monotonic() > deadline:
            return 3
        try:
            if exe_ids:
                st = os.stat(f"{proc}/{pid}/exe")
                if f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}:{st.st_ino}" in exe_ids:
                    return 0
            fds = os.listdir(f"{proc}/{pid}/fd")
            if any(os.readlink(f"{proc}/{pid}/fd/{fd}").startswith("socket:")
                   for fd in fds[:256]):
                return 1
        except OSError:
            pass
        return 2
    return sorted(pids, key=lambda pid: (rank(pid), pid))


def _members(proc: str, cgroups: list[str], pids: list[int], deadline: float,
             d: dict[str, Any]) -> list[int]:
    """(pids in any of `cgroups` (or below), plus `pids` and their descendants; the
    named pids' ancestors up to MAX_ANCESTORS, not otherwise in), each in pid order."""
    found = set(p for p in pids if os.path.isdir(f"{proc}/{p}"))
    if not cgroups and not found:
        return [], []
    try:
        names = [int(n) for n in os.listdir(proc) if n.isdigit()]
    except OSError:
        names = []
    parent: dict[int, int] = {}
    for n in names:
        if time.monotonic() > deadline:
            d["truncated"].append("time: process scan")
            break
        if cgroups:
            cg = cgroupview.cgroup_of(n, proc)
            if cg is not None and any(cg == c or cg.startswith(c.rstrip("/") + "/")
                                      for c in cgroups):
                found.add(n)
        if pids and (ppid := _ppid(proc, n)) is not None:
            parent[n] = ppid
    named = set(pids) & found
    children: dict[int, list[int]] = {}
    for child, ppid in parent.items():
        children.setdefault(ppid, []).append(child)
    todo = list(named)                       # everything the named processes started
    while todo and len(found) <= MAX_PROCESSES:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    ancestors: set[int] = set()
    for pid in named:                        # and their ancestry, for context only
        up = parent.get(pid)
        for _ in range(MAX_ANCESTORS):
            if up is None or up <= 1 or up in found:
                break
            ancestors.add(up)
            up = parent.get(up)
    return sorted(found), sorted(ancestors)


def _ppid(proc: str, pid: int) -> int | None:
    stat = _read(f"{proc}/{pid}/stat", 512)
    if stat is None or ")" not in stat:
        return None
    try:
        return int(stat[stat.rindex(")") + 2:].split()[1])
    except (ValueError, IndexError):
        return None


def _read(path: str, limit: int = 65536) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode(errors="replace")
    except OSError:
        return None


def _process(proc: str, pid: int) -> dict[str, Any] | None:
    stat = _read(f"{proc}/{pid}/stat")
    if stat is None or ")" not in stat:
        return None
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    rest = stat[stat.rindex(")") + 2:].split()
    uid = None
    for line in (_read(f"{proc}/{pid}/status") or "").splitlines():
        if line.startswith("Uid:"):
            uid = int(line.split()[1])
            break
    try:
        exe: str | None = os.readlink(f"{proc}/{pid}/exe")
    except OSError:
        exe = None          # a kernel thread, or gone
    cmdline = (_read(f"{proc}/{pid}/cmdline", MAX_TEXT * 4) or "").replace("\0", " ").strip()
    return {"pid": pid, "ppid": int(rest[1]), "uid": uid, "exe": exe,
            "started_at": round(_boot_time() + int(rest[19]) / _HZ, 3),
            "cgroup": cgroupview.cgroup_of(pid, proc),
            "comm": comm, "cmdline": cmdline[:MAX_TEXT], "claims": CLAIM}


_BOOT: list[float] = []


def _boot_time() -> float:
    if not _BOOT:
        for line in (_read("/proc/stat") or "").splitlines():
            if line.startswith("btime "):
                _BOOT.append(float(line.split()[1]))
                break
        else:
            _BOOT.append(time.time() - time.monotonic())
    return _BOOT[0]


def _sockets(proc: str, pids: Iterable[int], deadline: float, d: dict[str, Any]) -> None:
    """Listening sockets and connections of `pids`, per network namespace read once."""
    owner: dict[int, int] = {}            # socket inode -> pid
    netns: dict[str, int] = {}            # namespace -> a pid in it
    for pid in pids:
        if time.monotonic() > deadline:
            d["truncated"].append("time: sockets")
            return
        try:
            fds = os.listdir(f"{proc}/{pid}/fd")
            ns = os.readlink(f"{proc}/{pid}/ns/net")
        except OSError:
            continue
        netns.setdefault(ns, pid)
        for fd in fds:
            try:
                link = os.readlink(f"{proc}/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                owner.setdefault(int(link[8:-1]), pid)
    kept = 0
    for ns, pid in netns.items():
        for name in ("tcp", "tcp6", "udp", "udp6"):
            for s in _table(f"{proc}/{pid}/net/{name}", name):
                who = owner.get(s.pop("inode"))
                if who is None:
                    continue
                if kept >= MAX_SOCKETS:
                    d["truncated"].append(f"sockets: more than {MAX_SOCKETS}")
                    return
                kept += 1
                s.update(pid=who, netns=ns)
                listening = s["state"] == "listen" or (s["proto"] == "udp" and not s["remote_port"])
                d["listening" if listening else "connections"].append(s)


def _table(path: str, name: str) -> list[dict[str, Any]]:
    """Rows of /proc/PID/net/{tcp,udp}[6]: local, remote, state, inode."""
    text = _read(path, 1 << 22) or ""
    proto, v6 = name.rstrip("6"), name.endswith("6")
    out = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 10:
            continue
        try:
            (la, lp), (ra, rp) = _endpoint(f[1], v6), _endpoint(f[2], v6)
            state = int(f[3], 16)
            inode = int(f[9])
        except ValueError:
            continue
        out.append({"proto": proto, "local": la, "local_port": lp, "remote": ra,
                    "remote_port": rp, "inode": inode,
                    "state": TCP_STATES.get(state, str(state)) if proto == "tcp"
                    else ("connected" if state == 1 else "unconnected")})
    return out


def _endpoint(text: str, v6: bool) -> tuple[str, int]:
    """"0100007F:1F90" -> ("127.0.0.1", 8080): the kernel prints the address as host-order
    32-bit words in hex."""
    addr, _, port = text.partition(":")
    raw = bytes.fromhex(addr)
    words = b"".join(struct.pack("@I", struct.unpack(">I", raw[i:i + 4])[0])
                     for i in range(0, len(raw), 4))
    family = socket.AF_INET6 if v6 else socket.AF_INET
    return socket.inet_ntop(family, words), int(port, 16)


def fit(bundle: dict[str, Any], max_bytes: int) -> dict[str, Any]:
    """Halve the longest list until the JSON fits in `max_bytes`; `truncated` says which."""
    lists = ("recent", "connections", "processes", "listening", "gpu_processes")
    found = {k: len(bundle.get(k) or []) for k in lists}
    while len(json.dumps(bundle, default=str)) > max_bytes:
        name = max(lists, key=lambda k: len(bundle.get(k) or []))
        items = bundle.get(name) or []
        if not items:
            bundle["agent"] = {"dropped": "agent counters left out to fit"}
            if len(json.dumps(bundle, default=str)) > max_bytes:
                bundle["targets"] = {"dropped": "too large"}
            break
        bundle[name] = items[:len(items) // 2]
        note = f"{name}: {found[name]} cut to {len(bundle[name])} to fit {max_bytes} bytes"
        bundle["truncated"] = [t for t in bundle["truncated"] if not t.startswith(name + ":")]
        bundle["truncated"].append(note)
    return bundle


def summary(b: Mapping[str, Any]) -> str:
    """One line for the timeline."""
    cut = " (truncated: " + "; ".join(b.get("truncated") or []) + ")" if b.get("truncated") else ""
    return (f"evidence: {len(b.get('processes') or [])} processes, "
            f"{len(b.get('listening') or [])} listening sockets, "
            f"{len(b.get('connections') or [])} connections, "
            f"{len(b.get('recent') or [])} recent events, "
            f"{len(b.get('gpu_processes') or [])} GPU processes{cut}")
