"""A seeded, deterministic node-day generator: the benign activity of one GPU node (a
training job, a web service and its clients, cron, package updates, metrics scrapes and
remote write, NTP, DNS, the agent's mesh channel, an operator's ssh sessions) over one or
more consecutive days, optionally with injected suspicious behaviours and their ground
truth, as the agent.model.Event stream the probes would deliver (CONTRACT11.md shapes:
flow.connect/close/listen/bytes, activity.exec_new/counts, proc.exec, gpu.process,
gpu.usage), in time order, with CLOCK_MONOTONIC times from `base_ns`.

    day = NodeDay(seed=1, days=1, inject=BEHAVIOURS, warmup_s=3600)
    for event in day.events(): ...
    day.truth      # [Behaviour], filled as the events are generated (complete at the end)

The same seed gives the same benign events with or without injections (every activity has
its own random generator and the attacker's processes their own pids), so a finding in the
injected run that the benign run did not raise is the injection's doing.
Memory stays small: actions are generated an hour at a time and merged by time.
"""
from __future__ import annotations

import heapq
from typing import Iterable, Iterator

from agent.model import Event
from swarmlab.nodeday import attacks
from swarmlab.nodeday.attacks import BEHAVIOURS, Behaviour
from swarmlab.nodeday.kernel import NS, Kernel
from swarmlab.nodeday.node import DAY_S, Node
from swarmlab.nodeday.system import system
from swarmlab.nodeday.workloads import Training, Web

__all__ = ["BEHAVIOURS", "Behaviour", "NodeDay", "DAY_S"]
BASE_NS = 5_000 * NS       # the node booted 5000 s before the day begins


class _Injector:
    """Schedules each behaviour once a day in its own slot of the day (after the warm-up on
    day 0), low_and_slow once, during the warm-up, running to the end."""

    def __init__(self, day: "NodeDay", names: Iterable[str],
                 schedule: Iterable[tuple[float, str]] | None = None):
        self.day, self.node = day, day.node
        self.rng = self.node.rng("inject")
        self.plan: list[tuple[float, str]] = []
        names = list(names) + [n for _, n in schedule or ()]
        unknown = set(names) - set(BEHAVIOURS)
        if unknown:
            raise ValueError(f"unknown behaviour(s) {sorted(unknown)}: known are {', '.join(BEHAVIOURS)}")
        if schedule is not None:      # explicit times (seconds since t = 0)
            self.plan = sorted((float(t), n) for t, n in schedule)
            return
        if "low_and_slow" in names:
            self.plan.append((min(1200.0, day.warmup_s / 3), "low_and_slow"))
        daily = [n for n in names if n in attacks.INJECT]
        for d in range(day.days):
            lo = d * DAY_S + (day.warmup_s + 1800 if d == 0 else 0)
            hi = (d + 1) * DAY_S - 2400
            if not daily or hi <= lo:
                continue
            slot = (hi - lo) / len(daily)
            for i, name in enumerate(self.rng.sample(daily, len(daily))):
                self.plan.append((lo + i * slot + self.rng.uniform(0, slot * 0.6), name))
        self.plan.sort()

    def hour(self, t0: float, t1: float) -> list:
        out = []
        for t, name in [p for p in self.plan if t0 <= p[0] < t1]:
            rng = self.node.rng(f"inject:{name}:{t:.3f}")
            if name == "low_and_slow":   # runs to the end (or its container's)
                acts, truth = attacks.low_and_slow(self.node, rng, self.day.web, self.day.training,
                                                   t, self.day.days * DAY_S)
            else:
                acts, truth = attacks.INJECT[name](self.node, rng, self.day.web, self.day.training, t)
            truth.start_ns = self.day.base_ns + int(truth.start_s * NS)
            truth.end_ns = self.day.base_ns + int(truth.end_s * NS)
            self.day.truth.append(truth)
            out += acts
        return out


class NodeDay:
    def __init__(self, seed: int = 1, days: int = 1, inject: Iterable[str] = (),
                 warmup_s: float = 3600.0, base_ns: int = BASE_NS, node: str = "gpu-node-07",
                 schedule: Iterable[tuple[float, str]] | None = None):
        """`inject`: behaviours scheduled once a day (low_and_slow once, during the
        warm-up); `schedule`: [(t_s, behaviour)] at explicit times instead."""
        if days < 1:
            raise ValueError("days must be at least 1")
        self.seed, self.days, self.warmup_s, self.base_ns = seed, days, warmup_s, base_ns
        self.node = Node(seed, node)
        self.web = Web(self.node, days)
        self.training = Training(self.node, days)
        self.activities = [self.web, self.training, *system(self.node, self.web)]
        self.truth: list[Behaviour] = []
        self.injector = _Injector(self, inject, schedule) if inject or schedule else None
        self.end_ns = base_ns + int(days * DAY_S * NS)

    def events(self, hours: float | None = None) -> Iterator[Event]:
        """The node's events in time order (all days, or the first `hours`)."""
        kernel = Kernel(self.base_ns)
        acts = self.activities + ([self.injector] if self.injector else [])
        heap: list = []
        span = self.days * DAY_S if hours is None else min(self.days * DAY_S, hours * 3600)
        t0 = 0.0
        while t0 < span:
            t1 = min(span, t0 + 3600.0)
            for a in acts:
                for action in a.hour(t0, t0 + 3600.0):
                    heapq.heappush(heap, action)
            while heap and heap[0][0] < t1:
                action = heapq.heappop(heap)
                for ev in kernel.feed(action):
                    kernel.events += 1
                    yield ev
            t0 = t1
        for ev in kernel.until(span):
            yield ev
