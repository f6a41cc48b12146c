"""The responder's answer to an investigation (action "investigate", the anomaly models'
findings): an escalated suspicious_activity incident, once, with nothing mitigated; its
deadline (the Suspicious Activity row's 15 minutes) is met when the investigation opens."""
from __future__ import annotations

from pathlib import Path

from agent.config import Config
from agent.enforce.base import DryRunEnforcer
from agent.model import EventClass, Finding, IncidentState, Severity
from agent.respond.engine import Responder
from agent.state.store import Store

BASE_S = 1_700_000_000.0


def anomaly(first_s: float, at_s: float, dst: str = "203.0.113.7") -> Finding:
    return Finding("anomaly.beacon", 3, EventClass.SUSPICIOUS_ACTIVITY, Severity.MEDIUM,
                   "cgroup:/kubepods.slice/pod1", "investigate", int(first_s * 1e9),
                   int(at_s * 1e9), {"summary": f"beacon every 5.1 s to {dst}:443",
                                     "scope": {"dst": [dst]}})


def test_an_investigation_is_escalated_once_and_mitigates_nothing(tmp_path: Path) -> None:
    clock = [BASE_S + 30.0]
    store = Store(tmp_path / "a.db")
    enforcer = DryRunEnforcer([])
    responder = Responder(Config(state_dir=str(tmp_path)), store, enforcer, lambda: clock[0],
                          rules=[], to_wall=lambda ns: BASE_S + ns / 1e9)
    inc = responder.handle(anomaly(0.0, 29.0))
    assert inc.state is IncidentState.ESCALATED and enforcer.actions == []
    assert store.mitigations(incident_id=inc.id) == []
    assert inc.summary == "anomaly.beacon@3 on cgroup:/kubepods.slice/pod1 " \
        "(beacon every 5.1 s to 203.0.113.7:443)"
    assert (inc.mitigated_at, store.deadline_missed(inc.id)) == (BASE_S + 30.0, False)
    clock[0] += 60
    again = responder.handle(anomaly(0.0, 89.0, dst="203.0.113.8"))
    assert again.id == inc.id and again.mitigated_at == BASE_S + 30.0
    notes = [e.text for e in store.incident_events(inc.id) if e.kind == "note"]
    assert notes == ["escalated: investigation opened for the security team "
                     "(anomaly.beacon@3)"]
    assert store.counts_by_class()["suspicious_activity"]["deadline_met"] == 1
    store.close()


def test_an_investigation_opened_late_misses_its_deadline(tmp_path: Path) -> None:
    store = Store(tmp_path / "a.db")
    responder = Responder(Config(state_dir=str(tmp_path)), store, DryRunEnforcer([]),
                          lambda: BASE_S + 1000.0, rules=[],
                          to_wall=lambda ns: BASE_S + ns / 1e9)
    inc = responder.handle(anomaly(0.0, 999.0))
    assert store.deadline_missed(inc.id) is True
    store.close()
