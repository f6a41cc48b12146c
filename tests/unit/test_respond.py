"""The responder on a real SQLite file with the real dry-run enforcer (the enforcer's
dry-run twin, not a mock); a small subclass covers enforcement failures."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.config import Allowlist, Config, MitigationPolicy
from agent.detect.rules import Detector, load_rules, parse_rules
from agent.enforce.base import AllowlistedError, DryRunEnforcer, EnforceError
from agent.model import (Event, Finding, IncidentState, Mitigation, MitigationKind,
                         MitigationState)
from agent.respond.engine import ALLOWLISTED_NOTE, Responder
from agent.state.store import Store

BASE_S = 1_700_000_000.0        # wall time at mono 0 in these tests
SHIPPED = load_rules()
# The responder's mechanics (lifetimes, renewal, repeats, expiry, the distributed switch)
# on rules that block; what the shipped rules answer (a challenge for forgeable evidence,
# a block once verified) is tested on SHIPPED below.
RULES = [*parse_rules({"rules": [
    {"id": "test.block", "version": 1, "class": "system_attack", "severity": "high",
     "event": "net.source", "thresholds": {"syns_per_s": 200}, "action": "block"},
    {"id": "test.block_udp", "version": 1, "class": "system_attack", "severity": "high",
     "event": "net.source", "thresholds": {"udp_per_s": 5000}, "action": "block"}]}),
    *[r for r in SHIPPED if all(c.event != "net.source" for c in r.conditions)]]
POLICY = MitigationPolicy(default_ttl_s=600.0, max_ttl_s=3000.0, repeat_factor=2.0,
                          repeat_window_s=86400.0, max_sources_per_rule=3)
ALLOW = Allowlist(management=("192.0.2.0/24",), load_balancers=("10.20.0.0/16",))


class Clock:
    """Wall clock (seconds after BASE_S) that the test moves by hand."""

    def __init__(self) -> None:
        self.t_s = 100.0

    def __call__(self) -> float:
        return BASE_S + self.t_s


class FailingEnforcer(DryRunEnforcer):
    """The dry-run twin, except that every apply fails like a refused nft batch."""

    def apply(self, m: Mitigation, now: float) -> None:
        raise EnforceError("nft: Could not process rule: No such file or directory",
                           batch={"nftables": []})


class ApplyTimeAllowlist(DryRunEnforcer):
    """Claims nothing is allowlisted up front but refuses on apply (a racing reload)."""

    def is_allowlisted(self, target: str) -> bool:
        return False

    def apply(self, m: Mitigation, now: float) -> None:
        raise AllowlistedError(f"{m.target} is allowlisted")


@pytest.fixture
def env(tmp_path: Path):
    """Builds responders over one SQLite file in tmp_path; closes every store after."""
    stores: list[Store] = []
    clock = Clock()

    def make(enforcer: Any = None, rules=RULES, **cfg_over) -> tuple[Responder, Store, Any]:
        cfg = Config(state_dir=str(tmp_path), allowlist=ALLOW, mitigation=POLICY, **cfg_over)
        store = Store(cfg.db_path)
        stores.append(store)
        enf = enforcer if enforcer is not None else DryRunEnforcer(
            [str(n) for n in ALLOW.networks()])
        responder = Responder(cfg, store, enf, clock, rules=rules,
                              to_wall=lambda ns: BASE_S + ns / 1e9)
        return responder, store, enf

    make.clock = clock
    yield make
    for s in stores:
        s.close()


def flood(clock: Clock, addr: str = "198.51.100.7", kind: str = "net.source",
          age_s: float = 1.0, rules=RULES, **fields: Any) -> Finding:
    """The finding the real detector makes for an event whose evidence began `age_s` ago."""
    fields = fields or {"syns": 5000, "packets": 5000, "dport": 80, "proto": "tcp"}
    now_ns = int(clock.t_s * 1e9)
    ev = Event(kind, addr, now_ns, now_ns - int(age_s * 1e9), fields)
    [finding] = Detector(rules, Config(allowlist=ALLOW)).evaluate(ev, now_ns)
    return finding


def test_block_applied_and_deadline_met(env) -> None:
    responder, store, enf = env()
    inc = responder.handle(flood(env.clock))
    now = env.clock()
    assert enf.actions == [("apply", "block_ip", "198.51.100.7")]
    assert inc.state is IncidentState.MITIGATED
    assert (inc.first_seen_at, inc.mitigated_at) == (now - 1.0, now)
    assert store.deadline_missed(inc.id) is False
    [m] = store.active_mitigations(now)
    assert (m.kind, m.target, m.expires_at, m.incident_id) == (
        MitigationKind.BLOCK_IP, "198.51.100.7", now + 600.0, inc.id)
    assert [e.kind for e in store.incident_events(inc.id)] == ["finding", "mitigation_applied"]
    assert responder.desired(now) == [m]


def test_deadline_missed_is_recorded(env) -> None:
    responder, store, _ = env()
    inc = responder.handle(flood(env.clock, age_s=45.0))
    assert store.deadline_missed(inc.id) is True
    assert store.counts_by_class()["system_attack"]["deadline_missed"] == 1


def test_findings_group_and_do_not_reapply(env) -> None:
    responder, store, enf = env()
    first = responder.handle(flood(env.clock))
    env.clock.t_s += 5
    second = responder.handle(flood(env.clock))
    assert first.id == second.id and second.findings == 2
    assert len(enf.actions) == 1
    assert second.mitigated_at == first.mitigated_at


def test_renewal_when_less_than_half_remains(env) -> None:
    responder, store, enf = env()
    inc = responder.handle(flood(env.clock))
    [m] = store.active_mitigations(env.clock())
    env.clock.t_s += 299                      # 301 s of 600 left: no renewal yet
    responder.handle(flood(env.clock))
    assert store.mitigation(m.id).expires_at == m.expires_at
    env.clock.t_s += 2                        # 299 s left: renew
    responder.handle(flood(env.clock))
    renewed = store.mitigation(m.id)
    assert renewed.expires_at == env.clock() + 600.0   # renewal is not a repeat offence
    assert enf.actions == [("apply", "block_ip", "198.51.100.7")] * 2
    assert len(store.mitigations()) == 1
    assert "mitigation_renewed" in [e.kind for e in store.incident_events(inc.id)]


def test_repeat_offender_ttl_grows_and_is_capped(env) -> None:
    responder, store, enf = env()
    ttls = []
    for _ in range(5):
        responder.handle(flood(env.clock))
        [m] = store.active_mitigations(env.clock())
        ttls.append(m.expires_at - m.created_at)
        env.clock.t_s = m.expires_at - BASE_S
        assert [x.id for x in responder.expire(env.clock())] == [m.id]
    assert ttls == [600.0, 1200.0, 2400.0, 3000.0, 3000.0]
    assert enf.actions.count(("lift", "block_ip", "198.51.100.7")) == 5


def test_repeat_window_forgets_old_offences(env) -> None:
    responder, store, _ = env()
    responder.handle(flood(env.clock))
    env.clock.t_s += 86400 + 1000
    responder.expire(env.clock())
    responder.handle(flood(env.clock))
    [m] = store.active_mitigations(env.clock())
    assert m.expires_at - m.created_at == 600.0


def test_rule_ttl_and_rate_limit_params(env) -> None:
    responder, store, enf = env()
    responder.handle(flood(env.clock, "2001:db8::5", "tcp.established", conns=500, dport=443))
    [m] = store.active_mitigations(env.clock())
    assert (m.kind, m.target) == (MitigationKind.RATE_LIMIT, "2001:db8::5")
    assert m.expires_at - m.created_at == 300.0           # net.conn_flood's ttl_s
    assert m.params == {"packets_per_second": 20, "burst": 40, "ttl_s": 300.0}


def test_expiry_lifts_and_marks(env) -> None:
    responder, store, enf = env()
    inc = responder.handle(flood(env.clock))
    env.clock.t_s += 599
    assert responder.expire(env.clock()) == []
    env.clock.t_s += 1
    [m] = responder.expire(env.clock())
    assert m.state is MitigationState.EXPIRED
    assert enf.actions[-1] == ("lift", "block_ip", "198.51.100.7")
    assert store.mitigation(m.id).state is MitigationState.EXPIRED
    assert responder.desired(env.clock()) == []
    assert store.incident_events(inc.id)[-1].kind == "mitigation_expired"


@pytest.mark.parametrize("addr,enforcer", [
    ("192.0.2.5", None),                                      # the config's allowlist
    ("203.0.113.9", DryRunEnforcer(["203.0.113.0/24"])),     # the enforcer's allowlist
    ("198.51.100.7", ApplyTimeAllowlist()),                   # refused at apply time
])
def test_allowlisted_is_reported_never_blocked(env, addr: str, enforcer: Any) -> None:
    responder, store, enf = env(enforcer)
    inc = responder.handle(flood(env.clock, addr))
    assert inc.state is IncidentState.OPEN and inc.mitigated_at is None
    assert store.active_mitigations(env.clock()) == []
    assert [a for a in enf.actions if a[0] == "apply"] == []
    assert ALLOWLISTED_NOTE in [e.text for e in store.incident_events(inc.id)]


def test_enforcement_failure_escalates_without_raising(env) -> None:
    responder, store, _ = env(FailingEnforcer())
    inc = responder.handle(flood(env.clock))
    assert inc.state is IncidentState.ESCALATED and inc.mitigated_at is None
    [m] = store.mitigations()
    assert m.state is MitigationState.FAILED
    assert responder.desired(env.clock()) == []
    failed = [e for e in store.incident_events(inc.id) if e.kind == "mitigation_failed"]
    assert "No such file or directory" in failed[0].data["error"]
    # a failed attempt is no repeat offence: the next try gets the base lifetime
    assert store.prior_mitigations("198.51.100.7", since=0.0) == 0


def test_distributed_switch_bounds_the_block_set(env) -> None:
    responder, store, enf = env()
    sources = [f"198.51.100.{n}" for n in range(1, 11)] + ["2001:db8::1", "2001:db8::2"]
    for addr in sources:
        responder.handle(flood(env.clock, addr))
    active = store.active_mitigations(env.clock())
    blocked = [m.target for m in active if m.kind is MitigationKind.BLOCK_IP]
    assert blocked == sources[:3]                         # max_sources_per_rule
    [svc] = [m for m in active if m.kind is MitigationKind.RATE_LIMIT_SERVICE]
    assert svc.target == "tcp/80"
    assert svc.params["packets_per_second"] == 100        # enforce.service_rate_limit
    [inc] = store.incidents(entity="service:tcp/80")
    assert inc.findings == len(sources) - 3 and inc.state is IncidentState.MITIGATED
    assert enf.actions.count(("apply", "rate_limit_service", "tcp/80")) == 1
    # an already blocked source is renewed, not switched; another rule still blocks
    responder.handle(flood(env.clock, sources[0]))
    responder.handle(flood(env.clock, "192.51.0.1", udp=9000, dport=53, proto="udp"))
    assert ("apply", "block_ip", "192.51.0.1") in enf.actions
    # a minute later the count starts over
    env.clock.t_s += 61
    responder.handle(flood(env.clock, "198.51.100.99"))
    assert enf.actions[-1] == ("apply", "block_ip", "198.51.100.99")


def test_dry_run_records_and_never_enforces(env) -> None:
    responder, store, enf = env(dry_run=True)
    inc = responder.handle(flood(env.clock))
    responder.handle(flood(env.clock))
    # The dry-run enforcer is asked once (it runs the live checks, changes nothing); the
    # repeat finds the DRY_RUN mitigation in force; nothing is ever lifted.
    assert enf.actions == [("apply", "block_ip", "198.51.100.7")]
    [m] = store.mitigations()
    assert m.state is MitigationState.DRY_RUN
    assert inc.state is IncidentState.OPEN and inc.mitigated_at is None
    assert "mitigation_dry_run" in [e.kind for e in store.incident_events(inc.id)]
    assert responder.desired(env.clock()) == []
    env.clock.t_s += 600
    [gone] = responder.expire(env.clock())
    assert gone.state is MitigationState.EXPIRED and len(enf.actions) == 1


def test_restart_returns_the_same_mitigations(env, tmp_path: Path) -> None:
    responder, store, _ = env()
    responder.handle(flood(env.clock))
    responder.handle(flood(env.clock, "2001:db8::7"))
    manual = responder.apply_manual("block_ip", "203.0.113.0/24", None, "operator")
    before = responder.desired(env.clock())
    store.close()
    env.clock.t_s += 10
    again, _, _ = env()
    after = again.desired(env.clock())
    assert after == before and len(after) == 3
    assert [m.expires_at for m in after] == [m.expires_at for m in before]
    assert manual in after and manual.expires_at is None


def test_manual_apply_and_lift(env) -> None:
    responder, store, enf = env()
    m = responder.apply_manual(MitigationKind.BLOCK_IP, "198.51.100.9/32", 60.0, "ticket 42")
    assert (m.target, m.state, m.reason) == ("198.51.100.9", MitigationState.ACTIVE, "ticket 42")
    assert m.expires_at == env.clock() + 60.0
    # a detector finding for the same host joins the operator's block
    responder.handle(flood(env.clock, "198.51.100.9"))
    assert len(store.mitigations()) == 1
    lifted = responder.lift(m.id)
    assert lifted.state is MitigationState.LIFTED
    assert enf.actions[-1] == ("lift", "block_ip", "198.51.100.9")
    assert responder.lift(m.id).state is MitigationState.LIFTED     # idempotent
    with pytest.raises(KeyError):
        responder.lift("no-such-id")


def test_manual_errors(env) -> None:
    responder, store, _ = env()
    with pytest.raises(AllowlistedError):
        responder.apply_manual("block_ip", "192.0.2.1", 60.0, "oops")
    with pytest.raises(ValueError):
        responder.apply_manual("block_ip", "not-an-ip", 60.0, "")
    with pytest.raises(ValueError):
        responder.apply_manual("rate_limit_service", "tcp/99999", 60.0, "")
    assert store.mitigations() == []
    failing, store2, _ = env(FailingEnforcer())
    with pytest.raises(EnforceError):
        failing.apply_manual("rate_limit_service", "TCP/443", 60.0, "")
    [m] = store2.mitigations(state=MitigationState.FAILED)
    assert m.target == "tcp/443"


def test_report_only_rule(env) -> None:
    rules = parse_rules({"rules": [{
        "id": "net.watch", "version": 2, "class": "system_attack", "severity": "low",
        "event": "net.source", "thresholds": {"syns_per_s": 100}, "action": "report"}]})
    responder, store, enf = env(rules=rules)
    inc = responder.handle(flood(env.clock, rules=rules))
    assert inc.rules == ["net.watch@2"] and inc.state is IncidentState.OPEN
    assert store.mitigations() == [] and enf.actions == []


@pytest.mark.parametrize("target", ["::", "0.0.0.0", "224.0.0.1", "ff02::1"])
def test_unspecified_or_multicast_source_is_reported_never_blocked(target):
    from agent.respond import policy
    from agent.model import MitigationKind

    assert policy.unblockable(target)
    with pytest.raises(ValueError, match="cannot be blocked"):
        policy.check_target(MitigationKind.BLOCK_IP, target)


# --- the response fits the evidence (shipped rules) -------------------------------------

def test_forgeable_evidence_is_challenged_never_blocked(env) -> None:
    responder, store, enf = env(rules=SHIPPED)
    inc = responder.handle(flood(env.clock, rules=SHIPPED))          # net.syn_flood
    responder.handle(flood(env.clock, "198.51.100.8", rules=SHIPPED, udp=9000, dport=53,
                           proto="udp"))                            # net.udp_flood
    assert enf.actions == [("apply", "challenge", "198.51.100.7"),
                           ("apply", "challenge", "198.51.100.8")]
    [m, _] = store.active_mitigations(env.clock())
    assert m.reason.startswith("unverified source: challenged: net.syn_flood@2")
    assert m.params["packets_per_second"] == 200                  # enforce.challenge_rate_limit
    texts = [e.text for e in store.incident_events(inc.id)]
    assert any(t.startswith("unverified source: challenged: challenge 198.51.100.7") for t in texts)
    assert inc.state is IncidentState.MITIGATED


def test_verified_resets_block(env) -> None:
    responder, store, enf = env(rules=SHIPPED)
    inc = responder.handle(flood(env.clock, kind="tcp.reset", rules=SHIPPED, resets=500,
                                 dport=23))            # a decoy could draw these: challenge
    responder.handle(flood(env.clock, kind="tcp.verified_reset", rules=SHIPPED, resets=500,
                           dport=23))                  # cookie-answering handshakes: block
    assert enf.actions == [("apply", "challenge", "198.51.100.7"),
                           ("apply", "block_ip", "198.51.100.7")]
    assert inc.rules == ["net.port_scan@2"]
    [blocked] = store.incidents(entity="ip:198.51.100.7")
    texts = [e.text for e in store.incident_events(blocked.id)]
    assert any(t.startswith("blocked: block_ip 198.51.100.7") for t in texts)
    # the challenge before it is no offence: the block gets net.connect_scan's own ttl
    [b] = [m for m in store.active_mitigations(env.clock()) if m.kind is MitigationKind.BLOCK_IP]
    assert b.expires_at - b.created_at == 1800.0


def test_forged_many_source_flood_challenges_the_service(env) -> None:
    responder, store, enf = env(rules=SHIPPED)
    for n in range(1, 8):
        responder.handle(flood(env.clock, f"198.51.100.{n}", rules=SHIPPED))
    active = store.active_mitigations(env.clock())
    assert [m.kind for m in active].count(MitigationKind.CHALLENGE) == 3
    [svc] = [m for m in active if m.kind is MitigationKind.CHALLENGE_SERVICE]
    assert svc.target == "tcp/80" and svc.reason.startswith("unverified source: challenged")
    assert not any(m.kind in (MitigationKind.BLOCK_IP, MitigationKind.RATE_LIMIT_SERVICE)
                   for m in active)
