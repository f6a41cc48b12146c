"""Red team r13: the fleet decision system after the r12 fix ("nothing is lifted by omission
on the server's word"). Attackers: (a) a hostile or broken NATS server: it cannot sign, but
it chooses which signed messages an agent sees, their order, sequence numbers, subjects and
what stream_info says; (b) one malicious provider node with a valid certificate; (c) the
agent's or the mesh's clock (an NTP step); (d) an operator's ordinary use.

Tests named `test_finding_*` FAIL on the current code: each docstring says the attack, what
the attacker controls, the harm and a suggested fix. Tests named `test_holds_*` pass:
attacks the code withstands, kept as regression tests. The kernel check is in
tests/integration/test_redteam_r13.py."""
from __future__ import annotations

import asyncio
import ipaddress
import json
import time
import tracemalloc
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import config as C
from agent.enforce.fleet import FleetEnforcer
from agent.fleet import apply as fleetapply
from agent.fleet.apply import Message, plan
from agent.fleet.decision import Decision, subject_for
from agent.fleet.subscriber import FleetSubscriber
from agent.proto.swarm.mesh.v1 import mesh_pb2
from agent.state.store import Store
from mesh import pki
from mesh.policy import Policy, PolicyConfig
from mesh.server import ReportingService
from mesh.store import open_store

# the earlier rounds' key, store fixture, decider, hostile consumer and helpers
from tests.unit.test_redteam_r11 import SIGNER, T0, decider, store  # noqa: F401
from tests.unit.test_redteam_r12 import CHECKS, FakeSub, merged, msg, public_key_file

X = "203.0.113.7/32"
Y = "203.0.113.8/32"


def run(coro):
    return asyncio.run(coro)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def agent(tmp_path, clock=None, keys=None):
    """A FleetSubscriber in dry run on its own SQLite store (node-a)."""
    key_files = keys or (str(public_key_file(tmp_path)),)
    cfg = C.Config(state_dir=str(tmp_path),
                   fleet=C.FleetConfig(nats_url="nats://127.0.0.1:4222", keys=tuple(key_files)))
    st = Store(cfg.db_path)
    sub = FleetSubscriber(cfg, st, FleetEnforcer(dry_run=True), "node-a",
                          lambda: [ipaddress.ip_network("127.0.0.0/8")],
                          clock=clock or (lambda: T0 + 5))
    sub.start()
    return sub, st


class QuietSub(FakeSub):
    """FakeSub whose empty consumer waits as a real one does (the loop must yield)."""

    pending_msgs = 0

    async def next_msg(self, timeout):
        if not self.left:
            await asyncio.sleep(min(timeout, 0.05))
        return await super().next_msg(timeout)


class HonestServer:
    """What an honest nats-server holding `msgs` (one per subject) answers the agent's
    session: stream_info, and an ordered consumer from the start sequence asked."""

    def __init__(self, msgs, created="stream-1"):
        self.msgs, self.created = list(msgs), created
        self.is_connected, self.connected_url = True, None
        self.starts: list[int | None] = []

    def jetstream(self):
        return self

    async def stream_info(self, stream):
        last = max((m.seq for m in self.msgs), default=0)
        return SimpleNamespace(created=self.created,
                               state=SimpleNamespace(last_seq=last, messages=len(self.msgs)))

    async def subscribe(self, subject, stream=None, ordered_consumer=False, deliver_policy=None,
                        config=None, idle_heartbeat=None):
        start = config.opt_start_seq if config is not None else 1
        self.starts.append(start)
        return QuietSub([m for m in self.msgs if m.seq >= start])

    async def close(self):
        return None


def session_with(sub, server, seconds=0.5):
    """One agent session against `server`, cut after `seconds` (it follows for ever)."""
    async def connect():
        return server
    sub._connect = connect

    async def go():
        try:
            await asyncio.wait_for(sub._session(), seconds)
        except asyncio.TimeoutError:
            pass
    run(go())


