"""Red team r11 against a real nats-server (tests/natsserver.py: the generated config with
its mesh and node users, JetStream in tmp_path): the mesh's publisher and decider, node
credentials used as an attacker would, and the agent's FleetSubscriber in dry run (no
nftables: it records what it would put in force). No namespaces, no root.

`test_finding_*` FAIL on 10d99e5 (the docstring says attack, attacker, harm, fix);
`test_holds_*` pass: attacks withstood, kept as regression tests."""
from __future__ import annotations

import asyncio
import ipaddress
import shutil
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import config as C
from agent._vendor import nats
from agent._vendor.nats.js import errors as js_errors
from agent._vendor.nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from agent.enforce.fleet import FleetEnforcer
from agent.fleet.decision import STREAM, Decision, Signer, subject_for
from agent.fleet.subscriber import FleetSubscriber
from agent.state.store import Store
from mesh.decide import Decider
from mesh.policy import Policy, PolicyConfig
from mesh.publish import NatsOptions, Publisher
from tests.memstore import MemStore
from tests.natsserver import NatsServer

KEY = Ed25519PrivateKey.generate()


@pytest.fixture
def srv(tmp_path):
    with NatsServer(tmp_path / "nats") as s:
        yield s


def publisher(srv) -> Publisher:
    return Publisher(NatsOptions(url=srv.url, **srv.creds("mesh"), ack_timeout_s=2.0,
                                 connect_timeout_s=2.0), max_ttl_s=86400)


def decider(srv, key=KEY, **cfg):
    cfg.setdefault("min_nodes", 1)
    cfg.setdefault("min_providers", 1)
    cfg.setdefault("stage_s", 0)
    pub = publisher(srv)
    return Decider(MemStore(), Policy(PolicyConfig.from_dict(cfg)), Signer(key), pub), pub


def prop(node, target, n=0):
    now = time.time()
    return {"proposal_id": f"{node}-{n}", "node": node, "provider": "p-" + node,
            "target": target, "rule": "net.connect_scan", "rule_version": 1,
            "incident_id": "i", "operator": "", "evidence": "", "created_at": now - 1,
            "ttl_s": 0.0, "event_class": "system_attack", "received_at": now}


def pem(tmp_path: Path, key: Ed25519PrivateKey, name: str) -> str:
    path = tmp_path / name
    path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return str(path)


class Agent:
    """A FleetSubscriber in dry run on node-1's NATS credentials, its own SQLite store."""

    def __init__(self, srv, state: Path, keys: list[str], clock=time.time):
        state.mkdir(parents=True, exist_ok=True)
        self.cfg = C.Config(state_dir=str(state), fleet=C.FleetConfig(
            nats_url=srv.url, keys=tuple(keys), reconnect_initial_s=0.1, reconnect_max_s=0.5,
            **srv.creds("node-1")))
        self.store = Store(self.cfg.db_path)
        self.sub = FleetSubscriber(self.cfg, self.store, FleetEnforcer(dry_run=True), "node-1",
                                   lambda: [ipaddress.ip_network("127.0.0.0/8")], clock=clock)
        self.sub.start()

    async def run_for(self, seconds: float) -> None:
        task = asyncio.create_task(self.sub.run())
        await asyncio.sleep(seconds)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    def close(self) -> None:
        self.store.close()


# ============================================================================================
# Findings
# ============================================================================================

def test_finding_a_lost_stream_loses_every_active_decision(srv):
    """Attack (careless operator / full or corrupt disk): nats-server's JetStream store is
    lost (a wiped volume, a corrupt store it discards, an operator's `nats stream rm`).
    The mesh reconnects and recreates the stream EMPTY; it republishes only decisions its
    store holds as pending, never the published, still active ones. Every agent sees the
    reset (creation time changed), loads the empty snapshot and LIFTS every fleet block,
    while `swarm-mesh decisions` still lists them as published. Fix: when the stream is
    (re)created or found behind the store, republish every active decision (the latest per
    target) from the store."""
    async def go():
        dec, pub = decider(srv)
        out = await dec.block("203.0.113.1", 3600, "scanner", "ana")
        assert out.kind == "decide" and dec.store.latest_decision("203.0.113.1/32")["state"] == "published"
        srv.kill()
        shutil.rmtree(srv.store_dir)
        srv.start()
        stop = asyncio.Event()
        task = asyncio.create_task(dec.run(stop, tick_s=0.2))
        await asyncio.sleep(5)
        stop.set()
        await task
        try:
            got = await pub._js.get_last_msg(STREAM, subject_for("203.0.113.1/32"))
        except js_errors.NotFoundError:
            got = None
        except Exception as e:   # noqa: BLE001
            got = e
        await dec.close()
        return got

    got = asyncio.run(go())
    assert got is not None and not isinstance(got, Exception), \
        f"the active block is gone from the recreated stream: {got!r}"


