"""Per-window features of one entity (the node or one workload) and the bounded
never-seen sets they are measured against.

A workload is its container id where there is one, else its cgroup path; its *profile* is
the cgroup path with container and pod ids replaced by "*", so a new container of a known
kind (a job restarted in a new container) is scored by the model its predecessors trained.
Counts enter the models as log1p, scaled by a fixed cap to [0, 1]."""
from __future__ import annotations

import ipaddress
import math
import re
from collections import OrderedDict
from typing import Any, Iterable

# (name, cap of log1p(value)): the order is the models' vector order; ADD at the end.
FEATURES: tuple[tuple[str, float], ...] = (
    ("execs", math.log1p(1000)),
    ("new_exes", math.log1p(20)),            # never seen on this node
    ("new_exes_here", math.log1p(20)),       # seen on the node, never in this profile
    ("conns", math.log1p(5000)),             # outbound connection attempts
    ("fanout", math.log1p(1000)),            # distinct destinations (address, port)
    ("new_dsts", math.log1p(100)),           # destination /16 or /32 never seen here
    ("new_ports", math.log1p(50)),           # destination port never seen here
    ("failed", math.log1p(1000)),            # refused or failed connections
    ("egress_bytes", math.log1p(1e11)),
    ("new_dst_bytes", math.log1p(1e11)),     # egress to destinations never seen here
    ("new_listens", math.log1p(20)),         # a listening port never seen here
    ("gpu_procs", math.log1p(64)),           # processes newly on a GPU
    ("gpu_util", math.log1p(800)),
    ("gpu_unauth_bytes", math.log1p(1e12)),  # GPU memory of unauthorized use
)
EPHEMERAL = 32768
_DYNAMIC_LISTENS = ("4/ephemeral", "6/ephemeral")   # Window.listens' keys
# Directories packages install into and only root writes (not /usr/local, /opt, a home).
PACKAGE_DIRS = ("/usr/bin/", "/usr/sbin/", "/usr/lib/", "/usr/libexec/", "/usr/lib64/",
                "/bin/", "/sbin/", "/lib/", "/lib64/")
NAMES = tuple(n for n, _ in FEATURES)
INDEX = {n: i for i, n in enumerate(NAMES)}
DIM = len(FEATURES)

_ID = re.compile(r"[0-9a-f]{16,}|[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}"
                 r"[-_][0-9a-f]{12}")


_NUM = re.compile(r"\d+")


def profile_of(cgroup: str) -> str:
    """The cgroup path with container ids, pod uids and numbers (session-42.scope,
    user-1000.slice) replaced by "*": one profile for every instance of a kind."""
    return _NUM.sub("*", _ID.sub("*", cgroup))


# The smallest spread each feature is given (log1p units): a count that is usually 0
# going to 2 is not a 20-sigma event. Novelty features (a thing never seen) keep a small
# one (one new executable: about 5.5 sigma); counts move by a few for nothing; bytes by a
# factor of 10.
_NOVEL, _COUNT, _BYTES = math.log1p(1) / 5.5, math.log1p(3), math.log(10)
FLOORS_LOG = {"execs": _COUNT, "new_exes": _NOVEL, "new_exes_here": _NOVEL, "conns": _COUNT,
              "fanout": _COUNT, "new_dsts": _NOVEL, "new_ports": _NOVEL, "failed": _COUNT,
              "egress_bytes": _BYTES, "new_dst_bytes": _BYTES,
              "new_listens": math.log1p(1) / 10,   # a new service port: about 10 sigma
              "gpu_procs": _NOVEL, "gpu_util": math.log1p(10), "gpu_unauth_bytes": _BYTES}


def scale(raw: list[float]) -> list[float]:
    return [min(math.log1p(max(v, 0.0)) / cap, 1.0) for v, (_, cap) in zip(raw, FEATURES)]


def unscale(i: int, x: float) -> float:
    """A scaled feature value back in its own unit (for drivers)."""
    return math.expm1(x * FEATURES[i][1])


# A destination is "never seen" by its /16 (IPv4) or /32 (IPv6): CDNs and object stores
# hand out addresses from many /24s of the same provider block (a checkpoint upload, an
# apt mirror, a SaaS API land on a new /24 every few hours), which made /24 novelty a
# false alarm a day; a provider block never seen is still news. ADDING bits here changes
# the snapshot's signature (persist.signature).
PREFIX_V4, PREFIX_V6 = 16, 32


