"""Feedback matching (agent.detect.feedback) and the feedback book over a real store
(agent.respond.feedbackbook, agent.state.feedback): scopes, expiry, refusals, revert,
restarts, and that an exception never silences another rule."""
from __future__ import annotations

from pathlib import Path

import pytest

from agent.detect import feedback as fb
from agent.model import EventClass, Feedback, Finding, IncidentState, Severity
from agent.respond.feedbackbook import FeedbackBook
from agent.state.store import Store

NODE = "node-a"
SHA = "ab" * 32
CG = "/kubepods.slice/pod1/cri-containerd-c1.scope"


def beacon(dst: str = "203.0.113.7", cgroup: str = CG, sha: str = SHA,
           rule: str = "anomaly.beacon", entity: str | None = None) -> Finding:
    scope = {"cgroup": cgroup, "container": "c1", "exe_sha256": [sha], "exe_id": ["8:1:42"],
             "dst": [dst], "dport": [443], "node": NODE}
    return Finding(rule_id=rule, rule_version=3, event_class=EventClass.SUSPICIOUS_ACTIVITY,
                   severity=Severity.MEDIUM, entity=entity or f"cgroup:{cgroup}",
                   action="investigate", first_mono_ns=1, detected_mono_ns=2,
                   evidence={"detector": rule.split(".")[1], "scope": scope, "score": 9.5,
                             "summary": f"beacon to {dst}"})


def record(kind: str, value: str, rule: str = "anomaly.beacon", **kw) -> Feedback:
    return Feedback(id="r1", rule=rule, rule_version=3, scope_kind=kind, scope_value=value,
                    action="suppress", created_at=0.0, expires_at=kw.pop("expires_at", 100.0),
                    **kw)


@pytest.mark.parametrize("kind, value, hit, miss", [
    ("address", "203.0.113.7/32", beacon(), beacon(dst="203.0.113.8")),
    ("address", "203.0.113.0/24", beacon(dst="203.0.113.99"), beacon(dst="198.51.100.1")),
    ("exe", SHA, beacon(), beacon(sha="cd" * 32)),
    ("cgroup", "/kubepods.slice/pod1", beacon(), beacon(cgroup="/kubepods.slice/pod10/x")),
    ("cgroup", CG, beacon(), beacon(cgroup="/system.slice/cron.service")),
    ("node", NODE, beacon(), beacon(rule="anomaly.workload")),
])
def test_a_record_matches_its_scope_only(kind, value, hit, miss) -> None:
    rec = record(kind, value)
    assert fb.matches(rec, hit, NODE, now=50.0)
    assert not fb.matches(rec, miss, NODE, now=50.0)


def test_a_record_never_silences_another_rule() -> None:
    rec = record("cgroup", CG)
    assert not fb.matches(rec, beacon(rule="anomaly.workload"), NODE, 50.0)
    assert not fb.matches(rec, beacon(rule="anomaly.beaconx"), NODE, 50.0)


def test_expired_or_reverted_records_stop_matching() -> None:
    assert fb.matches(record("exe", SHA), beacon(), NODE, 99.9)
    assert not fb.matches(record("exe", SHA), beacon(), NODE, 100.0)
    assert not fb.matches(record("exe", SHA, reverted_at=10.0), beacon(), NODE, 50.0)


def test_rule_findings_scope_from_entity_and_top_level_evidence() -> None:
    f = Finding("net.syn_flood", 1, EventClass.SYSTEM_ATTACK, Severity.HIGH,
                "ip:::ffff:198.51.100.9", "challenge", 1, 2, {"syns": 9000, "scope": "node"})
    scopes = fb.scopes_of(f.entity, f.evidence, NODE)
    assert scopes["address"] == {"::ffff:198.51.100.9"}
    # The IPv4-mapped address is its IPv4 address for the CIDR.
    assert fb.matches(record("address", "198.51.100.9/32", rule="net.syn_flood"), f, NODE, 1.0)
    assert fb.default_scope(scopes) == ("address", "198.51.100.9/32")


def test_default_scope_is_the_most_specific_and_never_the_node() -> None:
    scopes = fb.scopes_of(beacon().entity, beacon().evidence, NODE)
    assert fb.default_scope(scopes) == ("address", "203.0.113.7/32")
    del scopes["address"]
    assert fb.default_scope(scopes) == ("exe", SHA)        # the sha256, not the file id
    assert fb.default_scope({"cgroup": {CG}, "node": {NODE}}) == ("cgroup", CG)
    # A kernel file id alone is no default: the inode is reused once the file is deleted.
    assert fb.default_scope({"exe": {"8:1:42"}, "container": {"c1"}}) == ("container", "c1")
    assert fb.check_scope("exe", "8:1:42", {"exe": {"8:1:42"}}, NODE) == ("exe", "8:1:42")
    with pytest.raises(ValueError, match="no single narrow scope"):
        fb.default_scope({"node": {NODE}})


@pytest.mark.parametrize("scope, force, message", [
    ("address=203.0.0.0/8", False, "wider than /16"),
    ("address=2001:db8::/24", False, "wider than /32"),
    ("address=198.51.100.0/24", False, "does not cover this incident"),
    ("cgroup=/system.slice", False, "does not cover"),
    ("cgroup=/", False, "every workload"),
    ("container=other", False, "does not cover"),
    ("process=1", False, "unknown scope kind"),
    ("node=elsewhere", False, "not this node"),
    ("address=nonsense", False, "not an IP address"),
])
def test_refused_scopes(scope, force, message) -> None:
    scopes = fb.scopes_of(beacon().entity, beacon().evidence, NODE)
    with pytest.raises(ValueError, match=message):
        fb.check_scope(*fb.parse_scope(scope), scopes, NODE, force)


