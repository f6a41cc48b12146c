"""A small benign stream for the anomaly engine's tests: a web workload with Poisson
connections to its database and a cron service, and helpers that inject behaviours and
replay through the engine at accelerated time (the engine's clock is the events')."""
from __future__ import annotations

import random

from agent.detect.anomaly import AnomalyConfig, AnomalyEngine
from agent.model import Event

S = 10**9
WEB_ID = "a" * 24
WEB = f"/kubepods.slice/kubepods-pod1.slice/cri-containerd-{WEB_ID}.scope"
CRON = "/system.slice/cron.service"


def ev(kind: str, t: float, subject: str = "", **f) -> Event:
    return Event(kind=kind, subject=subject, mono_ns=int(t * S), first_mono_ns=int(t * S),
                 fields=f, source="activity")


def connect(t: float, dst: str, port: int, cgroup: str = WEB, container: str = WEB_ID,
            exe: str = "/usr/bin/web", exe_id: str = "8:1:100", size: int | None = None,
            **more):
    out = [ev("flow.connect", t, dst, daddr=dst, dport=port, outcome="established",
              cgroup=cgroup, container=container, exe=exe, exe_id=exe_id, **more)]
    if size is not None:
        out.append(ev("flow.close", t + 0.05, dst, daddr=dst, dport=port, outcome="closed",
                      bytes_out=size, bytes_in=200, cgroup=cgroup, container=container))
    return out


def benign(seed: int, t0: float, t1: float) -> list[Event]:
    r = random.Random(seed)
    out: list[Event] = []
    t = t0
    while t < t1:
        t += r.expovariate(2.0)
        out += connect(t, "10.0.0.5", 5432, size=int(r.expovariate(1 / 2000)))
    for c in range(int(t0 // 60) + 1, int(t1 // 60) + 1):
        out.append(ev("proc.exec", c * 60 + r.random(), "pid:1", exe="/bin/sh",
                      exe_id="8:1:9", exe_sha256="aa" * 32, cgroup=CRON))
    return out


def beacon(seed: int, t0: float, t1: float, period: float = 5.0, jitter: float = 0.3,
           dst: str = "203.0.113.7", port: int = 443, **kw) -> list[Event]:
    r = random.Random(seed)
    out, t = [], t0
    while t < t1:
        out += connect(t, dst, port, exe="/tmp/.x", exe_id="8:1:777", size=int(r.gauss(600, 20)),
                       **kw)
        t += period * r.uniform(1 - jitter, 1 + jitter)
    return out


def config(**over) -> AnomalyConfig:
    d = {"detectors": ["mahalanobis", "hst", "loda", "zscore", "newexe", "beacon", "drift"],
         "warmup_s": 1200, "warmup_windows": 60}
    d.update(over)
    return AnomalyConfig.from_dict(d)


def replay(eng: AnomalyEngine, events: list[Event], t0: float, t1: float,
           step: float = 0.5) -> list:
    """Feed events in time order and tick every `step` s of simulated time; the findings
    with the simulated time they came at."""
    events = sorted(events, key=lambda e: e.mono_ns)
    found, i = [], 0
    k0, k1 = int(t0 / step), int(t1 / step)
    for k in range(k0, k1):
        now = int(k * step * S)
        while i < len(events) and events[i].mono_ns <= now:
            eng.observe(events[i])
            i += 1
        for f in eng.tick(now):
            found.append((now / S, f))
    return found