def prefix(addr: str) -> str:
    """The /16 (IPv4) or /32 (IPv6) of a destination; the text itself if not an address."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return addr
    bits = PREFIX_V4 if ip.version == 4 else PREFIX_V6
    return str(ipaddress.ip_network(f"{ip}/{bits}", strict=False))


class Novelty:
    """A bounded set of things seen (least recently seen evicted first)."""

    def __init__(self, limit: int, items: Iterable[str] = ()):
        self.limit = limit
        self.items: OrderedDict[str, None] = OrderedDict((i, None) for i in items)
        self.evicted = 0

    def __contains__(self, key: str) -> bool:
        return key in self.items

    def add(self, key: str) -> None:
        if key in self.items:
            self.items.move_to_end(key)
            return
        self.items[key] = None
        if len(self.items) > self.limit:
            self.items.popitem(last=False)
            self.evicted += 1

    def discard(self, key: str) -> None:
        self.items.pop(key, None)

    def __len__(self) -> int:
        return len(self.items)

    def dump(self) -> list[str]:
        return list(self.items)


class Window:
    """What one entity did in the open window; `vector()` turns it into features against
    the never-seen sets (`known` is the profile's, `node` the node-wide ones)."""

    __slots__ = ("execs_counted", "execs_seen", "exes", "conns", "dsts", "failed",
                 "bytes_by_dst", "close_bytes_by_dst", "listens", "gpu_procs", "gpu_util",
                 "gpu_unauth", "active")

    def __init__(self) -> None:
        self.execs_counted = 0     # the kernel's per-cgroup count (activity.counts)
        self.execs_seen = 0        # exec events
        self.exes: dict[str, dict[str, Any]] = {}      # exe key -> {exe, exe_id, sha256}
        self.conns = 0
        self.dsts: dict[tuple[str, int], int] = {}     # (address, port) -> connections
        self.failed = 0
        self.bytes_by_dst: dict[tuple[str, int], int] = {}      # flow.bytes
        self.close_bytes_by_dst: dict[tuple[str, int], int] = {}  # flow.close
        self.listens: set[str] = set()
        self.gpu_procs = 0
        self.gpu_util = 0.0
        self.gpu_unauth = 0.0
        self.active = False

    def add(self, kind: str, f: dict[str, Any], subject: str, system: bool = False,
            login: bool = False) -> None:
        """One event; `system`: an exec that is no news as a program (AnomalyEngine:
        a package's program run by root in a host system service); `login`: a package's
        program in a host login session (login_program)."""
        self.active = True
        if kind in ("proc.exec", "activity.exec_new"):
            if kind == "proc.exec":
                self.execs_seen += 1
            key = exe_key(f)
            if key and len(self.exes) < 256:
                info = self.exes.setdefault(key, {"exe": f.get("exe"), "exe_id": f.get("exe_id"),
                                                  "exe_sha256": f.get("exe_sha256"),
                                                  "system": True, "login": True})
                if not system:
                    info["system"] = False
                if not login:
                    info["login"] = False
        elif kind == "activity.counts":
            self.execs_counted += _int(f.get("execs"))
        elif kind == "flow.connect":
            dst = (str(f.get("daddr") or subject), _int(f.get("dport")))
            self.conns += 1
            if len(self.dsts) < 4096 or dst in self.dsts:
                self.dsts[dst] = self.dsts.get(dst, 0) + 1
            if f.get("outcome") in ("refused", "failed"):
                self.failed += 1
        elif kind == "flow.close":
            dst = (str(f.get("daddr") or subject), _int(f.get("dport")))
            if len(self.close_bytes_by_dst) < 4096 or dst in self.close_bytes_by_dst:
                self.close_bytes_by_dst[dst] = self.close_bytes_by_dst.get(dst, 0) + \
                    _int(f.get("bytes_out"))
        elif kind == "flow.bytes":
            dst = (str(f.get("daddr") or subject), _int(f.get("dport")))
            if len(self.bytes_by_dst) < 4096 or dst in self.bytes_by_dst:
                self.bytes_by_dst[dst] = self.bytes_by_dst.get(dst, 0) + _int(f.get("bytes_out"))
        elif kind == "flow.listen":
            port = _int(f.get("port"))
            # Ephemeral ports (NCCL, RPC frameworks) are drawn at random on every start: as
            # one key per family, a new one is not news, a new fixed port is.
            self.listens.add(f"{f.get('family', 4)}/{'ephemeral' if port >= EPHEMERAL else port}")
        elif kind == "gpu.process":
            self.gpu_procs += 1
        elif kind == "gpu.usage":
            self.gpu_util = max(self.gpu_util, float(f.get("gpu_util") or 0))
            if f.get("authorized") is False:
                self.gpu_unauth = max(self.gpu_unauth, float(f.get("gpu_memory_bytes") or 0))

    def egress(self, use_kernel_bytes: bool) -> dict[tuple[str, int], int]:
        """Bytes sent per destination: the kernel's per-destination counts where the kernel
        gives them (flow.bytes), else what closed connections carried."""
        return self.bytes_by_dst if use_kernel_bytes else self.close_bytes_by_dst

    def vector(self, known: "Known", node: "Known", use_kernel_bytes: bool,
               seen: "Novelty | frozenset" = frozenset(),
               rotating: frozenset[int] = frozenset(),
               fresh: "dict[str, int] | frozenset" = frozenset()) -> tuple[list[float], dict]:
        """Raw features and what was new (for evidence and for committing to the sets).
        `seen`: what this workload's findings already reported, and its image's programs
        (no news to it again); `rotating`: ports on which its destinations rotate by design (a
        new one there is no news: AnomalyConfig.rotating_services); `fresh`: blocks first
        reached, never seen, a few minutes ago (Profile.fresh): bytes to them count as
        bytes to never-seen destinations, and the block as news (unless in `seen`: what
        was reported is no news to its kind)."""
        unseen = [k for k, i in self.exes.items() if k not in known.exes and k not in seen
                  and not i["system"]]
        new_node = [k for k in unseen if k not in node.exes]
        # (a login session's package program the node knows is no news to it: see
        # login_program)
        new_here = [k for k in unseen if k in node.exes and not self.exes[k]["login"]]
        egress = self.egress(use_kernel_bytes)
        dsts = set(self.dsts) | set(egress)
        pfx = {a: prefix(a) for a in {a for a, _ in dsts} if a}    # each address parsed once
        new_pfx = {pfx[a] for a, p in dsts if a and p not in rotating
                   and pfx[a] not in known.dsts and pfx[a] not in seen}
        # A dynamic port (>= EPHEMERAL) names no service. A kind that listens on dynamic
        # ports itself is peer-to-peer (NCCL, Gloo, Ray): its peers' dynamic ports at a
        # known destination are no news (a training job's first NCCL peers, a crashed
        # job's ranks reconnecting). To any other kind, and to a never-seen destination,
        # the first dynamic port is (a C2 relay in the cluster's own block on 45700).
        peer = any(k in known.listens or k in self.listens for k in _DYNAMIC_LISTENS)
        new_ports = {port_key(p) for a, p in dsts if p and port_key(p) not in known.ports
                     and (p < EPHEMERAL or not peer or pfx.get(a) in new_pfx)}
        new_bytes, fresh_sent = 0, set()
        for (a, _), b in egress.items():
            block = pfx.get(a)
            if block in new_pfx:
                new_bytes += b
            elif block in fresh and block not in seen and b > 0:
                new_bytes += b
                fresh_sent.add(block)
        new_listens = [p for p in self.listens if p not in known.listens and p not in seen]
        raw = [0.0] * DIM
        raw[0] = max(self.execs_counted, self.execs_seen)
        raw[1], raw[2] = len(new_node), len(new_here)
        raw[3], raw[4] = self.conns, len(dsts)
        raw[5], raw[6] = len(new_pfx), len(new_ports)
        raw[7] = self.failed
        raw[8] = sum(egress.values())
        raw[9] = new_bytes
        raw[10] = len(new_listens)
        raw[11], raw[12], raw[13] = self.gpu_procs, self.gpu_util, self.gpu_unauth
        # (a fresh block that carried bytes is news: a decoy finding's dedup must not
        # swallow the export that follows it)
        new = {"exes": new_node + new_here, "dsts": sorted(new_pfx | fresh_sent),
               "ports": sorted(new_ports),
               "listens": sorted(new_listens)}
        return raw, new


class Known:
    """The never-seen sets of one profile (or of the node)."""

    def __init__(self, limit: int, d: dict[str, list[str]] | None = None):
        d = d or {}
        self.exes = Novelty(limit, d.get("exes", ()))
        self.dsts = Novelty(limit, d.get("dsts", ()))
        self.ports = Novelty(limit, d.get("ports", ()))
        self.listens = Novelty(limit, d.get("listens", ()))

    def commit(self, w: Window, use_kernel_bytes: bool, *skip) -> None:
        """What the window saw becomes known, but for what is in any of `skip` (sets of
        what findings reported)."""
        skip = Either(*skip)
        for k in w.exes:
            if k not in skip:
                self.exes.add(k)
        for a, p in set(w.dsts) | set(w.egress(use_kernel_bytes)):
            if a and prefix(a) not in skip:
                self.dsts.add(prefix(a))
            if p and port_key(p) not in skip:
                self.ports.add(port_key(p))
        for p in w.listens:
            if p not in skip:
                self.listens.add(p)

    def add_items(self, new: dict[str, list[str]], *skip) -> None:
        """Items of a window's "new" (vector()) become known, but for those in `skip`."""
        skip = Either(*skip)
        for name in ("exes", "dsts", "ports", "listens"):
            for item in new.get(name) or ():
                if item not in skip:
                    getattr(self, name).add(item)

    def dump(self) -> dict[str, list[str]]:
        return {"exes": self.exes.dump(), "dsts": self.dsts.dump(), "ports": self.ports.dump(),
                "listens": self.listens.dump()}

    def size(self) -> int:
        return len(self.exes) + len(self.dsts) + len(self.ports) + len(self.listens)


class Either:
    """Membership in any of several sets (without building their union)."""

    __slots__ = ("sets",)

    def __init__(self, *sets) -> None:
        self.sets = sets

    def __contains__(self, key: str) -> bool:
        return any(key in s for s in self.sets)


def package_path(path: str) -> bool:
    """A path under the directories packages install into (PACKAGE_DIRS), not walked out."""
    return path.startswith(PACKAGE_DIRS) and "/../" not in path


def _host_package_exec(f: dict[str, Any]) -> str | None:
    """The cgroup of an exec of a package's file (PACKAGE_DIRS, not deleted) in no
    container, else None."""
    path, cgroup = f.get("exe"), f.get("cgroup")
    if f.get("container") or f.get("container_id") or not isinstance(path, str) or \
            not isinstance(cgroup, str) or not package_path(path) or path.endswith(" (deleted)"):
        return None
    return cgroup


_LOGIN_SESSION = re.compile(r"/user\.slice/user-\d+\.slice/session-[^/]+\.scope")


def login_program(f: dict[str, Any]) -> bool:
    """An exec of a package's program (only root writes there) in a host login session
    (systemd-logind's session-N.scope: an operator's ssh or console shell). A program the
    node already knows is no news to such a session (new_exes_here): what a person runs
    at a shell is theirs to choose, and the session kind learns its set only a few
    sessions a week (the 16 node-day eval's ssh sessions were 5 of its 5 false
    investigations, 2 of them only that). A program the node never ran (new_exes), a
    file outside the package directories (a download in a home, /tmp), and the session's
    destinations, ports and listeners are news as before. Residual risk, in the README:
    an intruder's login session running the node's own programs raises no
    never-seen-program signal (its network novelty still does)."""
    cgroup = _host_package_exec(f)
    return cgroup is not None and _LOGIN_SESSION.fullmatch(cgroup) is not None


def system_program(f: dict[str, Any]) -> bool:
    """An exec of a package's program by root in a host system service (a cgroup under
    /system.slice/, no container): a daily job's first logrotate, an upgrade's first dpkg
    (the engine adds: a path that ran before as another file is not one; replaced.py
    judges that). It is no news as a program (AnomalyEngine: the
    destinations, listeners and volume of that service still are): only root puts a file
    there or runs a unit there, and root on the host has other ways in anyway. A non-root
    service (an exploited www-data daemon), a user's session, a container, or a program
    outside the package directories (/usr/local, /opt, /tmp) is news as before."""
    cgroup = _host_package_exec(f)
    if cgroup is None or not cgroup.startswith("/system.slice/"):
        return False
    # real and effective uid both root (where given): a setuid program run by a service
    # account is not root's run
    ids = [f[k] for k in ("uid", "euid") if f.get(k) is not None]
    try:
        return bool(ids) and all(int(i) == 0 for i in ids)
    except (TypeError, ValueError):
        return False


def port_key(port: int) -> str:
    """A destination port for novelty: service ports each, ephemeral ones (peers' dynamic
    ports: NCCL, load-balanced streams) as one."""
    return "ephemeral" if port >= EPHEMERAL else str(port)


def exe_key(f: dict[str, Any]) -> str:
    """An executable's identity: its content hash where known, else the kernel file id."""
    sha = f.get("exe_sha256")
    if sha:
        return f"sha256:{sha}"
    ident = f.get("exe_id")
    return f"id:{ident}" if ident else ""


def _int(v: Any) -> int:
    try:
        return int(v or 0)
    except (TypeError, ValueError):
        return 0


FLOORS = [FLOORS_LOG[n] / cap for n, cap in FEATURES]   # scaled units