# ============================================================================================
# Findings (fail on the current code)
# ============================================================================================

def test_finding_a_message_withheld_once_is_never_fetched_again(tmp_path):
    """Attack: a hostile or broken NATS server (a) that an agent reaches for a while (one
    node of a cluster, a relay) delivers the stream with one message left out: the revoke
    R of block B on X (seq 2), while it delivers the next decision (seq 3). Gaps are
    normal in a stream that keeps one message per subject, so the agent cannot tell, and
    its cursor moves to 3. When the agent later reaches an honest server, that server's
    stream is the same (same created time, last_seq 3 >= cursor): no reset, the consumer
    starts at 4, and R is never delivered -- by anyone. Attacker controls: one session's
    delivery. Harm: an operator's revocation (a false positive blocking a customer) stays
    undone on that node until B's own expiry (up to max_ttl_s, 7 days at most) although
    every server it talks to afterwards is honest; likewise a withheld block is never
    enforced there. Fix: anti-entropy that lifts nothing: on each new session (or every
    few minutes) read every subject's latest (DeliverPolicy.LAST_PER_SUBJECT) and apply
    it as ordinary decisions; that is a full read the r12 fix already made safe."""
    b = Decision("block", X, T0, T0 + 86400)
    r = Decision("revoke", X, T0 + 1, T0 + 86400, revokes=b.id)
    c = Decision("block", Y, T0 + 2, T0 + 3600)
    sub, st = agent(tmp_path)
    try:
        run(sub._snapshot(FakeSub([msg(1, b)]), 1, "stream-1", 1))
        assert X in sub.blocks(T0 + 5)
        run(sub.apply([msg(3, c)], created="stream-1"))     # the relay skips seq 2
        honest = HonestServer([msg(2, r), msg(3, c)])        # B's subject now holds R
        session_with(sub, honest)
        blocks = sub.blocks(T0 + 5)
    finally:
        st.close()
    assert X not in blocks, (f"the revoke withheld once was never read from the honest server "
                             f"(its consumer started at {honest.starts})")


def test_finding_a_hostile_server_grows_a_snapshot_without_bound(tmp_path):
    """Attack: a hostile NATS server (a) reports a reset stream (new created time) with a
    huge last_seq, then streams junk at line rate: 16 kB envelopes under an unknown key,
    num_pending never 0, seq always below last_seq. _snapshot appends every message to one
    list until SNAPSHOT_MAX_S (120 s) and only then verifies them; nothing bounds the count
    or the bytes (and _follow's batch takes up to batch_max = 200,000 messages, 3.2 GB, on
    the server's "catching up"). Attacker controls: stream_info and the delivery; no key.
    Harm: the agent's memory grows by whatever the link carries in two minutes (GBs), the
    kernel OOM-kills the security agent -- local detection and enforcement stop, and the
    server repeats it at every restart. Fix: verify and apply a snapshot in bounded chunks
    as it arrives (e.g. 1,000 messages or a few MB), cursor per chunk, lifting nothing;
    and bound _follow's batch in bytes as well as messages."""
    n, size = 2500, 15000
    last_seq = 10 ** 9

    class Flood:
        sent = 0

        async def next_msg(self, timeout):
            if self.sent >= n:
                raise asyncio.TimeoutError
            self.sent += 1
            body = json.dumps({"d": {"pad": f"{self.sent:08d}" + "x" * size}, "k": "nope",
                               "s": ""}).encode()
            meta = SimpleNamespace(sequence=SimpleNamespace(stream=self.sent), num_pending=1)
            return SimpleNamespace(subject="swarm.decisions.v4.203-0-113-9.32", data=body,
                                   metadata=meta)

    sub, st = agent(tmp_path)
    try:
        tracemalloc.start()
        try:
            run(sub._snapshot(Flood(), last_seq, "stream-2", last_seq))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        st.close()
    sent = n * size
    assert peak < sent / 2, (f"the snapshot held {peak / 1e6:.0f} MB for {sent / 1e6:.0f} MB of "
                             f"junk the server sent: memory grows with what it sends")


