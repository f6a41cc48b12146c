"""The bounded queue between the probes and the detector (agent.sources.queue): it never
holds more than its capacity, every drop is counted by kind and lane, a flood of one kind
or one owner can neither push the others out nor make them wait behind its backlog, and
the urgent lane is never pushed out by ordinary events."""
from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from agent.report.metrics import Metrics
from agent.sources.queue import EventQueue, Lanes
from agent.state.store import Store


def test_bounded_and_every_drop_counted() -> None:
    q: EventQueue[int] = EventQueue(100)
    accepted = sum(q.put("proc.exec", n) for n in range(1000))
    assert (len(q), accepted) == (100, 100)
    assert q.dropped == {"proc.exec": 900}
    assert q.status() == {"depth": 100, "depth_max": 100, "capacity": 100,
                          "dropped": {"proc.exec": 900},
                          "urgent": {"depth": 0, "depth_max": 0, "capacity": 64, "dropped": {}}}
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
    q: EventQueue[int] = EventQueue(2, urgent_capacity=1)
    for n in range(5):
        q.put("proc.exec", n)
    q.put("proc.exec", 5, urgent=True)
    q.put("proc.exec", 6, urgent=True)
    with Store(tmp_path / "agent.db") as store:
        text = generate_latest(Metrics(store, queue=q.status).registry).decode()
    assert 'swarm_agent_events_dropped_total{kind="proc.exec",lane="ordinary"} 3.0' in text
    assert 'swarm_agent_events_dropped_total{kind="proc.exec",lane="urgent"} 1.0' in text
    assert "swarm_agent_event_queue_depth 2.0" in text
    assert "swarm_agent_event_queue_depth_max 2.0" in text
    assert "swarm_agent_event_queue_capacity 2.0" in text


def test_a_tenants_storm_pushes_out_only_its_own_events() -> None:
    """Fair between (kind, owner): the storm's cgroup holds the most, so it pays."""
    q: EventQueue[str] = EventQueue(100)
    q.put("proc.exec", "other0", owner="job-7")
    for n in range(10_000):
        q.put("proc.exec", f"storm{n}", owner="job-42")
    assert q.put("proc.exec", "other1", owner="job-7")   # a storm exec leaves for it
    assert len(q) == 100 and q.dropped == {"proc.exec": 10_000 - 98}
    assert q.take(4) == ["other0", "storm1", "other1", "storm2"]   # storm0 made room


def test_the_urgent_lane_is_never_pushed_out_and_served_first() -> None:
    q: EventQueue[str] = EventQueue(64, urgent_capacity=4)
    for n in range(64):
        q.put("proc.exec", f"storm{n}", owner="job-42")
    assert q.put("proc.exec", "shell", owner="job-42", urgent=True)
    for n in range(10_000):
        q.put("proc.exec", f"late{n}", owner="job-42")
    assert q.urgent.dropped == {} and q.take(2) == ["shell", "storm0"]


def test_an_urgent_stream_slows_the_ordinary_lane_but_never_stops_it() -> None:
    q: EventQueue[str] = EventQueue(64, urgent_capacity=64)
    for n in range(64):
        q.put("proc.exec", f"u{n}", owner="job-42", urgent=True)
    q.put("net.source", "crossing")
    assert q.take(10) == [f"u{n}" for n in range(8)] + ["crossing", "u8"]


def test_the_urgent_lane_is_bounded_counted_and_fair_between_owners() -> None:
    q: EventQueue[str] = EventQueue(1024, urgent_capacity=8)
    for n in range(100):
        q.put("proc.exec", f"a{n}", owner="job-42", urgent=True)
    assert q.put("proc.exec", "b0", owner="job-7", urgent=True)
    assert len(q.urgent) == 8 and q.urgent.dropped == {"proc.exec": 93}
    assert q.dropped == {} and "b0" in q.take(8)


def test_the_largest_sub_queue_is_tracked_exactly() -> None:
    """The O(1) bucketed largest against a plain model, over random puts and takes."""
    rng = random.Random(9)
    q: Lanes[int] = Lanes(50)
    model: dict[str, list[int]] = {}
    for i in range(20_000):
        if rng.random() < 0.7:
            key = f"o{min(int(rng.expovariate(0.5)), 12)}"
            size = sum(map(len, model.values()))
            if size >= 50:
                biggest = max(map(len, model.values()))
                if len(model.get(key, ())) >= biggest:
                    assert not q.put("k", key, i)
                    continue
                victim = next(k for k, v in model.items() if len(v) == biggest
                              and ("k", k) == next(iter(q._by_size[biggest])))
                model[victim].pop(0)
            assert q.put("k", key, i)
            model.setdefault(key, []).append(i)
        elif len(q):
            item = q.take_one()
            assert any(v and v[0] == item for v in model.values())
            for v in model.values():
                if v and v[0] == item:
                    v.pop(0)
        model = {k: v for k, v in model.items() if v}
        assert q._largest == max(map(len, model.values()), default=0)
        assert len(q) == sum(map(len, model.values()))


def test_a_storm_over_ever_new_owners_costs_no_search() -> None:
    """Every put of a full lane of one-event sub-queues drops one: the turn keeps the
    emptied keys only until compacted, and the order of the rest holds."""
    q: Lanes[int] = Lanes(1000)
    for i in range(200_000):
        q.put("proc.exec", f"cg{i}", i)
        assert len(q._turn) <= 2 * 1000 + 16
    assert len(q) == 1000 and q.dropped == {"proc.exec": 199_000}
    assert [q.take_one() for _ in range(1000)] == list(range(199_000, 200_000))
