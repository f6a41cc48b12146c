"""Isolations and quarantines in the responder, on a real SQLite file with the enforcer's
real dry-run twin (small subclasses add a WireGuard peer lookup and a failing apply)."""
from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import Allowlist, Config, MitigationPolicy
from agent.enforce.base import DryRunEnforcer, EnforceError, PartiallyApplied
from agent.model import (EventClass, Finding, IncidentState, Mitigation, MitigationKind,
                         MitigationState, Severity)
from agent.respond import isolation
from agent.respond.engine import Responder
from agent.state.store import Store

BASE_S = 1_700_000_000.0
PEER = "wg0:" + "B" * 43 + "="


class PeerEnforcer(DryRunEnforcer):
    """The dry-run twin, where 10.9.0.1 is the tunnel address of WireGuard peer PEER."""

    def peer_for_address(self, addr: str) -> str | None:
        return PEER if addr == "10.9.0.1" else None


class FailingEnforcer(DryRunEnforcer):
    def apply(self, m: Mitigation, now: float) -> None:
        raise EnforceError("refusing to isolate the node: no mesh or management network")


def finding(entity: str, action: str, *, cls=EventClass.SECURITY_BREACH,
            rule: str = "breach.service_shell") -> Finding:
    return Finding(rule, 1, cls, Severity.CRITICAL, entity, action, 1_000_000_000,
                   1_200_000_000, {"comm": "sh"})


@pytest.fixture
def make(tmp_path: Path):
    stores: list[Store] = []

    def build(enforcer=None, **policy) -> tuple[Responder, Store, list]:
        cfg = Config(state_dir=str(tmp_path), mitigation=MitigationPolicy(**policy),
                     allowlist=Allowlist(management=("192.0.2.0/24",)))
        store = Store(tmp_path / "agent.db")
        stores.append(store)
        r = Responder(cfg, store, enforcer or DryRunEnforcer(), clock=lambda: BASE_S + 2.0,
                      to_wall=lambda ns: BASE_S + ns / 1e9)
        seen: list = []
        r.observers.append(lambda kind, obj: seen.append((kind, obj)))
        return r, store, seen
    yield build
    for s in stores:
        s.close()


@pytest.mark.parametrize("entity, action, kind, target", [
    ("node", "isolate_node", MitigationKind.ISOLATE_NODE, "node"),
    ("cgroup:/system.slice/web.service", "isolate_service", MitigationKind.ISOLATE_SERVICE,
     "/system.slice/web.service"),
])
def test_breach_isolation_is_escalated_and_lasts_until_released(make, entity, action, kind, target):
    r, store, seen = make()
    inc = r.handle(finding(entity, action))
    assert inc.state is IncidentState.ESCALATED
    (m,) = store.mitigations()
    assert (m.kind, m.target, m.expires_at, m.state) == (kind, target, None, MitigationState.ACTIVE)
    assert store.deadline_missed(inc.id) is False            # 1.0 s against 60 s
    assert seen[-1][0] == "incident" and seen[-1][1].state is IncidentState.ESCALATED
    assert r.expire(BASE_S + 10 ** 7) == []                  # never lapses by itself
    events = [e.kind for e in store.incident_events(inc.id)]
    assert "mitigation_applied" in events and events[-1] == "note"


def test_isolation_ttl_makes_isolations_expire(make):
    r, store, _ = make(isolation_ttl_s=30.0)
    r.handle(finding("node", "isolate_node"))
    (m,) = store.mitigations()
    assert m.expires_at == BASE_S + 2.0 + 30.0
    assert [x.id for x in r.expire(BASE_S + 40.0)] == [m.id]


def test_attack_from_a_wireguard_peer_quarantines_the_peer(make):
    r, store, _ = make(PeerEnforcer())
    inc = r.handle(finding("ip:10.9.0.1", "block", cls=EventClass.SYSTEM_ATTACK,
                           rule="net.port_scan"))
    (m,) = store.mitigations()
    assert (m.kind, m.target, m.expires_at) == (MitigationKind.REMOVE_PEER, PEER, None)
    assert inc.state is IncidentState.ESCALATED
    # Another address is blocked as before, with a lifetime, and not escalated.
    other = r.handle(finding("ip:10.9.0.7", "block", cls=EventClass.SYSTEM_ATTACK,
                             rule="net.port_scan"))
    assert other.state is IncidentState.MITIGATED
    assert store.mitigations()[-1].kind is MitigationKind.BLOCK_IP


