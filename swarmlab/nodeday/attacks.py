"""Injected suspicious behaviours, each with its ground truth (start = the attacker's first
action, end, the workload it runs in, its destination). They use the workload's own
identities where a real attacker would (its python for a beacon or an export: no new
binary to see), and attacker addresses in public hosting ranges the benign services never use, a new /16
for every trial.

- beacon:       an implant calling home every 4-8 s +- 30 % (new TCP connection each time,
                a few hundred bytes) from the web service's python, 10-30 min.
- exfil:        1-4 GB to a never-seen address in 60-180 s from a workload's own python.
- miner:        a new binary in the GPU job's container, a stratum pool connection, GPU
                memory and a process on the GPUs, 10-30 min.
- listener:     a bind shell in the web container: a socket listening on a new port, then
                a shell and a few commands through it a minute or two later.
- low_and_slow: an export of 20-80 KB every ~90 s +- 25 % to one address, started during
                the detector's warm-up and running to the end.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from swarmlab.nodeday.kernel import Cgroup
from swarmlab.nodeday.node import Node
from swarmlab.nodeday.workloads import PY, Training, Web

BEHAVIOURS = ("beacon", "exfil", "miner", "listener", "low_and_slow")
# First octets of public ranges none of the node's benign services use (hosting providers'):
# each trial's attacker address gets its own /16, so one trial's destination being seen
# never hides the next (no traffic is ever sent to them: the events are synthetic).
ATTACKER_FIRST_OCTETS = (5, 31, 37, 45, 46, 62, 77, 79, 80, 82, 85, 87, 89, 91, 92, 93, 94,
                         95, 109, 141, 146, 176, 178, 185, 188, 193, 194, 195, 212, 213, 217)


def attacker_addr(rng: random.Random) -> str:
    return (f"{rng.choice(ATTACKER_FIRST_OCTETS)}.{rng.randrange(256)}.{rng.randrange(256)}."
            f"{rng.randrange(1, 255)}")


@dataclass
class Behaviour:
    """Ground truth of one injected behaviour (times in seconds since the node's t = 0;
    start_ns/end_ns on the events' CLOCK_MONOTONIC)."""

    name: str
    start_s: float
    end_s: float
    cgroup: str
    container: str
    dst: str = ""
    dport: int = 0
    exe_sha256: str | None = None
    detail: str = ""
    start_ns: int = 0
    end_ns: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def _truth(name: str, start: float, end: float, cg: Cgroup, **kw) -> Behaviour:
    return Behaviour(name, start, end, cg.path, cg.container, **kw)


def beacon(node: Node, rng: random.Random, web: Web, train: Training, t: float):
    cg = web.at(t)
    p = node.proc(cg, node.image_exe(cg, cg.image, PY), 1000, "python3", attacker=True)
    dst, period, dur = attacker_addr(rng), rng.uniform(4, 8), rng.uniform(600, 1800)
    out: list = []
    s = t
    while s < t + dur:
        node.connection(out, rng, s, p, dst, 443, rng.uniform(0.1, 0.8), rng.randint(200, 600),
                        rng.randint(100, 2000), rtt_s=0.04)
        s += period * rng.uniform(0.7, 1.3)
    return out, _truth("beacon", t, t + dur, cg, dst=dst, dport=443, exe_sha256=p.exe.sha256,
                       detail=f"every {period:.1f} s +- 30% for {dur / 60:.0f} min")


def exfil(node: Node, rng: random.Random, web: Web, train: Training, t: float):
    job = train.at(t)
    if job is not None and rng.random() < 0.5:
        cg, exe = job.cg, train.exe(job, PY)
    else:
        cg = web.at(t)
        exe = node.image_exe(cg, cg.image, PY)
    p = node.proc(cg, exe, 1000, "python3", attacker=True)
    dst, size, dur = attacker_addr(rng), rng.randint(1, 4) * 2**30, rng.uniform(60, 180)
    out: list = []
    node.upload(out, rng, t, p, dst, 443, size, dur)
    return out, _truth("exfil", t, t + dur, cg, dst=dst, dport=443, exe_sha256=exe.sha256,
                       detail=f"{size / 2**30:.0f} GiB in {dur:.0f} s")


def miner(node: Node, rng: random.Random, web: Web, train: Training, t: float):
    job = train.at(t)
    if job is None:     # between jobs: the next one's container, once it runs
        job = next(j for j in train.jobs if j.start > t)
        t = job.start + 600
    # each trial's build differs (its pool and wallet are compiled in): a new hash each time
    exe = node.image_exe(job.cg, f"attacker:{rng.getrandbits(64):x}", "/tmp/.cache/kworkerd")
    p = node.proc(job.cg, exe, 1000, "kworkerd", attacker=True)
    dst, dport, dur = attacker_addr(rng), rng.choice((3333, 4444, 14444)), rng.uniform(600, 1800)
    out = [node.exec(t, p)]
    c = node.connection(out, rng, t + 0.5, p, dst, dport, dur, int(dur * 40), int(dur * 60), rtt_s=0.05)
    c.streamed = True
    out.append(node.act(t + 0.6, "stream", job.cg, dst, dport, "tcp", 40.0, 0.1, t + dur))
    out.append(node.act(t + 3, "gpu_proc", p, 0, 4 * 2**30))
    out.append(node.act(t + 3, "gpu_set", job.cg, 8 * 99.0, 8 * 70 * 2**30 + 4 * 2**30, True))
    return out, _truth("miner", t, t + dur, job.cg, dst=dst, dport=dport, exe_sha256=exe.sha256,
                       detail=f"new binary, pool {dst}:{dport}, GPU 0")


def listener(node: Node, rng: random.Random, web: Web, train: Training, t: float):
    cg = web.at(t)
    py = node.proc(cg, node.image_exe(cg, cg.image, PY), 1000, "python3", attacker=True)
    port = rng.choice((4444, 1337, 31337, rng.randrange(10000, 30000)))
    out = [node.act(t, "listen", py, port, "0.0.0.0")]
    s = t + rng.uniform(60, 150)
    for path in ("/bin/sh", "/usr/bin/id", "/bin/uname", "/bin/cat", "/bin/ls"):
        s += rng.uniform(1, 10)
        out.append(node.exec(s, node.proc(cg, node.image_exe(cg, cg.image, path), 1000, attacker=True)))
    return out, _truth("listener", t, s + 60, cg, dport=port, exe_sha256=py.exe.sha256,
                       detail=f"listening on tcp/{port}, a shell through it after a minute")


def low_and_slow(node: Node, rng: random.Random, web: Web, train: Training, t: float,
                 until: float):
    cg = web.at(t)
    p = node.proc(cg, node.image_exe(cg, cg.image, PY), 1000, "python3", attacker=True)
    dst = attacker_addr(rng)
    until = min([until] + [r for r in web.redeploys.values() if r > t])   # dies with its container
    out: list = []
    s = t
    while s < until:
        node.connection(out, rng, s, p, dst, 443, rng.uniform(0.3, 2), rng.randint(20_000, 80_000),
                        rng.randint(200, 800), rtt_s=0.04)
        s += 90 * rng.uniform(0.75, 1.25)
    return out, _truth("low_and_slow", t, until, cg, dst=dst, dport=443, exe_sha256=p.exe.sha256,
                       detail="20-80 KB every ~90 s +- 25 %, running since the warm-up")


INJECT = {"beacon": beacon, "exfil": exfil, "miner": miner, "listener": listener}
