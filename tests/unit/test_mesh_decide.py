"""The decider (mesh/decide.py) over the in-memory store (tests/memstore.py, the Store
contract of FLEET-SPEC.md) and, where mesh/store.py is present, the real SQLite store, with
an in-process publisher that records what it was given or
fails like an absent nats-server. The real NATS path is tests/integration/test_mesh_nats.py."""
from __future__ import annotations

import asyncio

from agent.fleet.decision import Signer, Verifier, subject_for
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mesh.decide import Decider
from mesh.policy import Policy, PolicyConfig
from mesh.publish import PublishError
import pytest

from tests.memstore import STORE_KINDS, make_store

T0 = 1_800_000_000.0
KEY = Ed25519PrivateKey.generate()


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """Publishes into a list; `down` makes it fail as an unreachable server does."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, str]] = []
        self.down = False

    async def publish(self, subject: str, body: bytes, msg_id: str) -> int:
        if self.down:
            raise PublishError("nats-server at nats://127.0.0.1:1 is not connected (reconnecting)")
        self.sent.append((subject, body, msg_id))
        return len(self.sent)

    def decisions(self, now: float):
        v = Verifier([KEY.public_key()])
        return [v.open(body, subject, now) for subject, body, _ in self.sent]


@pytest.fixture(params=STORE_KINDS)
def store(request, tmp_path):
    s = make_store(request.param, tmp_path)
    yield s
    s.close()


def make(store, **cfg):
    pub, clock = Recorder(), Clock()
    cfg.setdefault("min_nodes", 3)
    cfg.setdefault("min_providers", 2)
    dec = Decider(store, Policy(PolicyConfig.from_dict(cfg)), Signer(KEY), pub, clock=clock)
    return dec, store, pub, clock


def prop(node, provider, target="203.0.113.7/32", n=0, clock=None):
    now = clock.now if clock else T0
    return {"proposal_id": f"{node}-{target}-{n}", "node": node, "provider": provider,
            "target": target, "rule": "net.ssh_bruteforce", "rule_version": "2",
            "incident_id": "i", "operator": "", "evidence": "{}", "created_at": now - 1,
            "ttl_s": 0, "event_class": "system_attack", "received_at": now}


def run(coro):
    return asyncio.run(coro)


def test_corroborated_proposals_become_one_signed_canary_decision(store):
    dec, store, pub, clock = make(store)

    async def go():
        kinds = [(await dec.submit(prop(n, p, clock=clock))).kind
                 for n, p in (("n1", "p1"), ("n2", "p1"), ("n3", "p2"))]
        again = await dec.submit(prop("n3", "p2", clock=clock))       # a retried proposal
        more = await dec.submit(prop("n4", "p3", clock=clock))
        return kinds, again, more

    kinds, again, more = run(go())
    assert kinds == ["pending", "pending", "decide"]
    assert again is None and more.kind == "active"
    [d] = pub.decisions(clock.now)
    assert d.scope == {"stage": "canary", "nodes": ["n1", "n2", "n3"]}
    assert pub.sent[0][0] == subject_for("203.0.113.7/32") and pub.sent[0][2] == d.id
    row = store.latest_decision("203.0.113.7/32")
    assert (row["state"], row["seq"], row["id"]) == ("published", 1, d.id)


def test_refusals_are_recorded_with_their_reasons(store):
    dec, store, pub, clock = make(store)

    async def go():
        await dec.submit(prop("n1", "p1", target="0.0.0.0/1", clock=clock))
        await dec.submit(prop("n1", "p1", target="100.64.1.1/32", clock=clock))
        await dec.block("10.0.0.1", 60, "", "alice")
        await dec.revoke("203.0.113.50", "", "alice")

    run(go())
    reasons = [(r["target"], r["source"], r["reason"]) for r in store.refusals()][::-1]
    assert reasons[0] == ("0.0.0.0/1", "proposal", "prefix /1 is wider than the limit of /24")
    assert reasons[1][2].startswith("100.64.1.1/32 overlaps the allowlisted CGNAT")
    assert reasons[2][:2] == ("10.0.0.1", "operator:alice")
    assert reasons[3][2] == "203.0.113.50/32 has no active block to revoke"
    assert all(r["at"] == T0 for r in store.refusals())
    assert pub.sent == []


def test_a_flood_from_one_node_is_refused_and_recorded(store):
    dec, store, pub, clock = make(store, rate_limit=30)

    async def go():
        return [(await dec.submit(prop("n1", "p1", target=f"198.51.100.{i}/32", clock=clock))).kind
                for i in range(45)]

    kinds = run(go())
    assert kinds[:30] == ["pending"] * 30 and kinds[30:] == ["refuse"] * 15
    refused = store.refusals()
    assert len(refused) == 15 and all(r["reason"].startswith("rate limit") for r in refused)
    assert {r["node"] for r in refused} == {"n1"}
    # Once the window has passed the node may propose again.
    clock.now += 601
    assert run(dec.submit(prop("n1", "p1", target="198.51.100.200/32", clock=clock))).kind == "pending"


def test_operator_block_and_revoke_are_published_on_one_subject(store):
    dec, store, pub, clock = make(store)

    async def go():
        b = await dec.block("203.0.113.9", 600, "seen by the SOC", "alice")
        clock.now += 5
        r = await dec.revoke("203.0.113.9/32", "false positive", "bob")
        return b, r

    b, r = run(go())
    block, revoke = pub.decisions(clock.now)
    assert block.id == b.decision.id and block.scope == {"stage": "all"}
    assert revoke.action == "revoke" and revoke.revokes == block.id
    assert revoke.expires_at == block.expires_at
    assert pub.sent[0][0] == pub.sent[1][0]


def test_nats_down_leaves_decisions_pending_and_republish_sends_only_the_latest(store):
    dec, store, pub, clock = make(store)
    pub.down = True

    async def go():
        await dec.block("203.0.113.9", 600, "", "alice")            # pending
        clock.now += 1
        await dec.revoke("203.0.113.9", "", "bob")                  # pending, supersedes it
        await dec.block("203.0.113.10", 1, "", "alice")             # pending, will expire
        await dec.block("203.0.113.11", 600, "", "alice")           # pending
        assert dec.publish_failures == 4 and "not connected" in dec.last_publish_error
        assert await dec.republish_pending() == (1, 3)     # the superseded one is retired
        clock.now += 5
        pub.down = False
        return await dec.republish_pending()

    assert run(go()) == (3, 0)
    sent = pub.decisions(clock.now)
    assert sorted((d.action, d.target) for d in sent) == [("block", "203.0.113.11/32"),
                                                          ("revoke", "203.0.113.9/32")]
    assert store.pending_decisions() == []
    states = {(d["target"], d["action"]): d["seq"] for d in store.decisions()}
    assert states[("203.0.113.9/32", "block")] == 0          # superseded: never sent
    assert states[("203.0.113.10/32", "block")] == 0         # expired while pending
    assert states[("203.0.113.9/32", "revoke")] in (1, 2)


def test_canary_is_promoted_after_stage_s_unless_revoked(store):
    dec, store, pub, clock = make(store, min_nodes=1, min_providers=1, stage_s=60)

    async def go():
        await dec.submit(prop("n1", "p1", clock=clock))
        await dec.submit(prop("n1", "p1", target="203.0.113.8/32", clock=clock))
        clock.now += 30
        early = await dec.promote_due()
        await dec.revoke("203.0.113.8", "", "bob")
        clock.now += 31
        late = await dec.promote_due()
        again = await dec.promote_due()
        return early, late, again

    early, late, again = run(go())
    assert early == [] and again == []
    [p] = late
    assert p.target == "203.0.113.7/32" and p.scope == {"stage": "all"}
    sent = pub.decisions(clock.now)
    assert [(d.target, d.action, d.scope["stage"]) for d in sent] == [
        ("203.0.113.7/32", "block", "canary"), ("203.0.113.8/32", "block", "canary"),
        ("203.0.113.8/32", "revoke", "all"), ("203.0.113.7/32", "block", "all")]
    assert sent[3].expires_at == sent[0].expires_at and sent[3].issued_at > sent[0].issued_at


def test_run_retries_with_backoff_until_nats_is_back(store):
    dec, store, pub, clock = make(store)
    pub.down = True

    async def go():
        await dec.block("203.0.113.9", 600, "", "alice")
        stop = asyncio.Event()
        task = asyncio.create_task(dec.run(stop, tick_s=0.05))
        await asyncio.sleep(0.3)
        failures = dec.publish_failures
        pub.down = False
        for _ in range(100):                        # backoff is 1 s after the first failure
            if not store.pending_decisions():
                break
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, 2)
        return failures

    failures = run(go())
    assert failures == 2                            # the first try and one retry, not 6
    assert store.pending_decisions() == [] and len(pub.sent) == 1


def test_from_config_names_the_wrong_setting(tmp_path):
    from agent.fleet.decision import generate_key
    from mesh.decide import Decider
    generate_key(tmp_path / "k.pem", tmp_path / "k.pub")
    nats = {"url": "nats://127.0.0.1:4222", "user": "mesh", "password_file": "/x"}
    dec = Decider.from_config(None, nats, {"private_key": str(tmp_path / "k.pem")},
                              {"min_nodes": 2})
    assert dec.policy.config.min_nodes == 2 and dec.publisher.options.user == "mesh"
    assert dec.publisher.config.max_age == 86400 + 3600
    for nats_, signing, policy, message in (
            ({}, {}, {}, "signing private_key .* is required"),
            ({}, {"key": "x"}, {}, "unknown signing setting 'key'"),
            ({"url": "http://x"}, {"private_key": "x"}, {}, "must start with nats:// or tls://"),
            ({"server": "x"}, {"private_key": "x"}, {}, "unknown nats setting 'server'"),
            ({}, {"private_key": "x"}, {"min_nodes": 0}, "policy min_nodes must be between"),
            ({}, {"private_key": str(tmp_path / "none")}, {}, "not an Ed25519 private key")):
        with pytest.raises(ValueError, match=message):
            Decider.from_config(None, nats_, signing, policy)


def test_a_revoke_after_the_mesh_clock_stepped_back_still_comes_after_the_block(store):
    """Agents refuse a decision not newer than the target's latest (a replayed block must
    not undo a revocation); an NTP step back on the mesh, or a block and its revoke in one
    clock tick, must not make the operator's revoke stale everywhere (red team r12 lead)."""
    dec, store, pub, clock = make(store)

    async def go():
        await dec.block("203.0.113.9", 600, "seen by the SOC", "alice")
        clock.now -= 60                  # the mesh's clock stepped back
        await dec.revoke("203.0.113.9/32", "false positive", "bob")
        await dec.block("203.0.113.10", 600, "one tick", "alice")
        await dec.revoke("203.0.113.10/32", "same tick", "bob")
    run(go())
    block, revoke, block2, revoke2 = pub.decisions(clock.now)
    assert revoke.issued_at > block.issued_at
    assert revoke.expires_at == block.expires_at      # kept until the block would end
    assert revoke2.issued_at > block2.issued_at
