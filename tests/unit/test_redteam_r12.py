"""Red team r12: variants of the r11 attacks (tests/unit/test_redteam_r11.py) against the
fixes that followed them. Attackers: (a) a hostile or impersonated NATS server / relay
(no TLS on nats://, a compromised broker, an on-path box): it cannot sign decisions, but
it chooses which signed messages an agent sees, in what order, and what stream_info and
consumer metadata say; (b) a malicious provider node holding a valid certificate; (c) a
careless operator.

Tests named `test_finding_*` FAIL on the current code: each docstring says the attack,
what the attacker controls, the harm and a suggested fix. Tests named `test_holds_*` pass:
attacks the code withstands, kept as regression tests."""
from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent import config as C
from agent.enforce.fleet import FleetEnforcer
from agent.fleet.apply import Checks, Message, plan
from agent.fleet.decision import MAX_BODY_BYTES, Decision
from mesh.policy import Policy, PolicyConfig

# the r11 round's key, store fixture and decider (with its clock and recording publisher)
from tests.unit.test_redteam_r11 import KEY, SIGNER, T0, VERIFIER, decider, store  # noqa: F401

TARGET = "203.0.113.7/32"
CHECKS = Checks(VERIFIER, "node-a", allow=[ipaddress.ip_network("127.0.0.0/8")])


def prop(node, provider, target=TARGET, n=0, now=T0, **kw):
    p = {"proposal_id": f"{node}-{target}-{n}", "node": node, "provider": provider,
         "target": target, "rule": "net.connect_scan", "rule_version": 1,
         "incident_id": "i", "operator": "", "evidence": "resets=80", "created_at": now - 1,
         "ttl_s": 0.0, "event_class": "system_attack", "received_at": now}
    p.update(kw)
    return p


def run(coro):
    return asyncio.run(coro)


def msg(seq: int, d: Decision) -> Message:
    return Message(seq, d.subject, SIGNER.envelope(d))


def merged(entries, out):
    e = {t: v for t, v in entries.items() if t not in out.removed}
    e.update(out.upserts)
    return e


