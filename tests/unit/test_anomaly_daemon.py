"""The anomaly engine in the agent (agent.daemon, agent.anomalystate): events reach it from
on_event, its findings reach the responder from the housekeeping tick, its state is saved
atomically and restored, a bad state file is moved aside, and status, metrics and the rule
listing show its detectors. Real store, responder with the dry-run enforcer."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from agent import anomalystate
from agent.cli.client import _anomaly_lines
from agent.config import Config, Metrics
from agent.daemon import Agent
from agent.detect.anomaly import AnomalyConfig
from agent.enforce.base import DryRunEnforcer
from agent.model import Event
from agent.report.reporting import Reporting
from agent.respond.engine import Responder
from agent.state.store import Store

WEB = "/system.slice/web.service"


def agent_on(tmp_path: Path) -> Agent:
    cfg = Config(state_dir=str(tmp_path), metrics=Metrics(listen=None),
                 anomaly=AnomalyConfig.from_dict({"save_every_s": 1}))
    agent = Agent(cfg)
    agent.store = Store(cfg.db_path)
    agent.responder = Responder(cfg, agent.store, DryRunEnforcer())
    agent.reporting = Reporting(cfg, agent.store, agent.responder.observers,
                                status=dict, losses=lambda: 0, queue=agent.queue_status)
    agent._open_anomaly()
    return agent


def beacon_events(now_ns: int) -> list[Event]:
    """Nine connections 5 s apart (+-10%) to one address, ending now."""
    out = []
    for i, off in enumerate((45.2, 40.1, 34.8, 30.3, 25.0, 19.7, 15.1, 10.4, 5.0)):
        t = now_ns - int(off * 1e9)
        out.append(Event("flow.connect", "203.0.113.50", t, t, {
            "daddr": "203.0.113.50", "dport": 443, "outcome": "established", "cgroup": WEB,
            "container": "", "exe": "/usr/bin/python3", "exe_id": "8:1:4242", "pid": 4242},
            source="activity"))
    return out


def test_a_beacon_becomes_a_suspicious_activity_incident(tmp_path: Path) -> None:
    agent = agent_on(tmp_path)
    for e in beacon_events(time.monotonic_ns()):
        agent.on_event(e)
    agent.anomaly_tick()
    incidents = agent.store.incidents()
    assert [(i.event_class.value, i.entity) for i in incidents] == \
        [("suspicious_activity", f"cgroup:{WEB}")]
    assert agent.counters["findings.anomaly.beacon@1"] == 1
    st = agent.status()["anomaly"]
    assert st["detectors"]["beacon"]["hits"] == 1 and st["detectors"]["beacon"]["mode"] == "alerting"
    assert st["detectors"]["mahalanobis"]["mode"] == "shadow"       # warm-up
    rows = {r["id"]: r for r in agent.rule_listing()["rules"]}
    assert rows["anomaly.beacon"]["hits"] == 1
    assert "anomaly.beacon@1" not in agent.rule_listing()["retired_hits"]
    assert [e["kind"] for e in agent.anomaly.recent(f"cgroup:{WEB}")] == ["flow.connect"] * 9
    lines = _anomaly_lines(agent.status()["counters"])
    assert any(line.split()[:2] == ["beacon", "alerting"] for line in lines)
    metrics = agent.reporting.metrics.registry.get_sample_value(
        "swarm_agent_anomaly_findings_total", {"detector": "beacon", "mode": "alerting"})
    assert metrics == 1


def test_state_is_saved_and_restored_and_a_bad_file_moved_aside(tmp_path: Path) -> None:
    agent = agent_on(tmp_path)
    for e in beacon_events(time.monotonic_ns()):
        agent.on_event(e)
    agent.anomaly_tick()
    path = tmp_path / anomalystate.STATE_FILE
    asyncio.run(agent.save_anomaly(time.time()))       # the periodic save, on a thread
    assert path.exists() and agent.anomaly_saved["bytes"] == path.stat().st_size
    path.unlink()
    asyncio.run(agent.save_anomaly(time.time()))       # not due again yet (save_every_s)
    assert not path.exists()
    agent.save_anomaly_now()
    saved = json.loads(path.read_text())
    assert saved["format"] == 1 and saved["taken_wall"] > 0
    assert not list(tmp_path.glob(".*.tmp"))
    again = agent_on(tmp_path)
    assert again.anomaly.restored.startswith("restored")
    # The beacon pair (and its dedup) came back: the same beacon is not reported twice.
    assert len(again.anomaly.beacon.pairs) == 1
    for e in beacon_events(time.monotonic_ns())[-2:]:
        again.on_event(e)
    assert again.anomaly.tick(time.monotonic_ns()) == []

    path.write_text('{"format": 1, "signature": ')
    third = agent_on(tmp_path)
    assert third.anomaly.restored.startswith("fresh start:")
    assert "moved to" in third.anomaly.restored
    assert list(tmp_path.glob(f"{anomalystate.STATE_FILE}.bad-*"))
    assert "anomaly" in third.status()["probes"]
    path.write_text(json.dumps({"format": 99}))
    fourth = agent_on(tmp_path)
    assert "format 99" in fourth.anomaly.restored


def test_anomaly_disabled_leaves_no_engine(tmp_path: Path) -> None:
    cfg = Config(state_dir=str(tmp_path), metrics=Metrics(listen=None),
                 anomaly=AnomalyConfig.from_dict({"enabled": False}))
    agent = Agent(cfg)
    agent.reporting = None
    agent._open_anomaly()
    assert agent.anomaly is None and agent.anomaly_status() == {"enabled": False}
