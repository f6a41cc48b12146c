"""The simulated node's shared state: processes, cgroups, containers, executables (by
file id and content hash, as the kernel and the agent's hasher name them), addresses,
and the action helpers every activity uses. All randomness comes from per-activity
generators seeded from (seed, name), so a day is the same for the same seed whatever
else runs beside it (an injected behaviour does not change the benign events)."""
from __future__ import annotations

import hashlib
import itertools
import math
import random

from swarmlab.nodeday.kernel import Cgroup, Conn, Exe, Proc

DAY_S = 86400.0
NODE_ADDR = "10.0.1.7"

# Where the node talks to (benign). External services' addresses rotate inside their
# provider's ranges (CDNs, object storage, NTP pool): never-seen addresses are normal.
API_SERVER = "10.0.0.10"
RESOLVER = "10.0.0.2"
MESH = "10.0.0.50"
PROMETHEUS = "10.0.9.5"
REMOTE_WRITE = "10.0.9.6"
DB, CACHE = "10.0.2.20", "10.0.2.21"
LBS = ("10.0.1.101", "10.0.1.102", "10.0.1.103")
NFS = "10.0.4.10"
NCCL_PEERS = ("10.0.3.11", "10.0.3.12", "10.0.3.13")


def pool(prefixes: tuple[str, ...], rng: random.Random) -> str:
    """An address of a provider: one of its /24s, any host in it."""
    return f"{rng.choice(prefixes)}.{rng.randrange(1, 255)}"


def _nets(first: str, count: int, step: int = 1) -> tuple[str, ...]:
    a, b, c = (int(x) for x in first.split("."))
    return tuple(f"{a}.{b}.{c + i * step}" for i in range(count))


S3 = _nets("52.216.8", 24, 8) + _nets("3.5.0", 8, 16)     # object storage endpoints
DEBIAN_CDN = ("151.101.2", "151.101.66", "151.101.130", "151.101.194")   # deb.debian.org
REGISTRY_CDN = _nets("104.18.0", 6, 32)                    # container registry
WANDB = "35.186.228.49"                                    # experiment tracking
NTP_POOL = ("162.159.200", "185.125.190", "91.189.91", "193.182.111", "51.255.95",
            "139.59.199", "95.216.24", "5.9.80", "78.46.102", "23.131.160", "45.79.1", "69.89.207")
SAAS = _nets("54.230.0", 16, 16)                           # payment/email APIs (CDN)
GITHUB = ("140.82.112", "140.82.113", "140.82.114")
HEALTHCHECK = "159.89.123.45"


def diurnal(t: float) -> float:
    """Load in [0, 1], lowest around 04:00, highest around 16:00."""
    return 0.5 - 0.5 * math.cos(2 * math.pi * ((t % DAY_S) / 3600 - 4) / 24)