def test_finding_a_node_creates_consumers_that_outlive_it(srv):
    """Attack: a malicious node with its NATS node credentials creates consumers on
    SWARM_DECISIONS through the one API subject it is allowed
    ($JS.API.CONSUMER.CREATE.SWARM_DECISIONS), each with an inactive_threshold of a year
    (push ones delivering to an inbox nobody reads, and pull ones), as many as it likes,
    then disconnects. natsconf promises a node "cannot create durable consumers that
    outlive it"; these do: they stay on the server (memory, CPU, each tracked on every
    message), the node can repeat it until nats-server falls over, and the mesh has no
    per-node limit or reaper. Fix: per-node NATS accounts/limits (max consumers per
    user is not expressible with users; an account per node or a JetStream account
    limit), and a mesh task that deletes consumers inactive longer than a few minutes."""
    async def go():
        dec, pub = decider(srv)
        await dec.block("203.0.113.2", 3600, "", "ana")
        nc = await nats.connect(srv.url, **srv.creds("node-1"), max_reconnect_attempts=1)
        js = nc.jetstream(timeout=2)
        made = 0
        for i in range(100):
            cfg = ConsumerConfig(ack_policy=AckPolicy.NONE, inactive_threshold=365 * 86400.0)
            if i % 2:
                cfg.deliver_subject = f"_INBOX.nobody.{i}"
            try:
                await js.add_consumer(STREAM, cfg)
                made += 1
            except nats.errors.Error:
                pass
        await nc.close()
        await asyncio.sleep(8)              # well past the 5 s default of ephemeral consumers
        info = await pub._js.stream_info(STREAM)
        await dec.close()
        return made, info.state.consumer_count

    made, remaining = asyncio.run(go())
    assert remaining == 0, f"{remaining} of the {made} consumers a departed node made are still there"


def test_finding_a_scoped_ipv6_decision_wedges_the_mesh_publisher(srv):
    """Attack: a node (min_nodes 1, or three colluding nodes of two providers) proposes
    "2001:db8::1%a b/128": the policy keeps the IPv6 zone, subject_for keeps the space,
    and the vendored nats-py refuses the subject ("invalid subject"; that it checks
    whitespace/CRLF is what keeps this from being protocol injection on the mesh's
    connection). The decision stays pending for ever and, being the oldest,
    republish_pending retries it first and stops at its failure: any decision that missed
    its first publish (nats-server restarting, a blip) stays pending behind it for ever,
    and run() keeps backing off, so canary promotion stops too. Attacker: a proposal's
    target string. Fix: refuse zones and odd characters in normalize_target; let
    republish_pending skip (and record) a decision that fails for a reason other than the
    server being away."""
    async def go():
        dec, pub = decider(srv)
        poison = await dec.submit(prop("evil", "2001:db8::1%a b/128"))
        srv.stop()                                       # a nats-server restart
        honest = await dec.submit(prop("honest", "203.0.113.5/32"))
        srv.start()
        await asyncio.sleep(2.5)                         # the client reconnects by itself
        settled = None
        for _ in range(3):
            settled = await dec.republish_pending()
            await asyncio.sleep(0.5)
        pending = [d["target"] for d, _ in dec.store.pending_decisions()]
        await dec.close()
        return poison, honest, pending, settled

    poison, honest, pending, settled = asyncio.run(go())
    assert honest.kind == "decide"
    assert "203.0.113.5/32" not in pending, (
        f"the honest decision is stuck behind {pending[0]!r} ({poison.kind}); "
        f"republish_pending -> {settled}")