def test_wide_scopes_with_force_and_named_ones() -> None:
    scopes = fb.scopes_of(beacon().entity, beacon().evidence, NODE)
    assert fb.check_scope("address", "203.0.0.0/8", scopes, NODE, True) == \
        ("address", "203.0.0.0/8")
    assert fb.check_scope("cgroup", "/kubepods.slice/", scopes, NODE) == \
        ("cgroup", "/kubepods.slice")
    assert fb.check_scope("node", None, scopes, NODE) == ("node", NODE)
    assert fb.check_scope("container", None, scopes, NODE) == ("container", "c1")
    assert fb.check_scope("address", None, scopes, NODE) == ("address", "203.0.113.7/32")


def test_lifetime_is_bounded() -> None:
    assert fb.check_ttl(None, 365 * 86400) == fb.DEFAULT_TTL_S
    assert fb.check_ttl(None, 3600) == 3600
    for bad in (0, -1, float("nan"), 366 * 86400):
        with pytest.raises(ValueError, match="lifetime"):
            fb.check_ttl(bad, 365 * 86400)


# -- the book over a real store --------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def open_incident(store: Store, finding: Finding) -> str:
    return store.record_finding(finding, 999_990.0, 999_995.0).id


def test_book_plans_commits_suppresses_reverts_and_survives_restart(tmp_path: Path) -> None:
    clock, learned = Clock(), []
    db = tmp_path / "state.db"
    store = Store(db)
    unlearned: list = []
    book = FeedbackBook(store, NODE, max_ttl_s=86400 * 365, learn=lambda e, t: learned.append(e),
                        unlearn=unlearned.append, clock=clock)
    incident = open_incident(store, beacon())
    planned = book.plan(incident, by="local:uid=0", reason="the metrics pusher")
    assert [(r.rule, r.rule_version, r.scope_kind, r.scope_value) for r in planned] == \
        [("anomaly.beacon", 3, "address", "203.0.113.7/32")]
    assert book.check(beacon()) is None                 # planned is not in force
    book.commit(planned)
    assert book.check(beacon()) is not None             # the same pattern: kept back
    assert book.check(beacon(dst="198.51.100.1")) is None   # another destination alerts
    assert book.check(beacon(rule="anomaly.workload")) is None   # another detector alerts
    assert book.suppressed == {"anomaly.beacon@3": 1}
    book.flush()
    assert not learned                                   # suppress, not learn
    timeline = [e.kind for e in store.incident_events(incident)]
    assert "feedback" in timeline
    store.close()

    store = Store(db)                                    # a restart keeps the record
    book = FeedbackBook(store, NODE, max_ttl_s=86400 * 365, clock=clock,
                        unlearn=unlearned.append)
    [rec] = book.records()
    assert rec.hits == 1 and rec.by == "local:uid=0" and rec.reason == "the metrics pusher"
    assert book.check(beacon()) is not None
    done = book.revert(rec.id, "local:uid=0", "it was not the pusher")
    assert done.reverted_at == clock.t
    assert book.check(beacon()) is None                  # reverted: alerts again
    assert not unlearned                                 # a suppression taught nothing
    with pytest.raises(ValueError, match="already reverted"):
        book.revert(rec.id, "someone")
    with pytest.raises(KeyError):
        book.revert("nope", "someone")
    assert book.records() == [] and len(book.records(include_all=True)) == 1
    assert "feedback_reverted" in [e.kind for e in store.incident_events(incident)]
    store.close()


def test_book_expiry_learn_and_false_positive_counts(tmp_path: Path) -> None:
    clock, learned, unlearned = Clock(), [], []
    store = Store(tmp_path / "state.db")
    book = FeedbackBook(store, NODE, max_ttl_s=86400, clock=clock,
                        learn=lambda e, tag: learned.append((e, tag)), unlearn=unlearned.append)
    incident = open_incident(store, beacon())
    store.set_incident_state(incident, IncidentState.FALSE_POSITIVE, clock.t)
    planned = book.plan(incident, scope="exe", learn=True, ttl_s=60)
    book.commit(planned)
    assert [r.action for r in planned] == ["learn"]
    assert len(learned) == 1 and learned[0][0]["summary"] == "beacon to 203.0.113.7"
    assert learned[0][1] == planned[0].id         # tagged with its record, for the revert
    assert book.check(beacon(dst="198.51.100.1")) is not None   # same exe, any destination
    assert len(learned) == 2          # the first finding it keeps back is taught once
    assert book.check(beacon()) is not None and len(learned) == 2
    clock.t += 61
    assert book.check(beacon()) is None                 # expired
    assert book.counts()["anomaly.beacon@3"] == {"false_positives": 1, "suppressed": 2}
    with pytest.raises(ValueError, match="at most 86400"):
        book.plan(incident, ttl_s=86401)
    with pytest.raises(ValueError, match="does not cover"):
        book.plan(incident, scope="address=198.51.100.0/24")
    assert not unlearned                  # expiry ends the exception, not what was learned
    book.revert(planned[0].id, "local:uid=0")
    assert unlearned == [planned[0].id]   # a revert takes the learning back
    store.close()