def test_forgeable_evidence_on_a_tunnel_address_challenges_never_quarantines(make):
    r, store, _ = make(PeerEnforcer())
    r.handle(finding("ip:10.9.0.1", "challenge", cls=EventClass.SYSTEM_ATTACK,
                     rule="net.syn_flood"))
    (m,) = store.mitigations()
    assert (m.kind, m.target) == (MitigationKind.CHALLENGE, "10.9.0.1")


def test_failed_isolation_is_escalated_with_the_reason(make):
    r, store, _ = make(FailingEnforcer())
    inc = r.handle(finding("node", "isolate_node"))
    assert inc.state is IncidentState.ESCALATED
    (m,) = store.mitigations()
    assert m.state is MitigationState.FAILED
    assert any("no mesh or management" in e.text for e in store.incident_events(inc.id))


def test_manual_isolation_opens_an_escalated_incident_once(make):
    r, store, seen = make()
    m = isolation.isolate(r, MitigationKind.ISOLATE_NODE, "node", None, "suspected", by="ops")
    (inc,) = store.incidents()
    assert (inc.entity, inc.rules, inc.state) == ("node", ["manual.isolate@1"],
                                                  IncidentState.ESCALATED)
    assert m.incident_id == inc.id and m.expires_at is None and m.params["by"] == "ops"
    again = isolation.isolate(r, MitigationKind.ISOLATE_NODE, "node", None, "again")
    assert again.id == m.id and len(store.incidents()) == 1
    lifted = r.lift(m.id)
    assert lifted.state is MitigationState.LIFTED
    with pytest.raises(ValueError, match="not an isolation"):
        isolation.isolate(r, MitigationKind.BLOCK_IP, "10.0.0.1", None, "")


class PartialEnforcer(DryRunEnforcer):
    """Cuts the service but the freeze is refused (a delegated cgroup, as
    agent.enforce.composite reports it)."""

    def apply(self, m: Mitigation, now: float) -> None:
        super().apply(m, now)
        raise PartiallyApplied(["network cut"], ["the freezer: Permission denied"])


def test_a_partly_applied_isolation_stays_in_force_says_what_was_refused_and_escalates(make):
    r, store, seen = make(PartialEnforcer())
    inc = r.handle(finding("cgroup:/user.slice/u.service", "isolate_service"))
    (m,) = store.mitigations()
    # Active: reconcile keeps the cut in force (a FAILED row would let it lift the cut).
    assert m.state is MitigationState.ACTIVE
    assert m.params["partial"] == {"in_force": ["network cut"],
                                   "refused": ["the freezer: Permission denied"]}
    assert [d.id for d in r.desired(BASE_S + 5.0)] == [m.id]
    assert inc.state is IncidentState.ESCALATED and inc.mitigated_at is not None
    (ev,) = [e for e in store.incident_events(inc.id) if e.kind == "mitigation_partial"]
    assert "in force: network cut" in ev.text and "Refused: the freezer: Permission denied" \
        in ev.text
    assert not [e for e in store.incident_events(inc.id) if e.kind == "mitigation_failed"]
    # An operator's isolation of the same kind: returned, not raised, and says so too.
    m2 = r.apply_manual(MitigationKind.ISOLATE_SERVICE, "/user.slice/v.service", None, "")
    assert m2.state is MitigationState.ACTIVE and "partial" in m2.params


def test_tampering_found_by_reconcile_lands_in_the_incident_and_escalates(make):
    r, store, seen = make()
    inc = r.handle(finding("cgroup:/user.slice/u.service", "isolate_service"))
    (m,) = store.mitigations()
    store.set_incident_state(inc.id, IncidentState.MITIGATED, BASE_S + 3.0)
    r.record_tampering([(m.id, "processes [42] were running again: stopped again"),
                        ("no-such-mitigation", "ignored")])
    (ev,) = [e for e in store.incident_events(inc.id) if e.kind == "mitigation_tampered"]
    assert "[42] were running again" in ev.text
    assert store.incident(inc.id).state is IncidentState.ESCALATED
    assert seen[-1][0] == "incident"