def test_finding_a_future_dated_decision_on_other_subjects_evicts_the_retry_list(tmp_path):
    """Attack: this node's clock is behind (broken NTP, attacker (c)) so the mesh's revoke R
    of X is refused as issued_in_future and X's subject is remembered for a re-fetch (the
    r11 fix). A hostile server (a) then delivers that same signed R on 1,000 other
    subjects. Verifier.open checks "issued in the future" BEFORE "came on the wrong
    subject", so each copy is refused as issued_in_future too and each bogus subject is
    remembered; the list keeps RETRY_MAX (1,000), oldest out: X's subject is evicted, its
    refusal rows are pushed out of fleet_refusals as well, and R is never fetched again,
    from this server or any honest one after it. Attacker controls: delivery (it replays
    one genuine message on subjects of its choosing). Harm: the revocation is lost on this
    node; the revoked block stays in force until its expiry. Fix: check the subject before
    the time (a copy on another subject is wrong_subject, never retried), and remember a
    retry by the decision's own subject only."""
    r = Decision("revoke", X, T0 + 600, T0 + 86400, revokes="b")
    sub, st = agent(tmp_path, clock=lambda: T0)
    try:
        run(sub.apply([msg(2, r)], created="stream-1"))
        assert r.subject in sub.retry
        copies = [Message(3 + i, subject_for(f"198.51.{i // 256}.{i % 256}/32"),
                          SIGNER.envelope(r)) for i in range(1000)]
        out = run(sub.apply(copies, created="stream-1"))
        reasons = {x.reason for x in out.refusals}
        retry = dict(sub.retry)
    finally:
        st.close()
    assert r.subject in retry and reasons == {"wrong_subject"}, (
        f"copies on other subjects were refused as {sorted(reasons)} and evicted the real "
        f"subject from the re-fetch list")


def test_finding_an_older_longer_block_is_replayed_after_the_revoke_runs_out(store):
    """Attack: an operator blocks X for a day (B1), later re-blocks it for 10 minutes (B2:
    `swarm-mesh block X --ttl 600`, nothing refuses it), then revokes it (R). The mesh
    gives R the expiry of the LATEST block only (B2's, 10 minutes), and the agent forgets
    R's entry then (forget_expired). A hostile server (a) that kept B1 (genuine, signed,
    valid for the rest of the day) replays it: no entry is left to make it stale, and X
    is blocked again for ~23 hours. Attacker controls: replay of a message it once relayed.
    Harm: the operator's revocation is undone for the rest of the older block's lifetime.
    Fix: the agent keeps each target's newest issued_at (a tombstone) for max_lifetime_s
    after it, not until the entry's own expiry (no older block can live longer); or the
    mesh gives a revoke the latest expiry of every block ever issued for the target."""
    dec, pub, clock = decider(store)
    run(dec.block(X, 86400, "first", "ana"))
    clock.now += 10
    run(dec.block(X, 600, "shorter", "bob"))
    clock.now += 10
    run(dec.revoke(X, "false positive", "ana"))
    sent = [Message(i + 1, s, body) for i, (s, body, _) in enumerate(pub.sent)]
    assert len(sent) == 3
    entries = merged({}, plan({}, sent, CHECKS, T0 + 30))
    assert X not in {t for t, e in entries.items() if e.blocking}
    later = T0 + 700                                  # R's entry ran out with B2
    entries = {t: e for t, e in entries.items() if t not in fleetapply.expired(entries, later)}
    out = plan(entries, [sent[0]], CHECKS, later)     # the relay replays B1
    assert X not in out.blocks(), "a revoked target was blocked again by its older block"


