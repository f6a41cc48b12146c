"""One finding, one transaction in two steps (agent.respond.engine): the incident and
its mitigation are committed before the host change (so a crash in between leaves the
row for reconcile), observers hear of a finding only once its rows are committed, and a
finding whose second step fails after its host change still has the mitigation in force
on record with its incident: a mitigation in force is never forgotten."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.config import Config
from agent.enforce.base import DryRunEnforcer
from agent.model import MitigationKind, MitigationState
from agent.respond.engine import Responder
from agent.state.store import Store
from tests.unit.test_respond import ALLOW, BASE_S, POLICY, RULES, Clock, flood


def committed(path: Path, sql: str) -> int:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchone()[0]
    finally:
        db.close()


class BrokenStore(Store):
    """A store whose incident update fails like a bug would (not a storage failure,
    which goes to memory): the finding's transaction cannot commit."""

    def mark_mitigated(self, *args, **kwargs) -> None:
        raise RuntimeError("a bug after the host change")


class CheckingEnforcer(DryRunEnforcer):
    """Notes, at each apply, how many mitigations and incidents were already committed
    (read through another connection)."""

    def __init__(self, path: Path):
        super().__init__([str(n) for n in ALLOW.networks()])
        self.path = path
        self.committed_at_apply: list[int] = []

    def apply(self, m, now) -> None:
        self.committed_at_apply.append(
            (committed(self.path, "SELECT COUNT(*) FROM mitigations WHERE incident_id IS NOT NULL"),
             committed(self.path, "SELECT COUNT(*) FROM incidents")))
        super().apply(m, now)


def responder(tmp_path: Path, store_class=Store, enforcer=None):
    cfg = Config(state_dir=str(tmp_path), allowlist=ALLOW, mitigation=POLICY)
    store = store_class(cfg.db_path)
    enf = enforcer or DryRunEnforcer([str(n) for n in ALLOW.networks()])
    clock = Clock()
    return Responder(cfg, store, enf, clock, rules=RULES,
                     to_wall=lambda ns: BASE_S + ns / 1e9), store, enf, clock


def test_observers_hear_only_committed_findings(tmp_path: Path) -> None:
    enf = CheckingEnforcer(tmp_path / "agent.db")
    r, store, _, clock = responder(tmp_path, enforcer=enf)
    seen: list[tuple[str, int]] = []
    r.observers.append(lambda kind, obj: seen.append(
        (kind, committed(store.path, "SELECT COUNT(*) FROM incidents WHERE mitigated_at "
                                     "IS NOT NULL"))))
    try:
        inc = r.handle(flood(clock))
        assert enf.committed_at_apply == [(1, 1)]      # the row first, with its incident
        assert seen == [("mitigation", 1), ("incident", 1)]
        [event] = [e for e in store.incident_events(inc.id) if e.kind == "mitigation_applied"]
        assert event.data["signal_at"] == BASE_S + clock.t_s     # the kernel's event time
    finally:
        store.close()


def test_a_failed_second_step_keeps_the_mitigation_and_its_incident(tmp_path: Path) -> None:
    r, store, enf, clock = responder(tmp_path, BrokenStore)
    seen: list[str] = []
    r.observers.append(lambda kind, obj: seen.append(kind))
    try:
        with pytest.raises(RuntimeError, match="bug"):
            r.handle(flood(clock))
        assert enf.actions == [("apply", "block_ip", "198.51.100.7")]
        # The first step (incident and mitigation) was committed before the host change;
        # only the outcome's lines went with the failed second step.
        [inc] = store.incidents()
        [m] = store.active_mitigations(clock())
        assert (m.kind, m.target, m.state, m.incident_id) == (
            MitigationKind.BLOCK_IP, "198.51.100.7", MitigationState.ACTIVE, inc.id)
        assert seen == ["mitigation"]       # on record, so announced
        # The next finding goes on normally (no transaction left open).
        store.mark_mitigated = Store.mark_mitigated.__get__(store)
        clock.t_s += 5
        inc = r.handle(flood(clock, addr="198.51.100.8"))
        assert store.incident(inc.id) is not None
    finally:
        store.close()
