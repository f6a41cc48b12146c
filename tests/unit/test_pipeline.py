"""The agent's pipeline (agent.daemon: enqueue -> consume -> on_event) on real parts: the
shipped rules, a real store, the responder with the enforcer's dry-run twin, reporting
without a mesh. An event the detector cannot take (no subject) or a finding the responder
cannot (no time): what a decoder bug would hand them. Each is counted and logged, and
the events after it are still detected and answered."""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from agent.config import Config, Metrics
from agent.daemon import Agent
from agent.enforce.base import DryRunEnforcer
from agent.model import Event
from agent.report.reporting import Reporting
from agent.respond.engine import Responder
from agent.state.store import Store

FLOOD = {"syns": 50_000, "packets": 50_000, "dport": 80, "proto": "tcp"}


def agent_on(tmp_path: Path) -> Agent:
    cfg = Config(state_dir=str(tmp_path), metrics=Metrics(listen=None))
    agent = Agent(cfg)
    agent.store = Store(cfg.db_path)
    agent.responder = Responder(cfg, agent.store, DryRunEnforcer())
    agent.reporting = Reporting(cfg, agent.store, agent.responder.observers,
                                status=dict, losses=lambda: 0, queue=agent.queue_status)
    return agent


def test_a_failing_event_is_counted_and_the_rest_go_on(tmp_path: Path, caplog) -> None:
    agent = agent_on(tmp_path)
    now = 10**12
    events = [Event("net.source", "198.51.100.1", now, now - 10**9, FLOOD),
              Event("net.source", None, now, now - 10**9, FLOOD),   # type: ignore[arg-type]
              Event("net.source", "198.51.100.2", None, now, FLOOD),   # type: ignore[arg-type]
              Event("net.source", "198.51.100.3", now, now - 10**9, FLOOD)]

    async def run() -> None:
        for e in events:
            agent.enqueue(e)
        task = asyncio.create_task(agent.consume())
        for _ in range(200):
            await asyncio.sleep(0.01)
            if not len(agent.queue):
                break
        task.cancel()

    try:
        with caplog.at_level(logging.ERROR, logger="swarm_agent"):
            asyncio.run(run())
        assert agent.counters["events.failed"] == 1
        assert agent.counters["findings.failed"] == 2     # 198.51.100.2's two rules fired
        assert agent.counters["events.net.source"] == 4
        # The event after the failing one was detected and answered.
        answered = {i.entity for i in agent.store.incidents()}
        assert answered == {"ip:198.51.100.1", "ip:198.51.100.3"}
        logged = [(getattr(r, "counter", None), getattr(r, "count", None)) for r in caplog.records]
        assert logged == [("events.failed", 1), ("findings.failed", 1), ("findings.failed", 2)]
        metric = agent.reporting.metrics.failed
        assert (metric.labels("event")._value.get(), metric.labels("finding")._value.get()) == \
            (1, 2)
    finally:
        agent.reporting.close()
        agent.store.close()