class Node:
    def __init__(self, seed: int, name: str = "gpu-node-07"):
        self.seed, self.name = seed, name
        self.seq = itertools.count()
        self.pids = itertools.count(1000)
        self.attacker_pids = itertools.count(700_000)    # benign pids stay the same
        self.cg_ids = itertools.count(4100)
        self.devs = itertools.count(60)          # overlayfs anonymous devices 0:N
        self.inodes = itertools.count(131_000)
        self.pod_ips = itertools.count(10)
        self.host_exes: dict[str, list[tuple[float, Exe]]] = {}   # path -> (since, file)
        self.upgrades = 0
        self.cgroups: dict[str, Cgroup] = {}

    def rng(self, name: str) -> random.Random:
        return random.Random(f"{self.seed}:{name}")

    # -- identities --------------------------------------------------------------------
    def host_exe(self, path: str, t: float | None = None) -> Exe:
        """A host executable as it is at time t (its latest file where t is None): an
        upgrade gives the path a new file (inode, hash) from the upgrade's time on. (The
        activities of an hour are generated one after another: a cron run after an
        upgrade in the same hour must run the new file, not the one it replaced.)"""
        versions = self.host_exes.get(path)
        if versions is None:
            versions = self.host_exes[path] = [
                (-math.inf, Exe(path, _sha(f"host:{path}:0"), f"259:2:{next(self.inodes)}"))]
        return next(e for since, e in reversed(versions) if t is None or since <= t)

    def upgrade(self, path: str, t: float) -> Exe:
        self.upgrades += 1
        exe = Exe(path, _sha(f"host:{path}:{self.upgrades}"), f"259:2:{next(self.inodes)}")
        since = t if path in self.host_exes else -math.inf    # never run before: its only file
        self.host_exes.setdefault(path, []).append((since, exe))
        return exe

    def cgroup(self, path: str, container: str = "", addr: str = NODE_ADDR) -> Cgroup:
        if path not in self.cgroups:
            self.cgroups[path] = Cgroup(path, next(self.cg_ids), container, addr)
        return self.cgroups[path]

    def container(self, kind: str, rng: random.Random, qos: str = "burstable") -> Cgroup:
        """A new pod container: its own cgroup, container id, overlay device, pod IP."""
        cid = "%064x" % rng.getrandbits(256)
        pod = "%032x" % rng.getrandbits(128)
        pod = f"{pod[:8]}_{pod[8:12]}_{pod[12:16]}_{pod[16:20]}_{pod[20:]}"
        if qos == "guaranteed":
            path = f"/kubepods.slice/kubepods-pod{pod}.slice/cri-containerd-{cid}.scope"
        else:
            path = (f"/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{pod}.slice/"
                    f"cri-containerd-{cid}.scope")
        cg = self.cgroup(path, cid, f"10.244.1.{next(self.pod_ips) % 250 + 2}")
        cg.dev = next(self.devs)       # type: ignore[attr-defined]
        cg.kind = kind                 # type: ignore[attr-defined]
        return cg

    def image_exe(self, cg: Cgroup, image: str, path: str) -> Exe:
        """A file of a container's image: the same content (hash) in every container of
        that image, a different file id in each (its own overlay)."""
        ino = int(hashlib.blake2b(f"{image}:{path}".encode(), digest_size=4).hexdigest(), 16) % 900_000
        return Exe(path, _sha(f"{image}:{path}"), f"0:{cg.dev}:{ino + 1000}")   # type: ignore[attr-defined]

    def proc(self, cg: Cgroup, exe: Exe, uid: int = 0, comm: str | None = None,
             argv: tuple[str, ...] = (), attacker: bool = False) -> Proc:
        pid = next(self.attacker_pids if attacker else self.pids)
        return Proc(pid, uid, (comm or exe.path.rsplit("/", 1)[-1])[:15], exe, cg, argv)

    # -- actions -----------------------------------------------------------------------
    def act(self, t: float, kind: str, *args) -> tuple:
        return (t, next(self.seq), kind, *args)

    def exec(self, t: float, p: Proc) -> tuple:
        return self.act(t, "exec", p)

    def connection(self, out: list, rng: random.Random, t: float, p: Proc, daddr: str,
                   dport: int, dur_s: float, bytes_out: int, bytes_in: int,
                   outcome: str = "established", rtt_s: float = 0.0005) -> Conn:
        """A whole short connection: its outcome, then (if established) its close."""
        c = Conn(p, daddr, dport, t, sport=rng.randrange(32768, 61000))
        if outcome == "established":
            out.append(self.act(t + rtt_s, "connect", c, outcome))
            out.append(self.act(t + rtt_s + dur_s, "close", c, bytes_out, bytes_in))
        elif outcome == "refused":
            out.append(self.act(t + rtt_s, "connect", c, outcome))
        else:    # "failed": the SYN retries ran out
            out.append(self.act(t + rng.choice((1.0, 3.0, 7.0)), "connect", c, outcome))
        return c

    def upload(self, out: list, rng: random.Random, t: float, p: Proc, daddr: str, dport: int,
               nbytes: int, dur_s: float, bytes_in: int = 20_000) -> Conn:
        """A connection that sends `nbytes` evenly over dur_s (a checkpoint, an export)."""
        c = Conn(p, daddr, dport, t, sport=rng.randrange(32768, 61000), streamed=True)
        out.append(self.act(t + 0.001, "connect", c, "established"))
        out.append(self.act(t + 0.001, "stream", p.cg, daddr, dport, "tcp", nbytes / dur_s,
                            max(1.0, nbytes / dur_s / 65536), t + 0.001 + dur_s))
        out.append(self.act(t + 0.002 + dur_s, "close", c, nbytes, bytes_in))
        return c


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def poisson_times(rng: random.Random, t0: float, t1: float, rate_at) -> list[float]:
    """Arrival times in [t0, t1) of a Poisson process with rate rate_at(t) (per second),
    by thinning, rate re-read every minute."""
    times, t = [], t0
    while t < t1:
        m1 = min(t1, t + 60.0)
        rate = rate_at(t)
        while rate > 0:
            t += rng.expovariate(rate)
            if t >= m1:
                break
            times.append(t)
        t = m1
    return times