def public_key_file(tmp_path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    pub = tmp_path / "mesh.pub"
    pub.write_bytes(KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return pub


class FakeSub:
    """An ordered consumer as a hostile server runs it: the messages it chooses, with the
    num_pending it chooses."""

    def __init__(self, msgs, pending=None):
        self.left = list(msgs)
        self.pending = pending

    async def next_msg(self, timeout):
        if not self.left:
            raise asyncio.TimeoutError
        m = self.left.pop(0)
        meta = SimpleNamespace(sequence=SimpleNamespace(stream=m.seq))
        if self.pending is not None:
            meta.num_pending = self.pending
        return SimpleNamespace(subject=m.subject, data=m.body, metadata=meta)


def subscriber_with(tmp_path, decisions):
    from agent.fleet.subscriber import FleetSubscriber
    from agent.state.store import Store

    pub = public_key_file(tmp_path)
    cfg = C.Config(state_dir=str(tmp_path),
                   fleet=C.FleetConfig(nats_url="nats://127.0.0.1:4222", keys=(str(pub),)))
    st = Store(cfg.db_path)
    sub = FleetSubscriber(cfg, st, FleetEnforcer(dry_run=True), "node-a",
                          lambda: [ipaddress.ip_network("127.0.0.0/8")], clock=lambda: T0 + 5)
    sub.start()
    run(sub._snapshot(FakeSub([msg(i + 1, d) for i, d in enumerate(decisions)]),
                      len(decisions), "stream-1", len(decisions)))
    return sub, st


# ============================================================================================
# Findings (fail on the current code)
# ============================================================================================

def test_finding_a_snapshot_forgets_revocations_so_the_revoked_block_can_be_replayed():
    """Attack: a hostile or on-path NATS server (attacker (a)) keeps a copy of a signed
    block B for target X. The operator revokes X (revoke R, kept by the agent as an entry
    until B would have expired, precisely so that "a replayed block cannot undo a
    revocation"). The server then reports a new stream `created` time (a reset) and
    serves a snapshot that does not name X (or names nothing: messages=0); plan(...,
    snapshot=True) removes R's entry like any other. Next it delivers the old B on X's
    subject: no entry is left to make it stale, the signature and expiry are good, and B
    is applied again. Attacker controls: which genuine signed messages the agent sees and
    stream_info. Harm: an operator's revocation (typically of a false positive that was
    blocking a customer or a partner) is undone on every node the relay serves, for up
    to B's whole lifetime (7 days cap); signatures do not help since B is genuine.
    Fix: a snapshot lifts blocks it does not name but keeps revoke entries (tombstones)
    until their own expiry -- or the agent keeps the ids/issued_at of revoked decisions
    for their lifetime, apart from the entries a snapshot replaces."""
    b = Decision("block", TARGET, T0, T0 + 86400)
    r = Decision("revoke", TARGET, T0 + 10, T0 + 86400, revokes=b.id)
    entries = merged({}, plan({}, [msg(1, b), msg(2, r)], CHECKS, T0 + 20))
    assert entries[TARGET].action == "revoke"
    # the "reset" stream: a snapshot that does not name X
    entries = merged(entries, plan(entries, [], CHECKS, T0 + 30, snapshot=True))
    # the relay now replays the revoked block
    out = plan(entries, [Message(1, b.subject, SIGNER.envelope(b))], CHECKS, T0 + 40)
    assert TARGET not in out.blocks(), "a revoked block was applied again after a snapshot"


def test_finding_a_server_claiming_an_empty_stream_lifts_every_fleet_block(tmp_path):
    """Attack: a hostile or on-path NATS server answers stream_info with a new `created`
    time and state.messages == 0 (or last_seq == 0). _session takes that as a reset,
    _snapshot takes `messages == 0` as "complete unread", and apply(snapshot=True) lifts
    every fleet block in force. The r11 fix (an early-ended snapshot lifts nothing)
    trusts the server's own word on completeness. Attacker controls: one stream_info
    reply; it needs no key. Harm: every fleet-wide block (the whole point of the fleet:
    the attacker blocked on one node is blocked everywhere) vanishes from every node the
    server serves, at once and silently ("fleet snapshot loaded"). Fix: lift by omission
    only on signed evidence of completeness (the mesh publishes a signed checkpoint
    naming how many current decisions there are, or a digest of their ids, and the
    snapshot must match it), or never lift by omission: blocks run out by their own
    bounded expiry and honest lifts come as signed revokes, which the mesh republishes
    after a reset."""
    a = Decision("block", "203.0.113.7/32", T0, T0 + 3600)
    b = Decision("block", "203.0.113.8/32", T0, T0 + 3600)
    sub, st = subscriber_with(tmp_path, [a, b])
    try:
        assert set(sub.blocks(T0 + 5)) == {a.target, b.target}
        run(sub._snapshot(FakeSub([]), 0, "stream-2", 0))     # "empty", says the server
        blocks = sub.blocks(T0 + 5)
    finally:
        st.close()
    assert blocks == {a.target: a.expires_at, b.target: b.expires_at}, \
        "a server's unsigned claim of an empty stream lifted every fleet block"


def test_finding_a_server_claiming_nothing_pending_ends_a_snapshot_as_complete(tmp_path):
    """Attack: the same relay serves a real-looking reset stream (last_seq 2, 2 messages)
    but delivers only the first message, with num_pending=0 in its consumer metadata
    (the ack reply subject, which the server writes). _nothing_pending takes that as
    "the read is whole", the snapshot counts as complete and lifts what it was not
    shown. Attacker controls: the metadata of one delivered message. Harm: as above, for
    any chosen subset of the fleet's blocks (the attacker lifts exactly the block on its
    own address and leaves the rest, so nothing looks wrong). Fix: as above; at least
    do not take num_pending from the server as proof while seq < last_seq."""
    a = Decision("block", "203.0.113.7/32", T0, T0 + 3600)
    b = Decision("block", "203.0.113.8/32", T0, T0 + 3600)
    sub, st = subscriber_with(tmp_path, [a, b])
    try:
        run(sub._snapshot(FakeSub([msg(1, a)], pending=0), 2, "stream-2", 2))
        blocks = sub.blocks(T0 + 5)
    finally:
        st.close()
    assert b.target in blocks, "a block was lifted because the server said nothing was pending"


# ============================================================================================
# Withstood (pass on the current code)
# ============================================================================================

def test_holds_a_replayed_older_block_after_a_revoke_is_stale_even_in_a_snapshot():
    """A relay answering the future-dated re-fetch (get_last_msg) or a snapshot with the
    older block instead of its revoke: the revoke entry makes it stale."""
    b = Decision("block", TARGET, T0, T0 + 86400)
    r = Decision("revoke", TARGET, T0 + 10, T0 + 86400, revokes=b.id)
    entries = merged({}, plan({}, [msg(1, b), msg(2, r)], CHECKS, T0 + 20))
    for snapshot in (False, True):
        out = plan(entries, [msg(1, b)], CHECKS, T0 + 40, snapshot=snapshot)
        assert TARGET not in out.blocks()
        assert [x.reason for x in out.refusals] == ["stale"]


def test_holds_the_future_dated_refetch_is_bounded_and_does_not_apply_early():
    """A decision issued 10 min ahead of the agent's clock is refused (issued_in_future)
    however often it is fetched again, until the clock allows."""
    d = Decision("block", TARGET, T0 + 600, T0 + 4000)
    for now in (T0, T0 + 100, T0 + 299):
        out = plan({}, [msg(5, d)], CHECKS, now)
        assert not out.blocks() and out.refusals[0].reason == "issued_in_future"
    assert TARGET in plan({}, [msg(5, d)], CHECKS, T0 + 301).blocks()
    from agent.fleet import subscriber as fs
    assert fs.RETRY_MAX <= 1000 and fs.RETRY_BATCH <= 100


@pytest.mark.parametrize("spelling", [
    "203.0.113.7", "203.0.113.7/32", "203.0.113.6/31", "203.0.113.4/30", "203.0.113.0/24",
    "::ffff:203.0.113.7", "::ffff:cb00:7107/128", "::ffff:203.0.113.0/120",
    "64:ff9b::cb00:7107", "64:ff9b::203.0.113.7/128", " 203.0.113.7 ", "203.0.113.007",
    "0x cb.0.113.7", "203.0.113.7%eth0",
])
def test_holds_a_revocation_is_not_bypassed_by_another_spelling(store, spelling):
    dec, pub, clock = decider(store)
    assert run(dec.block(TARGET, 3600, "fp", "alice")).kind == "decide"
    clock.now += 1
    assert run(dec.revoke(TARGET, "false positive", "alice")).kind == "decide"
    sent = len(pub.sent)
    clock.now += 5
    outcomes = [run(dec.submit(prop(n, pv, target=spelling, now=clock.now)))
                for n, pv in (("n1", "acme"), ("n2", "other"), ("n3", "third"))]
    assert all(o is None or o.kind == "refuse" for o in outcomes), outcomes
    assert len(pub.sent) == sent


def test_holds_provider_spellings_and_reused_node_names_are_one_vote_each():
    """Case, surrounding and non-breaking spaces fold to one provider; one node voting
    under two providers (a re-enrolled --force certificate, the old one still valid)
    casts one vote, its newest."""
    pol = Policy(PolicyConfig.from_dict({"min_nodes": 3, "min_providers": 2, "stage_s": 0}))
    votes = [prop("n2", " ACME\u00a0", received_at=T0 - 2), prop("n3", "Acme", received_at=T0 - 3)]
    out = pol.evaluate(prop("n1", "acme"), now=T0, node_count=1, votes=votes, latest=None)
    assert out.kind == "pending"
    pol2 = Policy(PolicyConfig.from_dict({"min_nodes": 2, "min_providers": 2, "stage_s": 0}))
    votes = [prop("n1", "acme", n=1, received_at=T0 - 5), prop("n2", "other", received_at=T0 - 2)]
    out = pol2.evaluate(prop("n1", "other"), now=T0, node_count=1, votes=votes, latest=None)
    assert out.kind == "pending", out


def test_holds_enrolment_refuses_lookalike_provider_names():
    """Providers that casefold would not fold (fullwidth, Cyrillic look-alikes) cannot be
    issued by `swarm-mesh enroll` (ASCII safe names only)."""
    from mesh import cli, enroll
    for name in ("\uff21\uff43\uff4d\uff45", "\u0410cme", "acme\u200b", "ac me"):
        with pytest.raises(cli.UsageError):
            enroll.check_safe("--provider", name)


def test_holds_multibyte_and_many_field_provenance_stays_under_the_body_limit():
    """40 voters whose CN (200 non-BMP characters: 12 JSON bytes each), rule (128 of them)
    and proposal id (200) are as big as the store lets them, staged to a canary: the
    signed envelope stays under 8 KiB, far below the agents' MAX_BODY_BYTES."""
    big = "\U0001F600"
    pol = Policy(PolicyConfig.from_dict({"min_nodes": 3, "min_providers": 2, "stage_s": 60,
                                         "stage_canary": 50}))
    votes = [prop(big * 199 + chr(0x4E00 + i), f"p{i}", rule=big * 127 + chr(0x4E00 + i),
                  proposal_id=big * 199 + chr(0x4E00 + i), received_at=T0 - 1,
                  operator=big * 127 + str(i)) for i in range(40)]
    out = pol.evaluate(votes[0], now=T0, node_count=1, votes=votes[1:], latest=None,
                       known_nodes=[big * 199 + chr(0x5E00 + i) for i in range(100)])
    assert out.kind == "decide"
    env = SIGNER.envelope(out.decision)
    assert len(env) < 8192 < MAX_BODY_BYTES
    VERIFIER.open(env, out.decision.subject, T0)
    op = pol.operator_block(TARGET, 3600, big * 5000, big * 5000, T0)
    assert len(SIGNER.envelope(op.decision)) < 2048


def test_holds_a_match_rule_with_one_forgeable_member_is_not_proposable():
    """`match` fires on any one condition and the finding does not say which: one
    forgeable member (net.source SYN counts) makes the whole rule local-only."""
    from agent.detect.rules import parse_rules
    rules = parse_rules({"rules": [
        {"id": "x.mixed", "version": 1, "class": "system_attack", "severity": "medium",
         "match": [{"event": "tcp.verified_reset", "thresholds": {"resets_per_s": 50}},
                   {"event": "net.source", "thresholds": {"ports": 30}}],
         "action": "block"},
        {"id": "x.pure", "version": 1, "class": "system_attack", "severity": "medium",
         "event": "tcp.verified_reset", "thresholds": {"resets_per_s": 50},
         "action": "block"}]})
    by = {r.id: r.unforgeable for r in rules}
    assert by == {"x.mixed": False, "x.pure": True}