def test_finding_a_proposal_flood_drops_honest_proposals_that_are_never_decided(tmp_path):
    """Attack: one malicious node (b) sends report batches full of proposals (a batch may be
    64 MiB: ~100,000 proposals; fresh ids, any targets). The server queues every new
    proposal for the decider (PROPOSAL_QUEUE_MAX 10,000; the rate limit is applied only
    when the decider reaches each one). With the queue full, three honest nodes of two
    providers propose the attacker's real target: their proposals are dropped ("they stay
    in the store"), and nothing decides them later -- `sweep` runs only at the service's
    start. Attacker controls: its own reports. Harm: the fleet never spreads the block the
    honest nodes corroborated (the attacker keeps attacking every other node), and the
    operator sees nothing but a counter. Fix: apply the per-node rate limit at intake
    (refuse or drop a node's over-rate proposals before they are queued, a per-node fair
    queue), and sweep the store for undecided proposals periodically, not only at start.
    (The queue bound is scaled down to 40 here; the flood scales with it.)"""
    import mesh.server as server

    ca = pki.make_ca()

    def context(node, provider):
        cert, _ = pki.node_cert(ca, node, provider)
        pem = cert.public_bytes(serialization.Encoding.PEM)
        return SimpleNamespace(
            auth_context=lambda: {"transport_security_type": [b"ssl"], "x509_pem_cert": [pem]},
            peer=lambda: "ipv4:192.0.2.1:5000")

    def batch(node, targets, tag):
        now = time.time()
        return mesh_pb2.ReportBatch(reports=[mesh_pb2.Report(
            id=f"{node}-{tag}-{i}", node_id=node, created_at=now,
            proposal=mesh_pb2.Proposal(proposal_id=f"{node}-{tag}-{i}", target=t,
                                       rule="net.connect_scan", rule_version=1,
                                       created_at=now, ttl_s=3600, event_class="system_attack"))
            for i, t in enumerate(targets)])

    st = open_store(f"sqlite:///{tmp_path}/mesh.db")
    dec, _, clock = decider(st)
    clock.now = time.time()
    old_max = server.PROPOSAL_QUEUE_MAX
    server.PROPOSAL_QUEUE_MAX = 40
    try:
        svc = ReportingService(st, dec.on_proposal)

        async def go():
            flood = [f"198.51.100.{i}" for i in range(40)]
            await svc.Report(batch("evil", flood, "f"), context("evil", "shady"))
            for node, provider in (("h1", "acme"), ("h2", "acme"), ("h3", "globex")):
                await svc.Report(batch(node, ["203.0.113.66"], "p"), context(node, provider))
            worker = asyncio.create_task(svc.deliver_proposals())
            await asyncio.wait_for(svc.queue.join(), 20)
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
        run(go())
        dropped = svc.counters["proposals_dropped"]
        decided = st.latest_decision("203.0.113.66/32")
    finally:
        server.PROPOSAL_QUEUE_MAX = old_max
        st.close()
    assert decided is not None, (f"{dropped} honest proposals were dropped behind one node's "
                                 f"flood and the corroborated block was never decided")


def test_finding_the_mesh_keeps_every_proposal_and_refusal_for_ever(tmp_path):
    """Attack: one malicious node (b) proposes without end: fresh proposal ids, any
    targets, 64 MiB batches. Every proposal is stored (rate-limited ones too: they must
    count against the node's rate) and every refused one adds a refusal row, and nothing
    ever deletes either table's rows (prune_reports forgets only report ids). Attacker
    controls: its own reports. Harm: the mesh's disk fills (gigabytes an hour), its store
    starts failing every node's reports (UNAVAILABLE), and no decision is made for anyone;
    the decider's per-proposal queries (count_proposals, votes) also slow down with the
    table. Fix: prune proposals and refusals older than the corroboration window (and the
    refusal view's retention), and cap what one node may have stored per window."""
    st = open_store(f"sqlite:///{tmp_path}/mesh.db")
    try:
        old = T0 - 30 * 86400
        for i in range(200):
            st.add_proposal({"proposal_id": f"e-{i}", "node": "evil", "provider": "shady",
                             "target": f"198.51.100.{i % 250}/32", "rule": "x",
                             "received_at": old, "created_at": old})
            st.add_refusal({"at": old, "node": "evil", "reason": "rate limit",
                            "proposal_id": f"e-{i}"})
        st.prune_reports(T0 - 86400)          # what the service runs every hour
        left = (st.count("proposals"), st.count("refusals"))
    finally:
        st.close()
    assert left == (0, 0), f"a month-old flood is still stored: {left} proposals, refusals"


