"""The SQLite store on a real file: grouping, timelines, mitigations, restart, readers."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.model import (EventClass, Finding, IncidentState, Mitigation, MitigationKind,
                         MitigationState, Severity)
from agent.state.store import SCHEMA_VERSION, Store, StoreError


def finding(entity: str = "ip:198.51.100.7", rule: str = "net.syn_flood",
            severity: Severity = Severity.HIGH) -> Finding:
    return Finding(rule_id=rule, rule_version=1, event_class=EventClass.SYSTEM_ATTACK,
                   severity=severity, entity=entity, action="block", first_mono_ns=1,
                   detected_mono_ns=2, evidence={"syns": 500, "dport": 80, "proto": "tcp"})


@pytest.fixture
def store(tmp_path: Path):
    """A store on a fresh file in tmp_path; closed after the test."""
    s = Store(tmp_path / "agent.db")
    yield s
    s.close()


def test_pragmas_and_schema(store: Store) -> None:
    assert store.schema_version == SCHEMA_VERSION
    db = sqlite3.connect(store.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_grouping_by_class_and_entity(store: Store) -> None:
    a = store.record_finding(finding(severity=Severity.MEDIUM, rule="net.port_scan"), 100.0, 101.0)
    b = store.record_finding(finding(), 99.0, 102.0)
    other = store.record_finding(finding(entity="ip:2001:db8::1"), 100.0, 103.0)
    assert a.id == b.id != other.id
    inc = store.incident(a.id)
    assert inc is not None
    assert (inc.findings, inc.first_seen_at, inc.detected_at) == (2, 99.0, 101.0)
    assert inc.rules == ["net.port_scan@1", "net.syn_flood@1"]
    assert inc.severity is Severity.HIGH            # the worst finding wins
    assert inc.summary.startswith("net.port_scan@1 on ip:198.51.100.7")
    events = store.incident_events(a.id)
    assert [e.kind for e in events] == ["finding", "finding"]
    assert events[1].data["evidence"] == {"syns": 500, "dport": 80, "proto": "tcp"}


def test_mitigated_incident_still_groups_resolved_does_not(store: Store) -> None:
    a = store.record_finding(finding(), 100.0, 101.0)
    store.mark_mitigated(a.id, 101.5, deadline_missed=False)
    assert store.record_finding(finding(), 100.0, 102.0).id == a.id
    store.set_incident_state(a.id, IncidentState.RESOLVED, 200.0)
    assert store.incident(a.id).resolved_at == 200.0
    assert store.record_finding(finding(), 300.0, 301.0).id != a.id


def test_mark_mitigated_keeps_first(store: Store) -> None:
    a = store.record_finding(finding(), 100.0, 101.0)
    store.mark_mitigated(a.id, 101.5, deadline_missed=False)
    store.mark_mitigated(a.id, 900.0, deadline_missed=True)
    inc = store.incident(a.id)
    assert (inc.state, inc.mitigated_at) == (IncidentState.MITIGATED, 101.5)
    assert store.deadline_missed(a.id) is False
    b = store.record_finding(finding(entity="ip:192.0.2.1"), 100.0, 101.0)
    assert store.deadline_missed(b.id) is None
    counts = store.counts_by_class()["system_attack"]
    assert (counts["total"], counts["open"], counts["mitigated"]) == (2, 1, 1)
    assert (counts["deadline_met"], counts["deadline_missed"]) == (1, 0)


def mitigation(target: str = "198.51.100.7", created_at: float = 1000.0,
               ttl_s: float | None = 600.0, **kw) -> Mitigation:
    return Mitigation(kind=kw.pop("kind", MitigationKind.BLOCK_IP), target=target,
                      created_at=created_at,
                      expires_at=None if ttl_s is None else created_at + ttl_s,
                      params={"ttl_s": ttl_s}, **kw)


def test_mitigation_roundtrip_and_filters(store: Store) -> None:
    m = mitigation(reason="manual")
    store.add_mitigation(m, rule="net.syn_flood@1")
    got = store.mitigation(m.id)
    assert got == m
    assert store.active_mitigations(1599.0) == [m]
    assert store.active_mitigations(1600.0) == []          # expired is not in force
    assert store.mitigations(expired_by=1600.0) == [m]
    forever = mitigation("2001:db8::/64", ttl_s=None)
    store.add_mitigation(forever)
    assert store.active_mitigations(10**9) == [forever]
    store.set_mitigation_state(m.id, MitigationState.EXPIRED, 1600.0)
    assert store.mitigations(state=MitigationState.EXPIRED) == [
        mitigation(reason="manual", id=m.id, state=MitigationState.EXPIRED)]
    assert store.mitigations(target="2001:db8::/64", kind=MitigationKind.BLOCK_IP) == [forever]
    store.set_mitigation_expiry(forever.id, 5000.0, 1700.0, {"ttl_s": 4000.0})
    assert store.mitigation(forever.id).expires_at == 5000.0
    assert store.mitigation(forever.id).params == {"ttl_s": 4000.0}


def test_prior_and_per_rule_counts(store: Store) -> None:
    for n, state in enumerate([MitigationState.EXPIRED, MitigationState.FAILED,
                               MitigationState.ACTIVE]):
        store.add_mitigation(mitigation(created_at=1000.0 + n, state=state), rule="r@1")
    store.add_mitigation(mitigation("192.0.2.9", created_at=1005.0), rule="r@1")
    store.add_mitigation(mitigation("tcp/80", kind=MitigationKind.RATE_LIMIT_SERVICE,
                                    created_at=1006.0), rule="r@1")
    assert store.prior_mitigations("198.51.100.7", since=0.0) == 2    # failed never counts
    assert store.prior_mitigations("198.51.100.7", since=1001.5) == 1
    assert store.prior_mitigations("198.51.100.7", since=0.0, until=1002.0) == 1
    assert store.sources_mitigated_by_rule("r@1", since=0.0) == 2      # distinct sources
    assert store.sources_mitigated_by_rule("r@1", since=1003.0) == 1
    assert store.sources_mitigated_by_rule("other@1", since=0.0) == 0


def test_reopen_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "agent.db"
    s = Store(path)
    inc = s.record_finding(finding(), 100.0, 101.0)
    m = mitigation(incident_id=inc.id)
    s.add_mitigation(m)
    s.close()
    with Store(path) as again:
        assert again.schema_version == SCHEMA_VERSION
        assert again.active_mitigations(1100.0) == [m]
        assert again.incident(inc.id).findings == 1


def test_reader_while_writer_open(tmp_path: Path) -> None:
    path = tmp_path / "agent.db"
    with Store(path) as writer:
        writer.add_mitigation(mitigation())
        with Store(path, readonly=True) as reader:
            assert len(reader.active_mitigations(1100.0)) == 1
            writer.add_mitigation(mitigation("192.0.2.1"))
            assert len(reader.active_mitigations(1100.0)) == 2
            with pytest.raises(sqlite3.OperationalError):
                reader.add_mitigation(mitigation("192.0.2.2"))


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "agent.db"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}"):
        Store(path, readonly=True)          # a reader refuses it
    with pytest.raises(StoreError, match="cannot open"):
        Store(tmp_path / "missing.db", readonly=True)
    # The agent moves it aside (kept) and starts afresh (tests/unit/test_store_resilience.py).
    with Store(path) as store:
        assert "newer than this agent" in store.health.recovered[0] and store.fresh
