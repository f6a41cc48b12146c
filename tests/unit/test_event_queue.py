"""The bounded queue between the probes and the detector (agent.sources.queue): it never
holds more than its capacity, every drop is counted by kind, and a flood of one kind can
neither push the other kinds out nor make them wait behind its backlog."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from agent.report.metrics import Metrics
from agent.sources.queue import EventQueue
from agent.state.store import Store


def test_bounded_and_every_drop_counted() -> None:
    q: EventQueue[int] = EventQueue(100)
    accepted = sum(q.put("proc.exec", n) for n in range(1000))
    assert (len(q), accepted) == (100, 100)
    assert q.dropped == {"proc.exec": 900}
    assert q.status() == {"depth": 100, "depth_max": 100, "capacity": 100,
                          "dropped": {"proc.exec": 900}}
    # A single kind is first in, first out: the oldest are kept, the newest dropped.
    assert q.take(1000) == list(range(100))
    assert len(q) == 0 and q.status()["depth_max"] == 100


def test_a_flood_of_one_kind_cannot_push_out_another() -> None:
    q: EventQueue[str] = EventQueue(64)
    for n in range(64):
        q.put("proc.exec", f"exec{n}")
    # Full of execs: a threshold crossing still gets in, an exec leaves to make room.
    assert q.put("net.source", "crossing")
    assert q.dropped == {"proc.exec": 1}
    for n in range(10_000):                 # the flood goes on
        q.put("proc.exec", f"late{n}")
    assert len(q) == 64 and q.dropped["proc.exec"] == 10_001
    assert "net.source" not in q.dropped
    assert q.depth() == {"proc.exec": 63, "net.source": 1}
    # Served round robin: the crossing comes second, not after 63 execs.
    assert q.take(2) == ["exec1", "crossing"]


def test_a_full_queue_drops_from_the_kind_holding_most() -> None:
    q: EventQueue[str] = EventQueue(6)
    for kind, n in (("a", 3), ("b", 2), ("c", 1)):
        for i in range(n):
            q.put(kind, f"{kind}{i}")
    assert q.put("c", "c1")                 # "a" holds the most: its oldest goes
    assert q.dropped == {"a": 1}
    assert not q.put("a", "a9")             # "a" and "c" now tie with "b": the incoming drops
    assert q.dropped == {"a": 2}
    assert sorted(q.take(10)) == ["a1", "a2", "b0", "b1", "c0", "c1"]


def test_round_robin_keeps_each_kinds_order() -> None:
    q: EventQueue[str] = EventQueue(100)
    for i in range(3):
        q.put("a", f"a{i}")
    q.put("b", "b0")
    q.put("c", "c0")
    assert q.take(100) == ["a0", "b0", "c0", "a1", "a2"]


def test_wait_wakes_on_put_and_sleeps_when_empty() -> None:
    async def main() -> None:
        q: EventQueue[int] = EventQueue(4)
        waiter = asyncio.create_task(q.wait())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        q.put("k", 1)
        await asyncio.wait_for(waiter, 1)
        q.take(1)
        again = asyncio.create_task(q.wait())
        await asyncio.sleep(0.01)
        assert not again.done()
        again.cancel()

    asyncio.run(main())


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        EventQueue(0)


def test_the_queue_in_the_metrics(tmp_path: Path) -> None:
    q: EventQueue[int] = EventQueue(2)
    for n in range(5):
        q.put("proc.exec", n)
    with Store(tmp_path / "agent.db") as store:
        text = generate_latest(Metrics(store, queue=q.status).registry).decode()
    assert 'swarm_agent_events_dropped_total{kind="proc.exec"} 3.0' in text
    assert "swarm_agent_event_queue_depth 2.0" in text
    assert "swarm_agent_event_queue_depth_max 2.0" in text
    assert "swarm_agent_event_queue_capacity 2.0" in text