@pytest.mark.parametrize("target,infrastructure", [
    ("64:ff9b:1::/48", []),                  # RFC 8215 local-use NAT64: all of IPv4 behind it
    ("2002:c633:640a::/48", ["198.51.100.10/32"]),   # 6to4 form of an allowlisted v4 host
])
def test_finding_translated_forms_of_ipv4_pass_the_mesh_allowlist(target, infrastructure):
    """Attack: colluding nodes of two providers (b), or an operator's paste, propose an
    IPv6 network that carries IPv4 inside it. ALWAYS_ALLOWED refuses the IPv4-mapped
    ::ffff:0:0/96 and the well-known NAT64 64:ff9b::/96, but not RFC 8215's local-use
    NAT64 prefix 64:ff9b:1::/48 (on an IPv6-only node behind that translator, every IPv4
    peer is in it: one "/48" blocks all of IPv4, far past the /24 cap), nor 6to4
    2002::/16, where 2002:AABB:CCDD::/48 is exactly the IPv4 host AA.BB.CC.DD (an
    allowlisted infrastructure or mesh address is blockable in that form). Attacker
    controls: proposal targets. Harm: innocent IPv4 parties, up to all of IPv4, blocked
    fleet-wide for the NAT64/6to4 paths. Fix: refuse 64:ff9b:1::/48, 2002::/16 and
    Teredo 2001::/32 outright (or map the embedded IPv4 and check it against the v4
    allowlist and the v4 prefix limit)."""
    reason, net = Policy(PolicyConfig.from_dict(
        {"infrastructure": infrastructure})).check_target(target)
    assert net is None, f"{target} passed the mesh's allowlist as {reason}"


def test_finding_a_key_rotation_lets_a_server_lift_blocks_signed_by_a_kept_key(tmp_path):
    """Attack: the operator starts a key rotation the documented way: the new key K2 is
    added to fleet.keys beside K, and the agent restarts. The changed key set makes the
    next session a lifting snapshot ("only a local change of trusted keys lifts by
    omission"). A hostile server (a) answers that session with a reset stream holding
    nothing (messages=0). The agent lifts every block -- all of them signed by K, which it
    still trusts. Attacker controls: one stream_info reply at the moment of a rotation
    (which an operator announces, and which reaches every node). Harm: every fleet block
    on every node it serves vanishes at once. Fix: after a key change, lift by omission
    only the entries whose signing key is no longer trusted (record the key id with each
    entry); a key that was only added lifts nothing."""
    a = Decision("block", X, T0, T0 + 3600)
    b = Decision("block", Y, T0, T0 + 3600)
    sub, st = agent(tmp_path)
    run(sub._snapshot(FakeSub([msg(1, a), msg(2, b)]), 2, "stream-1", 2))
    st.close()
    k2 = tmp_path / "k2.pub"
    k2.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    sub, st = agent(tmp_path, keys=(str(public_key_file(tmp_path)), str(k2)))
    try:
        assert set(sub.blocks(T0 + 5)) == {X, Y}
        run(sub._snapshot(FakeSub([]), 0, "stream-2", 0))       # "empty", says the server
        blocks = sub.blocks(T0 + 5)
    finally:
        st.close()
    assert set(blocks) == {X, Y}, "adding a key let a server lift every block signed by the old one"


