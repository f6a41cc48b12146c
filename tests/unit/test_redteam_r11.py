"""Red team r11: fleet decisions (issue 12) attacked as (a) a malicious or compromised
provider node holding a valid node certificate and the NATS node credentials, (b) an
off-path attacker who forges source addresses, (c) a careless operator.

Tests named `test_finding_*` FAIL on 10d99e5: each docstring says the attack, what the
attacker controls, the harm and what a fix looks like. Tests named `test_holds_*` pass:
attacks the code already withstands, kept as regression tests. The real nats-server
attacks are in tests/integration/test_redteam_r11_nats.py."""
from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import config as C
from agent.enforce.base import EnforceError
from agent.enforce.fleet import TABLE, FleetEnforcer, change_batch
from agent.fleet.apply import Checks, Message, plan
from agent.fleet.decision import (MAX_BODY_BYTES, Decision, Signer, Verifier,
                                  generate_key, subject_for)
from mesh import identity
from mesh.decide import Decider
from mesh.policy import Policy, PolicyConfig
from tests.memstore import STORE_KINDS, make_store

T0 = 1_800_000_000.0
KEY = Ed25519PrivateKey.generate()
SIGNER = Signer(KEY)
VERIFIER = Verifier([KEY.public_key()])


# -- helpers ---------------------------------------------------------------------------------
class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Recorder:
    """A publisher that keeps what it was given (as tests/unit/test_mesh_decide.py)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, str]] = []

    async def publish(self, subject: str, body: bytes, msg_id: str) -> int:
        self.sent.append((subject, body, msg_id))
        return len(self.sent)


@pytest.fixture(params=STORE_KINDS)
def store(request, tmp_path):
    s = make_store(request.param, tmp_path)
    yield s
    s.close()


def decider(store, **cfg):
    cfg.setdefault("min_nodes", 3)
    cfg.setdefault("min_providers", 2)
    cfg.setdefault("stage_s", 0)
    pub, clock = Recorder(), Clock()
    dec = Decider(store, Policy(PolicyConfig.from_dict(cfg)), SIGNER, pub, clock=clock)
    return dec, pub, clock


def prop(node, provider, target="203.0.113.7/32", n=0, now=T0, **kw):
    p = {"proposal_id": f"{node}-{target}-{n}", "node": node, "provider": provider,
         "target": target, "rule": "net.connect_scan", "rule_version": 1,
         "incident_id": "i", "operator": "", "evidence": "resets=80", "created_at": now - 1,
         "ttl_s": 0.0, "event_class": "system_attack", "received_at": now}
    p.update(kw)
    return p


def run(coro):
    return asyncio.run(coro)


def policy(**cfg) -> Policy:
    return Policy(PolicyConfig.from_dict(cfg))


def public_key_file(tmp_path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    pub = tmp_path / "mesh.pub"
    pub.write_bytes(KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return pub


CHECKS = Checks(VERIFIER, "node-a", allow=[ipaddress.ip_network("127.0.0.0/8")])


def msg(seq: int, d: Decision) -> Message:
    return Message(seq, d.subject, SIGNER.envelope(d))


# ============================================================================================
# Findings (fail on 10d99e5)
# ============================================================================================

def test_finding_one_voter_makes_a_corroborated_decision_unenforceable(store):
    """Attack: a malicious node (valid certificate) votes for a target honest nodes are
    proposing, with a 20 kB `rule` name (nothing bounds a proposal's rule, rule_version,
    operator or evidence strings; the store keeps them as sent). The policy copies every
    counted vote's rule into the decision's `reason` and `provenance.rules`, so the signed
    envelope grows past MAX_BODY_BYTES (16 kB) and EVERY agent refuses it as "oversized".
    The attacker controls one proposal; the honest corroboration is wasted and the target
    (e.g. the attacker's own scanner) is never blocked by the fleet: one node vetoes any
    decision it can vote on. Honest scale does the same without malice: a re-block after
    expiry counts every proposal of the window, and a few hundred voters' node names and
    proposal ids overflow 16 kB too. With a rule over nats-server's max_payload (1 MiB)
    the publish itself fails and republish_pending, which stops at the first failure,
    keeps every later pending decision behind it.
    Fix: bound what a decision carries (rule names truncated, at most N nodes/rules/
    proposal ids in provenance, or counts only), and refuse over-long proposal fields at
    the store."""
    dec, pub, clock = decider(store)

    async def go():
        await dec.submit(prop("n1", "p1"))
        await dec.submit(prop("n2", "p1"))
        return await dec.submit(prop("evil", "p2", rule="net.connect_scan" + "x" * 20000))

    out = run(go())
    assert out.kind == "decide"
    for subject, body, _ in pub.sent:
        assert len(body) <= MAX_BODY_BYTES, f"decision of {len(body)} bytes: agents refuse it"
        VERIFIER.open(body, subject, clock.now)


@pytest.mark.parametrize("revoked, proposed", [
    ("203.0.113.7/32", "203.0.113.0/24"),      # a covering network
    ("203.0.113.7/32", "203.0.113.6/31"),
    ("203.0.113.0/24", "203.0.113.7/32"),      # a narrower one inside the revoked network
])
def test_finding_an_operator_revocation_is_bypassed_by_another_prefix(store, revoked, proposed):
    """Attack: an operator blocked then REVOKED a target (a false positive: a customer's
    address, a partner's NAT). While the revocation stands the policy refuses new
    proposals for that exact target string only. Nodes (malicious, or honest ones whose
    rule keeps firing) propose a network covering it, or an address inside it: the
    `latest` decision the policy consults is the proposed string's own, so the revoked
    address is blocked fleet-wide again at once. The attacker controls the proposals'
    target prefix; the harm is that the operator's "never block this" is undone within
    minutes by any three nodes of two providers. Fix: while a revocation stands, refuse
    (record) proposals for any target overlapping the revoked one, not only equal."""
    dec, pub, clock = decider(store, max_prefix_v4=24)

    async def go():
        assert (await dec.block(revoked, 3600, "suspicious", "ana")).kind == "decide"
        clock.now += 10
        assert (await dec.revoke(revoked, "false positive: our customer", "ana")).kind == "decide"
        clock.now += 10
        outs = [await dec.submit(prop(n, p, target=proposed, now=clock.now))
                for n, p in (("n1", "p1"), ("n2", "p1"), ("n3", "p2"))]
        return outs[-1]

    out = run(go())
    assert out.kind != "decide", (f"{proposed} decided though the operator revoked {revoked}: "
                                  f"{out.reason}")


def test_finding_a_certificate_without_an_organization_is_a_second_provider():
    """Attack: one provider controls nodes n1, n2 (O=acme) and n3, whose certificate
    names no O (mesh/identity.py accepts it: provider ""; server.py only logs it once).
    The policy counts "" as a distinct provider, so one provider alone reaches
    min_providers=2 and spreads any block fleet-wide without anyone else's corroboration.
    The attacker controls which of its nodes' certificate requests omit O (or a CA that
    issues some without it). Fix: a node without a provider casts no vote for
    corroboration (or the mesh refuses its calls), never an independent provider."""
    pol = policy(min_nodes=3, min_providers=2)
    votes = [prop("n1", "acme"), prop("n2", "acme")]
    out = pol.evaluate(prop("n3", ""), now=T0, node_count=1, votes=votes, latest=None)
    assert out.kind != "decide", out.reason


def test_finding_provider_names_that_differ_in_case_or_spaces_count_twice():
    """Attack (low): a provider whose node certificates carry O="Acme" and O="acme " (case,
    trailing space: printable, accepted by mesh/identity.py) counts as two providers, so
    its own three nodes are "corroborated by 3 nodes of 2 providers". The attacker
    controls only how its O is spelled in its certificate requests. Fix: compare providers
    case-folded with whitespace collapsed (or map O to a provider id at enrolment)."""
    pol = policy(min_nodes=3, min_providers=2)
    votes = [prop("n1", "Acme"), prop("n2", "Acme")]
    out = pol.evaluate(prop("n3", "acme "), now=T0, node_count=1, votes=votes, latest=None)
    assert out.kind != "decide", out.reason


def test_finding_a_flood_of_stale_proposals_crowds_out_honest_votes(store):
    """Attack: one malicious node keeps its accomplice 203.0.113.7 from ever being
    blocked. It sends 1000 proposals for that target with created_at two days old. They
    are refused (rate limit, stale) but STORED, and the decider reads the votes of a target
    as the newest 1000 stored proposals (Store.proposals' default limit): honest votes
    older than the flood fall off the list, and stale/refused ones do not count, so the
    honest nodes n1, n2, n3 of two providers never reach corroboration. The attacker
    controls one node's proposals (a few kB of gRPC); the harm is a target that can never
    be blocked fleet-wide. Fix: don't store over-rate proposals (count them), and read
    votes as one row per node (DISTINCT node, newest) excluding refused ones."""
    dec, pub, clock = decider(store)

    async def go():
        await dec.submit(prop("n1", "p1"))
        await dec.submit(prop("n2", "p2"))
        for i in range(1000):
            store.add_proposal(prop("evil", "p3", n=i, created_at=T0 - 2 * 86400))
        return await dec.submit(prop("n3", "p1"))

    out = run(go())
    assert out.kind == "decide", out.reason


def test_finding_a_proposal_refused_for_the_rate_limit_still_counts_as_a_vote(store):
    """Attack: the per-node rate limit (30 per 600 s) refuses a flooding node's proposals,
    yet they stay in the store and count as corroborating votes for the next node's
    proposal of the same target (only wide or allowlisted ones are excluded from votes).
    A node can pre-vote on thousands of targets in one burst; each then needs fewer
    further votes, and the refusal recorded says "refused" while the node's voice counted.
    The attacker controls one node's proposal volume. Fix: a proposal refused for any
    reason is no vote (exclude the refusals' (node, proposal_id) when counting)."""
    dec, pub, clock = decider(store, rate_limit=30)

    async def go():
        for i in range(30):
            await dec.submit(prop("evil", "p1", target=f"198.51.100.{i}/32"))
        refused = await dec.submit(prop("evil", "p1"))
        assert refused.kind == "refuse" and "rate limit" in refused.reason
        await dec.submit(prop("n2", "p2"))
        return await dec.submit(prop("n3", "p3"))

    out = run(go())
    assert out.kind == "pending", f"the rate-limited vote counted: {out.reason}"


@pytest.mark.parametrize("target", [
    "2001:db8::1%eth0/128",           # an address with its zone, as `ip`/`ping` print it
    "2001:db8::1%a b/128",            # whitespace: a NATS protocol argument separator
    "2001:db8::1%\r\nUNSUB 1\r\n/128",  # CR LF: protocol injection on the mesh's connection
])
def test_finding_a_scoped_ipv6_target_passes_the_policy(target):
    """Attack: ipaddress accepts an IPv6 zone ("%" then anything but "%" and "/") and
    normalize_target keeps it, so a proposal (any node controls its target string) or an
    operator's pasted "2001:db8::1%eth0" is decided with the zone in its target and in
    its NATS subject (subject_for maps only "." and ":"). With whitespace or CR/LF the
    vendored nats-py refuses the subject ("invalid subject": protocol injection is
    withstood there), so the decision stays pending for ever and, being the oldest,
    stops republish_pending at every try (tests/integration/test_redteam_r11_nats.py).
    With a plain zone it is published and every agent applies it; nftables refuses the
    element and every later fleet change of that node fails with it
    (tests/integration/test_redteam_r11_agent.py). Fix: refuse a zone (or any character
    outside [0-9a-fA-F.:/]) in normalize_target, which the mesh and the agent share."""
    pol = policy()
    norm, net = pol.check_target(target)
    assert net is None or "%" not in norm, f"accepted as {norm!r}, subject {subject_for(norm)!r}"


def test_finding_the_agent_applies_a_signed_scoped_ipv6_decision():
    """Defence in depth for the above on the agent: a signed decision whose target carries
    an IPv6 zone is planned into the fleet set; the element "2001:db8::1%eth0" is then
    refused by nftables, and because every later change carries the whole set of blocks
    (change_batch, then table_batch on failure), each later decision fails too until it
    expires. Attacker: whoever gets such a target decided (colluding nodes, an operator's
    paste). Fix: Decision.check refuses a target with a zone (normalize_target)."""
    d = Decision("block", "2001:db8::1%eth0/128", T0, T0 + 600)
    out = plan({}, [msg(1, d)], CHECKS, T0)
    assert not out.blocks(), "a scoped target went into the fleet set"


def test_finding_a_deeply_nested_message_crashes_the_planner():
    """Attack: someone able to publish on swarm.decisions.> without the signing key -- the
    NATS mesh user's password, which nats.conf holds in clear beside every node password,
    or a second mesh service with the wrong key -- publishes 16,000 bytes of nested JSON
    arrays. Verifier.open parses before it verifies, json.loads raises RecursionError
    (not ValueError), plan() raises, the batch is never committed, the subscriber's session
    dies and reconnects at the same cursor, and reads the same message again: every agent
    of the fleet crash-loops on it and applies no decision ever after. Fix: catch
    RecursionError (or any exception) in Verifier.open as "malformed"."""
    body = b"[" * 8000 + b"]" * 8000
    assert len(body) <= MAX_BODY_BYTES
    out = plan({}, [Message(1, "swarm.decisions.v4.203-0-113-7.32", body)], CHECKS, T0)
    assert [r.reason for r in out.refusals] == ["malformed"] and out.cursor == 1


def test_finding_a_block_rule_on_forgeable_evidence_becomes_a_fleet_proposal(tmp_path):
    """Attack: an off-path attacker spoofs SYN floods from a victim's address (a CDN, a
    cloud NAT, a customer). A provider's operator wrote a custom rule `action: block` on
    `net.source` syns_per_s: the rule loader accepts it (only the packaged rules answer
    forgeable evidence with `challenge`), the responder blocks, and _propose turns every
    applied block_ip of a rule into a fleet proposal without looking at the rule's
    evidence. Three such nodes of two providers and the forged victim is blocked on every
    node of the fleet. The attacker controls only spoofed packets. Fix: propose only
    blocks from unforgeable events (tcp.established, tcp.verified_reset, process events) --
    or refuse `block` on forgeable events at rule load."""
    from agent.config import Config, Mesh
    from agent.enforce.base import DryRunEnforcer
    from agent.respond.engine import Responder
    from agent.state.store import Store
    from tests.unit.test_respond import ALLOW, BASE_S, POLICY, RULES, Clock as RClock, flood

    cfg = Config(state_dir=str(tmp_path), allowlist=ALLOW, mitigation=POLICY,
                 mesh=Mesh(endpoint="mesh.example:7443"))
    st = Store(cfg.db_path)
    try:
        clock = RClock()
        r = Responder(cfg, st, DryRunEnforcer([str(n) for n in ALLOW.networks()]), clock,
                      rules=RULES, to_wall=lambda ns: BASE_S + ns / 1e9)
        finding = flood(clock)                       # test.block: net.source syns_per_s
        assert finding.rule_id == "test.block"
        r.handle(finding)
        proposals = [r[0] for r in st._read("SELECT payload FROM outbox WHERE kind = 'proposal'")]
    finally:
        st.close()
    assert proposals == [], f"forgeable SYN evidence proposed to the fleet: {proposals}"


def test_finding_the_agent_applies_a_fleet_block_of_its_own_nats_server(tmp_path):
    """Attack (careless operator, then anyone who gets a decision through): the agent's
    fleet allowlist is loopback, allowlist.* and the host's addresses; the NATS servers
    it reads decisions from (fleet.nats_url) are not in it unless the operator also
    listed them under allowlist.mesh (the integration fixture has to). A fleet block of
    that address -- an operator's typo, or corroborating nodes -- is put in the fleet
    chain, which drops by source address before conntrack: the replies of nats-server
    are dropped, the agent can never receive the REVOKE, and the node stays cut off
    from the fleet until the block expires (up to 7 days). Fix: the subscriber puts the
    addresses of its NATS servers into its allowlist (or config validation refuses a
    nats_url outside allowlist.mesh)."""
    from agent.fleet.subscriber import FleetSubscriber
    from agent.state.store import Store

    pub = public_key_file(tmp_path)
    base = C.Config(state_dir=str(tmp_path),
                    fleet=C.FleetConfig(nats_url="nats://198.51.100.20:4222", keys=(str(pub),)))
    try:
        cfg = C.validate(base)
    except C.ConfigError as e:
        assert "nats" in str(e).lower()
        return                                       # refused at load: fixed that way
    st = Store(cfg.db_path)
    try:
        sub = FleetSubscriber(cfg, st, FleetEnforcer(dry_run=True), "node-a",
                              lambda: [ipaddress.ip_network("127.0.0.0/8"),
                                       *cfg.allowlist.networks()], clock=lambda: T0)
        sub.start()
        d = Decision("block", "198.51.100.20/32", T0, T0 + 86400)
        run(sub.apply([msg(1, d)]))
        blocked = sub.blocks(T0)
    finally:
        st.close()
    assert "198.51.100.20/32" not in blocked, "the agent blocked the server its revocations come from"


def test_finding_the_mesh_blocks_its_own_nats_server(tmp_path, store):
    """Attack (careless operator): the mesh's unoverridable allowlist is ALWAYS_ALLOWED
    plus what policy.infrastructure lists; the nats-server the mesh publishes to (nats.url)
    and the mesh itself are not added. Without an infrastructure list, three nodes of two
    providers (or an operator's typo) get the NATS server's public address blocked on every
    node: the whole fleet cuts itself off from its decision channel (see the agent finding
    above) and the revocation cannot reach anyone. Fix: Decider.from_config adds the hosts of
    nats.url (and the mesh's listen/advertised addresses) to the policy's allowlist."""
    generate_key(tmp_path / "k", tmp_path / "k.pub")
    dec = Decider.from_config(store, {"url": "nats://198.51.100.20:4222"},
                              {"private_key": str(tmp_path / "k")}, {"stage_s": 0},
                              clock=lambda: T0)
    dec.publisher = Recorder()
    out = run(dec.block("198.51.100.20", 3600, "typo", "ana"))
    run(dec.close())
    assert out.kind == "refuse", "the mesh decided to block its own nats-server"


def test_finding_canaries_older_than_the_newest_1000_decisions_are_never_promoted(store):
    """Attack (scale, or a node that gets many decisions made): promote_due reads active
    decisions with Store.decisions' default limit of 1000, newest first. A corroborated
    canary decision older than 1000 newer active decisions (operator blocks, other
    targets' decisions) is never looked at again: it stays on its canary nodes until it
    expires and never reaches the fleet. Fix: query canary decisions due for promotion
    directly (stage = canary, issued_at <= now - stage_s), without a row limit."""
    dec, pub, clock = decider(store, stage_s=60)

    async def go():
        for n, p in (("n1", "p1"), ("n2", "p1"), ("n3", "p2")):
            out = await dec.submit(prop(n, p, now=clock.now))
        assert out.kind == "decide" and out.decision.scope["stage"] == "canary"
        for i in range(1000):
            clock.now += 0.01
            assert (await dec.block(f"2001:db8::{i + 1:x}", 3600, "", "ana")).kind == "decide"
        clock.now = T0 + 120
        return await dec.promote_due()

    promoted = run(go())
    assert [d.target for d in promoted] == ["203.0.113.7/32"]


def test_finding_an_incomplete_snapshot_lifts_what_it_did_not_read(tmp_path):
    """Attack (a slow or briefly stalled nats-server, a node flooding the server with
    consumers, or just 100k decisions over a slow link): a snapshot load stops at the
    first 2 s without a message (SNAPSHOT_IDLE_S) or after 120 s, then applies what it
    read as the COMPLETE set of decisions -- lifting every block it did not get to -- and
    sets the cursor to the stream's last sequence, so the unread decisions are never read
    again. Harm: after a stream reset, blocks in force vanish from the node until their
    target gets a new decision. Fix: an early-ended snapshot lifts nothing and keeps the
    cursor at the last sequence read (or retries the snapshot)."""
    from agent.fleet.subscriber import FleetSubscriber
    from agent.state.store import Store

    pub = public_key_file(tmp_path)
    cfg = C.Config(state_dir=str(tmp_path),
                   fleet=C.FleetConfig(nats_url="nats://127.0.0.1:4222", keys=(str(pub),)))
    a = Decision("block", "203.0.113.7/32", T0, T0 + 3600)
    b = Decision("block", "203.0.113.8/32", T0, T0 + 3600)
    st = Store(cfg.db_path)
    try:
        sub = FleetSubscriber(cfg, st, FleetEnforcer(dry_run=True), "node-a",
                              lambda: [ipaddress.ip_network("127.0.0.0/8")], clock=lambda: T0 + 5)
        sub.start()
        run(sub.apply([msg(1, a), msg(2, b)], created="stream-1"))
        assert set(sub.blocks(T0 + 5)) == {a.target, b.target}

        class Stalling:                      # the reset stream: a at 1, b at 2; b is late
            def __init__(self):
                self.left = [msg(1, a)]

            async def next_msg(self, timeout):
                if not self.left:
                    raise asyncio.TimeoutError
                m = self.left.pop(0)
                return SimpleNamespace(subject=m.subject, data=m.body,
                                       metadata=SimpleNamespace(sequence=SimpleNamespace(stream=m.seq)))
        run(sub._snapshot(Stalling(), 2, "stream-2"))
        blocks = sub.blocks(T0 + 5)
    finally:
        st.close()
    assert b.target in blocks, f"an unread block was lifted (cursor {sub.cursor})"


# ============================================================================================
# Withstood (pass on 10d99e5)
# ============================================================================================

@pytest.mark.parametrize("target", [
    "0.0.0.0/1", "128.0.0.0/1", "203.0.113.0/23",          # wider than /24
    "203.0.113.7/24",                                       # host bits: ambiguous
    "::ffff:203.0.113.7/128", "::ffff:0:0/96",              # IPv4-mapped
    "64:ff9b::cb00:7107/128",                               # NAT64 of 203.0.113.7
    "100.64.0.1/32", "100.127.255.0/24",                    # CGNAT
    "10.0.0.1/32", "192.168.1.0/24", "127.0.0.1/32", "169.254.169.254/32",  # metadata
    "fe80::1/128", "fd00::1/128", "ff02::1/128", "::/128", "::1/128",
    "2001:db8::/47",                                        # wider than /48
    "203.0.113.7 /32", "", "x", "203.0.113.7/33",
])
def test_holds_the_mesh_refuses_wide_mapped_and_allowlisted_targets(target):
    """Withstood: proposals and operator blocks for wide prefixes, host-bit networks,
    IPv4-mapped / NAT64 forms of an address, CGNAT, private, loopback, link-local (cloud
    metadata), multicast and unspecified ranges are refused by the policy (and thus never
    signed), whoever asks."""
    pol = policy()
    assert pol.check_target(target)[1] is None
    assert pol.operator_block(target, 60, "", "ana", T0).kind == "refuse"


def test_holds_one_provider_with_many_nodes_is_not_corroboration():
    """Withstood: 50 nodes of one provider (all with O=acme) do not reach min_providers=2."""
    pol = policy(min_nodes=3, min_providers=2)
    votes = [prop(f"n{i}", "acme") for i in range(50)]
    assert pol.evaluate(prop("n50", "acme"), now=T0, node_count=1, votes=votes,
                        latest=None).kind == "pending"


def test_holds_node_requested_lifetimes_are_capped():
    """Withstood: colluding nodes asking for an infinite, NaN or huge ttl get at most the
    policy's max_ttl_s (lower median of the votes, capped)."""
    pol = policy(min_nodes=3, min_providers=2, max_ttl_s=7200)
    votes = [prop("n1", "p1", ttl_s=float("inf")), prop("n2", "p2", ttl_s=1e300)]
    out = pol.evaluate(prop("n3", "p3", ttl_s=float("nan")), now=T0, node_count=1,
                       votes=votes, latest=None)
    assert out.kind == "decide" and out.decision.expires_at - T0 == 7200


def test_holds_replays_across_targets_after_revoke_after_expiry_and_from_the_future():
    """Withstood on the agent: a signed block replayed on another target's subject
    (wrong_subject), replayed after its revocation (stale), after its expiry (expired),
    a decision issued more than 5 min in the future, one over the lifetime cap, and one
    signed by an unknown key are all refused and change nothing in force."""
    b = Decision("block", "203.0.113.7/32", T0, T0 + 600)
    r = Decision("revoke", b.target, T0 + 1, T0 + 600, revokes=b.id)
    out = plan({}, [msg(1, b), msg(2, r)], CHECKS, T0 + 2)
    assert out.blocks() == {}
    other = Decision("block", "198.51.100.9/32", T0, T0 + 600)
    cases = [
        Message(3, other.subject, SIGNER.envelope(b)),                      # across targets
        msg(4, b),                                                          # after the revoke
        msg(5, Decision("block", "198.51.100.1/32", T0 - 700, T0 - 100)),   # expired
        msg(6, Decision("block", "198.51.100.2/32", T0 + 400, T0 + 900)),   # the future
        msg(7, Decision("block", "198.51.100.3/32", T0, T0 + 8 * 86400)),   # over the cap
        Message(8, other.subject, Signer(Ed25519PrivateKey.generate()).envelope(other)),
    ]
    out2 = plan(out.upserts, cases, CHECKS, T0 + 2)
    assert out2.blocks() == {} and not out2.lifts(out.upserts)
    assert [x.reason for x in out2.refusals] == [
        "wrong_subject", "stale", "expired", "issued_in_future", "lifetime_over_cap",
        "untrusted_key"]


def test_holds_a_fleet_revoke_never_touches_the_agents_own_table():
    """Withstood: lifting fleet blocks changes only table inet swarm_agent_fleet; a
    local block of the same address (table inet swarm_agent) cannot be lifted by a
    fleet revoke, and the enforcer refuses any command naming another table."""
    cmds = change_batch({"203.0.113.7/32": T0 + 600, "198.51.100.0/24": T0 + 600}, {}, T0)
    for cmd in cmds:
        (body,) = cmd.values()
        (obj,) = body.values()
        assert obj["family"] == "inet" and obj["table"] == TABLE
    enf = FleetEnforcer(dry_run=False)
    with pytest.raises(EnforceError, match="left table"):
        enf._send([{"delete": {"element": {"family": "inet", "table": "swarm_agent",
                                           "name": "block_v4", "elem": ["203.0.113.7"]}}}])


def test_holds_a_local_allowlist_wins_over_a_covering_fleet_block():
    """Withstood: a fleet block of a network that merely overlaps the node's allowlist
    (its management network inside a /16) is refused whole: local allowlists win."""
    checks = Checks(VERIFIER, "node-a", allow=[ipaddress.ip_network("198.51.100.0/28")])
    out = plan({}, [msg(1, Decision("block", "198.51.0.0/16", T0, T0 + 600))], checks, T0)
    assert out.blocks() == {} and [r.reason for r in out.refusals] == ["allowlisted"]


@pytest.mark.parametrize("body", [b"x" * (MAX_BODY_BYTES + 1), b"\xff\xfe", b"{}", b"[]",
                                  b'{"d":1,"k":[],"s":null}', b'{"d":{},"k":"","s":""}'])
def test_holds_hostile_bodies_are_refused_not_raised(body):
    """Withstood: oversized, non-UTF-8, non-envelope and ill-typed envelopes are refusals
    (counted, cursor advanced), not exceptions."""
    out = plan({}, [Message(1, "swarm.decisions.v4.203-0-113-7.32", body)], CHECKS, T0)
    assert len(out.refusals) == 1 and out.cursor == 1


@pytest.mark.parametrize("cn, o", [(["a", "b"], ["p"]), (["a"], ["p", "q"]), ([], ["p"]),
                                   (["a\x00b"], ["p"]), (["a"], ["p\n"])])
def test_holds_certificates_with_odd_names_are_refused(cn, o):
    """Withstood: a node certificate with several CNs or Os, none, or control characters
    in them names no one (mesh/identity.py)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([*(x509.NameAttribute(NameOID.COMMON_NAME, c) for c in cn),
                      *(x509.NameAttribute(NameOID.ORGANIZATION_NAME, x) for x in o)])
    now = datetime.datetime(2030, 1, 1)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    with pytest.raises(identity.IdentityError):
        identity.from_pem(cert.public_bytes(serialization.Encoding.PEM))