def test_finding_a_decision_refused_during_clock_skew_is_never_applied(srv, tmp_path):
    """Attack (careless operator): a node's clock runs 7 minutes slow (NTP broken). A
    decision published meanwhile is refused as "issued more than 5 minutes in the future"
    -- rightly -- but plan() moves the cursor past it and commits it, so it is never read
    again: after NTP fixes the clock, and after a restart, the node still does not enforce
    that block (the stream is not reset, so no snapshot). Same for anything transiently
    refusable. Harm: silent, permanent holes in a node's enforcement. Fix: do not advance
    the cursor past a decision refused for a transient reason (issued_in_future,
    untrusted_key), or keep such decisions and retry them."""
    async def go():
        dec, pub = decider(srv)
        skew = {"s": -420.0}
        agent = Agent(srv, tmp_path / "agent", [pem(tmp_path, KEY, "mesh.pub")],
                      clock=lambda: time.time() + skew["s"])
        try:
            await agent.run_for(1.0)
            assert (await dec.block("203.0.113.3", 3600, "", "ana")).kind == "decide"
            await agent.run_for(2.0)
            refused = dict(agent.sub.refused)
            skew["s"] = 0.0                                    # NTP is back
            await agent.run_for(2.0)
        finally:
            agent.close()
        again = Agent(srv, tmp_path / "agent", [pem(tmp_path, KEY, "mesh.pub")])   # a restart
        try:
            await again.run_for(3.0)
            blocks = again.sub.blocks(time.time())
        finally:
            again.close()
        await dec.close()
        return refused, blocks

    refused, blocks = asyncio.run(go())
    assert refused.get("issued_in_future")
    assert "203.0.113.3/32" in blocks, "the decision refused during the skew is never applied"


def test_finding_a_key_rotation_in_the_wrong_order_loses_decisions_for_good(srv, tmp_path):
    """Attack (careless operator): the mesh is switched to a new signing key before every
    agent trusts it. Agents refuse its decisions as untrusted_key -- rightly -- and move
    their cursor past them. The operator then adds the new public key to fleet.keys and
    restarts the agents: the decisions signed meanwhile are never read again (no reset, so
    no snapshot), and those blocks stay missing on those nodes until each target gets a new
    decision. Fix: on a change of the trusted key set (or after untrusted_key refusals)
    reload the snapshot, or keep the cursor before such refusals."""
    new = Ed25519PrivateKey.generate()

    async def go():
        dec, pub = decider(srv, key=new)
        agent = Agent(srv, tmp_path / "agent", [pem(tmp_path, KEY, "old.pub")])
        try:
            await agent.run_for(1.0)
            assert (await dec.block("203.0.113.4", 3600, "", "ana")).kind == "decide"
            await agent.run_for(2.0)
            refused = dict(agent.sub.refused)
        finally:
            agent.close()
        again = Agent(srv, tmp_path / "agent",
                      [pem(tmp_path, KEY, "old.pub"), pem(tmp_path, new, "new.pub")])
        try:
            await again.run_for(3.0)
            blocks = again.sub.blocks(time.time())
        finally:
            again.close()
        await dec.close()
        return refused, blocks

    refused, blocks = asyncio.run(go())
    assert refused.get("untrusted_key")
    assert "203.0.113.4/32" in blocks, "the decision signed before the key was trusted is lost"


# ============================================================================================
# Withstood
# ============================================================================================

def test_holds_a_node_cannot_aim_a_consumer_at_the_stream_or_the_jetstream_api(srv):
    """Withstood: a node's consumer delivering onto a decision subject is refused by
    nats-server ("deliver subject forms a cycle": no re-stored messages, no displacing a
    target's latest decision), and consumers delivering the stream's messages onto
    $JS.API.STREAM.PURGE/DELETE.SWARM_DECISIONS (accepted: the server does not check a
    deliver subject against the creator's permissions) do not purge or delete the stream.
    (Also tested elsewhere: nodes cannot publish, purge, delete, update, make durable
    consumers or subscribe to decisions or the mesh inbox.)"""
    async def go():
        dec, pub = decider(srv)
        await dec.block("203.0.113.6", 3600, "", "ana")
        await dec.block("203.0.113.7", 3600, "", "ana")
        nc = await nats.connect(srv.url, **srv.creds("node-1"), max_reconnect_attempts=1)
        js = nc.jetstream(timeout=2)
        cycle = None
        try:
            await js.add_consumer(STREAM, ConsumerConfig(
                deliver_subject=subject_for("203.0.113.6/32"), ack_policy=AckPolicy.NONE,
                deliver_policy=DeliverPolicy.ALL))
        except nats.errors.Error as e:
            cycle = str(e)
        for api in ("$JS.API.STREAM.PURGE.SWARM_DECISIONS", "$JS.API.STREAM.DELETE.SWARM_DECISIONS"):
            try:
                await js.add_consumer(STREAM, ConsumerConfig(
                    deliver_subject=api, ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL))
            except nats.errors.Error:
                pass
        await asyncio.sleep(1.5)
        await nc.close()
        info = await pub._js.stream_info(STREAM)
        await dec.close()
        return cycle, info

    cycle, info = asyncio.run(go())
    assert cycle is not None and "cycle" in cycle
    assert info.state.messages == 2 and info.state.last_seq == 2