def test_finding_a_forward_clock_step_lifts_fleet_blocks_for_good(tmp_path):
    """Attack: the agent's wall clock steps forward by two days (an unauthenticated NTP
    answer, attacker (c), or a broken RTC) and back again. While it is ahead, the
    subscriber's forget_expired deletes every entry (blocks and revoke tombstones) and
    reconcile empties the fleet table; decisions arriving meanwhile are refused as
    "expired" and never fetched again. When the clock is right again nothing brings them
    back: the stream is not reread (no reset) and the cursor is past them. Attacker
    controls: the node's time for a minute. Harm: every fleet block is lifted on that node
    for the rest of its lifetime (the attackers the fleet blocked get through), and the
    revoke tombstones are gone, so a replayed block is applied again. Fix: forget entries
    only a margin (e.g. max_lifetime_s) after they run out, so blocks(now) takes them back
    when the clock returns; treat "expired" like issued_in_future (re-fetch) while the
    clock is suspect (a wall step against the monotonic clock)."""
    clock = Clock(T0 + 5)
    a = Decision("block", X, T0, T0 + 86400)
    sub, st = agent(tmp_path, clock=clock)
    try:
        run(sub._snapshot(FakeSub([msg(1, a)]), 1, "stream-1", 1))
        clock.now = T0 + 2 * 86400 + 5              # the step forward
        run(sub.forget_expired())
        clock.now = T0 + 65                          # corrected a minute later
        blocks = sub.blocks(clock.now)
    finally:
        st.close()
    assert X in blocks, "a block with 23 hours left was lifted for good by a clock step"


def test_finding_revoking_an_address_leaves_it_blocked_by_a_covering_network(store):
    """Attack (careless use, (d)): X is blocked by itself and, separately, by a block of its
    /24. The operator revokes X (a false positive: a customer's address). The mesh answers
    "decide" and publishes the revoke; every agent lifts the /32 and keeps dropping X
    through the /24, and nothing tells the operator. Proposals overlapping X are now
    refused (the standing revocation), but the /24 stays. Harm: the innocent party stays
    blocked fleet-wide while the operator believes it was released. Fix: operator_revoke
    names the covering blocks still in force (or refuses with that list, offering to
    revoke them too); `swarm-mesh decisions --target X` shows covering blocks."""
    dec, pub, clock = decider(store)
    run(dec.block("203.0.113.0/24", 3600, "scan source range", "ana"))
    clock.now += 1
    run(dec.block(X, 3600, "scanner", "ana"))
    clock.now += 1
    outcome = run(dec.revoke(X, "customer, false positive", "bob"))
    sent = [Message(i + 1, s, body) for i, (s, body, _) in enumerate(pub.sent)]
    entries = merged({}, plan({}, sent, CHECKS, clock.now))
    dropping = [t for t, e in entries.items() if e.blocking
                and ipaddress.ip_network(X).subnet_of(ipaddress.ip_network(t))]
    assert not dropping or "203.0.113.0/24" in outcome.reason, (
        f"revoke said {outcome.kind!r} ({outcome.reason}) while {dropping} still drops {X}")


def test_finding_a_forward_step_of_the_mesh_clock_makes_a_target_unblockable(store):
    """Attack: the mesh's clock steps a day ahead for a minute (an unauthenticated NTP
    answer to the mesh host, attacker (c)) while an operator (or a corroborated proposal)
    blocks X. That block B1 is issued a day ahead: every agent refuses it as
    issued_in_future. When the clock is back, the operator blocks X again: _after_latest
    issues B2 "just after its target's latest" -- a day ahead as well -- so it is refused
    everywhere too, and a corroborated proposal for X is answered "active" (B1 looks in
    force to the mesh). Attacker controls: the mesh host's time for a minute. Harm: X (the
    attacker's own address) cannot be blocked fleet-wide by anyone for a day, and B1 and
    B2 then fire a day late on whoever holds X by then. Fix: never issue past now + the
    agents' 300 s tolerance: a latest decision dated beyond that is a clock fault, to be
    superseded by one issued now (and the mesh re-issues the target's current decision)."""
    dec, pub, clock = decider(store)
    clock.now = T0 + 86400                      # the step
    run(dec.block(X, 3600, "scanner", "ana"))
    clock.now = T0 + 60                         # corrected
    run(dec.block(X, 3600, "scanner, again", "ana"))
    sent = [Message(i + 1, s, body) for i, (s, body, _) in enumerate(pub.sent)]
    out = plan({}, sent, CHECKS, T0 + 61)
    assert X in out.blocks(), (f"after the mesh clock came back X could not be blocked: "
                               f"{[r.reason for r in out.refusals]}")


