"""The decider's limits (mesh/decide.py, mesh/policy.py): a decision stays small whatever
its voters sent, a decision nats-server refuses for good is marked failed and the others
go on, a recreated stream gets every current decision again, and the fleet's own NATS
server and mesh are never blocked. A recording publisher stands in for nats-server."""
from __future__ import annotations

import asyncio
import json

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.fleet.decision import MAX_BODY_BYTES, Signer, generate_key
from mesh.decide import Decider
from mesh.policy import SCOPE_MAX_BYTES, Policy, PolicyConfig
from mesh.publish import PublishError
from tests.memstore import MemStore

T0 = 1_800_000_000.0
SIGNER = Signer(Ed25519PrivateKey.generate())


class Publisher:
    """Records what it publishes; `refuse`: subjects refused for good; `away`: all fail."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, str]] = []
        self.refuse: set[str] = set()
        self.away = False
        self.stream_resets = 0

    async def publish(self, subject: str, body: bytes, msg_id: str) -> int:
        if self.away:
            raise PublishError("nats-server is not connected")
        if subject in self.refuse:
            raise PublishError(f"JetStream refused {subject}", permanent=True)
        self.sent.append((subject, body, msg_id))
        return len(self.sent)


def make(**cfg):
    cfg = {"min_nodes": 1, "min_providers": 1, "stage_s": 0, **cfg}
    pub, store, now = Publisher(), MemStore(), [T0]

    def clock() -> float:                  # a second later at each look
        now[0] += 1.0
        return now[0]
    return Decider(store, Policy(PolicyConfig.from_dict(cfg)), SIGNER, pub,
                   clock=clock), store, pub


def prop(node: str, provider: str, target: str = "203.0.113.7/32", **kw) -> dict:
    p = {"proposal_id": f"{node}-{target}", "node": node, "provider": provider,
         "target": target, "rule": "net.connect_scan", "rule_version": 1, "operator": "",
         "created_at": T0 - 1, "ttl_s": 0.0, "received_at": T0}
    p.update(kw)
    return p


def test_hundreds_of_voters_with_long_odd_names_make_a_small_decision():
    dec, store, pub = make(min_nodes=3, min_providers=2, stage_s=60)
    odd = "\U0001F600" * 190                           # 12 bytes each in the envelope

    def vote(i: int) -> dict:
        return prop(f"{odd}{i:03d}", f"{odd}{i % 7}", rule=f"{odd}{i}", operator=f"{odd}op{i}")

    async def go():
        for i in range(299):
            store.add_proposal(vote(i))
        return await dec.submit(vote(299))

    out = asyncio.run(go())
    assert out.kind == "decide"
    (subject, body, _), = pub.sent
    assert len(body) < MAX_BODY_BYTES // 2, len(body)
    prov = out.decision.provenance
    assert (prov["node_count"], prov["provider_count"], prov["proposal_count"]) == (300, 7, 300)
    assert len(prov["nodes"]) == 10 and all(len(json.dumps(n)) <= 66 for n in prov["nodes"])
    nodes = out.decision.scope["nodes"]
    assert nodes and len(json.dumps(nodes)) <= SCOPE_MAX_BYTES + 2
    assert all(n.startswith(odd) and len(n) == 193 for n in nodes)  # whole names only


def test_a_decision_refused_for_good_is_failed_and_the_others_go_on():
    dec, store, pub = make()
    poison = "swarm.decisions.v4.203-0-113-7.32"
    pub.refuse.add(poison)

    async def go():
        assert (await dec.submit(prop("n1", "p1"))).kind == "decide"
        pub.away = True
        await dec.submit(prop("n2", "p2", target="203.0.113.8/32"))
        pub.away = False
        pub.refuse.clear()
        pub.refuse.add(poison)
        return await dec.republish_pending()

    settled = asyncio.run(go())
    assert settled == (1, 0)
    assert [s for s, _, _ in pub.sent] == ["swarm.decisions.v4.203-0-113-8.32"]
    assert store.latest_decision("203.0.113.7/32") is None        # failed: never in force
    assert any("cannot be published" in r["reason"] for r in store.refusals())
    assert dec.publish_failures == 2


def test_a_recreated_stream_gets_every_current_decision_again_oldest_first():
    dec, store, pub = make()

    async def go():
        await dec.block("203.0.113.1", 3600, "", "ana")
        await dec.block("203.0.113.2", 3600, "", "ana")
        await dec.revoke("203.0.113.1", "false positive", "ana")
        pub.sent.clear()
        pub.stream_resets += 1                           # the stream was missing
        return await dec.republish_pending()

    assert asyncio.run(go()) == (0, 0)
    assert [(s.rsplit(".", 2)[1], json.loads(b)["d"]["action"]) for s, b, _ in pub.sent] == [
        ("203-0-113-2", "block"), ("203-0-113-1", "revoke")]


def test_the_fleet_nats_server_and_the_mesh_are_never_blocked(tmp_path):
    generate_key(tmp_path / "k", tmp_path / "k.pub")
    dec = Decider.from_config(MemStore(), {"url": "tls://198.51.100.20:4222"},
                              {"private_key": str(tmp_path / "k")}, {"stage_s": 0},
                              listen="198.51.100.30:7443")
    dec.publisher = Publisher()

    async def go():
        return [await dec.block(t, 60, "", "ana")
                for t in ("198.51.100.20", "198.51.100.30", "198.51.100.0/24", "198.51.100.31")]

    outs = asyncio.run(go())
    assert [o.kind for o in outs] == ["refuse", "refuse", "refuse", "decide"]
    assert "NATS server" in outs[0].reason and "mesh service" in outs[1].reason
    unresolved = Decider.from_config(MemStore(), {"url": "nats://no-such-host.invalid:4222"},
                                     {"private_key": str(tmp_path / "k")}, {}, listen="0.0.0.0:7443")
    assert len(unresolved.policy.allowed) == len(dec.policy.allowed) - 2
