"""One worker process of bench/fleet_scale.py: `count` simulated fleet nodes on one asyncio
loop. Each is the agent's REAL FleetSubscriber (agent/fleet/subscriber.py) with its own
NATS connection (node user), its own ordered JetStream consumer from its own cursor, its
own agent Store (SQLite, the agent's schema, in a file of its own) and the agent's own
verify -> plan -> one SQLite transaction -> enforce path; the one substitution is the
enforcer: MemorySet, an in-memory set with FleetEnforcer's methods, standing in for the
nftables table of a real node (the kernel boundary of 1,000 nodes on one machine).

    python -m bench.fleet_sim '<json: index, count, url, user, password, key, state_dir, ...>'

Commands come on stdin, one JSON object a line; each gets one JSON line on stdout:
    {"op": "status"}                     how many connected, failures, RSS and CPU of this process
    {"op": "count", "target": T}         how many subscribers have T in force
    {"op": "times", "targets": [...]}    per subscriber: {target: [received, put in force]}
    {"op": "connects"}                   per subscriber: wall times it (re)connected
    {"op": "stop"}                       cancel everything, close the stores, exit
EOF on stdin stops it too. Clock: time.time() (CLOCK_REALTIME of this machine, the one the
orchestrator and nats-server stamp with).
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from agent import config as C
from agent.fleet.apply import Outcome
from agent.fleet.decision import subject_for
from agent.fleet.subscriber import FleetSubscriber
from agent.state.store import Store

WATCH_S = 0.02          # how often connection state is sampled


class MemorySet:
    """FleetEnforcer's contract (setup, change, update, reconcile, remove, blocks, allow, dry_run)
    over a dict: what a simulated node has "in force". Records the wall time each target
    was first put in force (`applied_at`)."""

    def __init__(self) -> None:
        self.dry_run = False
        self.blocks: dict[str, float] = {}
        self.allow: list[Any] = []
        self.applied_at: dict[str, float] = {}

    def setup(self, blocks: Mapping[str, float], allow: Iterable[Any], now: float) -> None:
        self.allow = list(allow)
        self.change(blocks, now)

    def change(self, new: Mapping[str, float], now: float) -> None:
        live = {t: e for t, e in new.items() if e > now}
        at = time.time()
        for t in live:
            if t not in self.blocks:
                self.applied_at.setdefault(t, at)
        self.blocks = live

    def update(self, delta: Mapping[str, float | None], now: float) -> None:
        at = time.time()
        for t, e in delta.items():
            if e is None or e <= now:
                self.blocks.pop(t, None)
            else:
                if t not in self.blocks:
                    self.applied_at.setdefault(t, at)
                self.blocks[t] = e

    def reconcile(self, allow: Iterable[Any], now: float) -> bool:
        self.allow = list(allow)
        self.blocks = {t: e for t, e in self.blocks.items() if e > now}
        return False

    def remove(self) -> None:
        self.blocks = {}


class TimedSubscriber(FleetSubscriber):
    """The agent's FleetSubscriber, unchanged but for a note of when each message was
    handed to apply() (received and read off the consumer, before verification): the
    delivery half of the propagation, apart from the node's own work."""

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.received: dict[str, float] = {}

    async def apply(self, msgs: list, **kw: Any) -> Outcome:  # type: ignore[override]
        at = time.time()
        for m in msgs:
            self.received.setdefault(m.subject, at)
        return await super().apply(msgs, **kw)


class Node:
    def __init__(self, name: str, sub: TimedSubscriber, enforcer: MemorySet, store: Store):
        self.name, self.sub, self.enforcer, self.store = name, sub, enforcer, store
        self.connects: list[float] = []
        self.task: asyncio.Task | None = None


def make_node(spec: dict[str, Any], i: int) -> Node:
    name = f"sim-{spec['index']}-{i}"
    state = Path(spec["state_dir"]) / name
    state.mkdir(parents=True, exist_ok=True)
    cfg = C.validate(C.Config(state_dir=str(state), fleet=C.FleetConfig(
        nats_url=spec["url"], user=spec["user"], password=spec["password"],
        keys=(spec["key"],), reconnect_initial_s=spec.get("reconnect_initial_s", 0.5),
        reconnect_max_s=spec.get("reconnect_max_s", 30.0))))
    store = Store(cfg.db_path)
    enforcer = MemorySet()
    allow = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network(spec["allow"])]
    sub = TimedSubscriber(cfg, store, enforcer, name, lambda: allow)  # type: ignore[arg-type]
    sub.start()
    return Node(name, sub, enforcer, store)


def cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def watch(nodes: list[Node]) -> None:
    """Samples each subscriber's `connected` and records when it became true."""
    was = [False] * len(nodes)
    while True:
        now = time.time()
        for k, n in enumerate(nodes):
            c = n.sub.connected
            if c and not was[k]:
                n.connects.append(now)
            was[k] = c
        await asyncio.sleep(WATCH_S)


def answer(nodes: list[Node], cmd: dict[str, Any]) -> dict[str, Any]:
    op = cmd.get("op")
    if op == "status":
        return {"subs": len(nodes), "connected": sum(n.sub.connected for n in nodes),
                "failures": sum(n.sub.failures for n in nodes),
                "refused": sum(sum(n.sub.refused.values()) for n in nodes),
                "snapshots": sum(n.sub.snapshots for n in nodes),
                "rss_kib": rss_kib(), "cpu_s": round(cpu_s(), 3)}
    if op == "count":
        return {"applied": sum(cmd["target"] in n.enforcer.applied_at for n in nodes)}
    if op == "times":       # per node: {target: [received, in force]} (null: not yet)
        subjects = {t: subject_for(t) for t in cmd["targets"]}
        return {"times": [{t: [n.sub.received.get(s), n.enforcer.applied_at.get(t)]
                           for t, s in subjects.items()
                           if t in n.enforcer.applied_at or s in n.sub.received}
                          for n in nodes]}
    if op == "connects":
        return {"connects": [n.connects for n in nodes]}
    return {"error": f"unknown op {op!r}"}


async def main(spec: dict[str, Any]) -> None:
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    t0 = time.monotonic()
    nodes = [make_node(spec, i) for i in range(spec["count"])]
    setup_s = time.monotonic() - t0
    watcher = asyncio.create_task(watch(nodes))
    ramp_s = spec.get("ramp_s", 0.0)
    for k, n in enumerate(nodes):
        n.task = asyncio.create_task(n.sub.run())
        if ramp_s:
            await asyncio.sleep(ramp_s / len(nodes))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ready": len(nodes), "setup_s": round(setup_s, 2)}), flush=True)
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            cmd = json.loads(line)
            if cmd.get("op") == "stop":
                break
            print(json.dumps(answer(nodes, cmd)), flush=True)
    finally:
        watcher.cancel()
        for n in nodes:
            if n.task is not None:
                n.task.cancel()
        await asyncio.gather(*(n.task for n in nodes if n.task), return_exceptions=True)
        for n in nodes:
            n.store.close()
        print(json.dumps({"stopped": len(nodes)}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