# ============================================================================================
# Withstood (pass on the current code)
# ============================================================================================

def test_holds_a_replayed_revoke_from_before_a_reblock_is_stale(store):
    """Block, revoke, re-block X through the mesh (the re-block is issued after the revoke
    even in the same clock tick); a server replaying the old revoke lifts nothing."""
    dec, pub, clock = decider(store)
    run(dec.block(X, 3600, "", "ana"))
    run(dec.revoke(X, "", "ana"))
    run(dec.block(X, 3600, "again", "ana"))          # same clock tick for all three
    sent = [Message(i + 1, s, body) for i, (s, body, _) in enumerate(pub.sent)]
    entries = merged({}, plan({}, sent, CHECKS, T0 + 5))
    assert X in {t for t, e in entries.items() if e.blocking}
    out = plan(entries, [sent[1]], CHECKS, T0 + 10)
    assert [x.reason for x in out.refusals] == ["stale"] and not out.lifts(entries)


def test_holds_a_huge_sequence_number_only_forces_a_snapshot_that_lifts_nothing(tmp_path):
    """A server stamping a junk message with seq 2**62 moves the cursor there; the next
    session sees last_seq below it, reloads the snapshot, lifts nothing and rebases."""
    a = Decision("block", X, T0, T0 + 3600)
    sub, st = agent(tmp_path)
    try:
        run(sub._snapshot(FakeSub([msg(1, a)]), 1, "stream-1", 1))
        run(sub.apply([Message(2 ** 62, a.subject, b"junk")], created="stream-1"))
        assert sub.cursor == 2 ** 62
        session_with(sub, HonestServer([msg(1, a)]))
        assert X in sub.blocks(T0 + 5) and sub.cursor == 1
    finally:
        st.close()


def test_holds_duplicate_sequence_numbers_cannot_reorder_a_target(tmp_path):
    """The same sequence number on a block and then on its older predecessor (a server
    reordering or duplicating seq): the older one is stale whatever its seq."""
    b1 = Decision("block", X, T0, T0 + 3600)
    r = Decision("revoke", X, T0 + 1, T0 + 3600, revokes=b1.id)
    out = plan({}, [msg(7, r), msg(7, b1), msg(6, b1)], CHECKS, T0 + 5)
    assert X not in out.blocks() and [x.reason for x in out.refusals] == ["stale", "stale"]


def test_holds_a_revoke_during_the_canary_stage_reaches_every_node(store):
    """A corroborated block staged to canaries, revoked before promotion: the revoke is
    scoped to every node and the promotion never happens."""
    dec, pub, clock = decider(store, stage_s=60, min_nodes=1, min_providers=1)
    from tests.unit.test_redteam_r12 import prop
    run(dec.submit(prop("n1", "acme", now=clock.now)))
    d = json.loads(pub.sent[-1][1])["d"]
    assert d["scope"]["stage"] == "canary" and "node-a" not in d["scope"]["nodes"]
    clock.now += 5
    run(dec.revoke(X, "", "ana"))
    clock.now += 120
    assert run(dec.promote_due()) == []
    r = json.loads(pub.sent[-1][1])["d"]
    assert r["action"] == "revoke" and r["scope"] == {"stage": "all"}
