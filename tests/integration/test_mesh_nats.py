"""The decision side of the mesh against a real nats-server (tests/natsserver.py: a free port,
JetStream in tmp_path, the configuration mesh.natsconf writes, killed at the end): decisions
arrive signed on their subject, the stream keeps the latest per target, node users can
only read, a republish after a restart is deduplicated, a flood is refused and recorded.

The store is tests/memstore.py (the Store contract) and, where mesh/store.py is present,
also the real SQLite store for the tests that lean on it. Node connections follow the consumer recipe in
mesh/natsconf.py, the one the agent uses."""
from __future__ import annotations

import asyncio
import subprocess
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent._vendor import nats
from agent._vendor.nats.js.api import ConsumerConfig, DeliverPolicy
from agent.fleet.decision import STREAM, Decision, Signer, Verifier, subject_for
from mesh.decide import Decider
from mesh.policy import Policy, PolicyConfig
from mesh.publish import NatsOptions, Publisher, PublishError
from tests.memstore import STORE_KINDS, MemStore, make_store
from tests.natsserver import NatsServer, free_port, nats_binary

KEY = Ed25519PrivateKey.generate()
VERIFY = Verifier([KEY.public_key()])


@pytest.fixture
def srv(tmp_path):
    """A running nats-server with the fleet config (users mesh, node-1, node-2); killed after."""
    with NatsServer(tmp_path / "nats") as s:
        yield s


@pytest.fixture(params=STORE_KINDS)
def store(request, tmp_path):
    s = make_store(request.param, tmp_path)
    yield s
    s.close()


def publisher(srv, **kw) -> Publisher:
    return Publisher(NatsOptions(url=srv.url, **srv.creds("mesh"), **kw), max_ttl_s=86400)


def decider(srv, store=None, pub=None, **cfg):
    cfg.setdefault("min_nodes", 3)
    cfg.setdefault("min_providers", 2)
    pub = pub or publisher(srv)
    return Decider(store or MemStore(), Policy(PolicyConfig.from_dict(cfg)), Signer(KEY), pub), pub


async def node(srv, name="node-1"):
    """A node's connection and the errors the server reported to it."""
    errors: list[str] = []

    async def on_error(e):
        errors.append(str(e))

    nc = await nats.connect(srv.url, **srv.creds(name), error_cb=on_error,
                            max_reconnect_attempts=2, connect_timeout=2)
    return nc, errors


async def read_all(js, start_seq=1, want=1, timeout_s=5.0):
    """The recipe: an ordered push consumer on the stream from `start_seq`."""
    got = []
    done = asyncio.Event()

    async def on_msg(msg):
        got.append(msg)
        if len(got) >= want:
            done.set()

    sub = await js.subscribe("swarm.decisions.>", stream=STREAM, ordered_consumer=True,
                             idle_heartbeat=1, cb=on_msg,
                             deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                             config=ConsumerConfig(opt_start_seq=start_seq))
    try:
        await asyncio.wait_for(done.wait(), timeout_s)
    finally:
        await sub.unsubscribe()
    return got


def prop(node_name, provider, target, n=0, now=None):
    now = now or time.time()
    return {"proposal_id": f"{node_name}-{target}-{n}", "node": node_name, "provider": provider,
            "target": target, "rule": "net.ssh_bruteforce", "rule_version": "2",
            "incident_id": "i", "operator": "", "evidence": "{}", "created_at": now - 1,
            "ttl_s": 0, "event_class": "system_attack", "received_at": now}


def test_generated_config_passes_nats_server_check(srv):
    out = subprocess.run([nats_binary(), "-c", str(srv.config_path), "-t"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert srv.config_path.stat().st_mode & 0o777 == 0o600


def test_decision_arrives_signed_on_its_subject(srv, store):
    async def go():
        dec, pub = decider(srv, store=store, min_nodes=2, min_providers=2)
        for n, p in (("node-1", "p1"), ("node-2", "p2")):
            out = await dec.submit(prop(n, p, "203.0.113.7/32"))
        nc, errors = await node(srv)
        msgs = await read_all(nc.jetstream(), want=1)
        await nc.close()
        await pub.close()
        return dec, out, msgs, errors

    dec, out, [msg], errors = asyncio.run(go())
    assert out.kind == "decide" and errors == []
    assert msg.subject == subject_for("203.0.113.7/32")
    d = VERIFY.open(msg.data, msg.subject, out.decision.issued_at + 1)
    assert d == out.decision and d.scope == {"stage": "canary", "nodes": ["node-1", "node-2"]}
    assert msg.headers["Nats-Msg-Id"] == d.id
    row = dec.store.latest_decision("203.0.113.7/32")
    assert row["state"] == "published" and row["seq"] == msg.metadata.sequence.stream


def test_stream_keeps_only_the_latest_per_target_and_replays_from_a_seq(srv):
    async def go():
        dec, pub = decider(srv)
        await dec.block("203.0.113.9", 600, "", "alice")
        await dec.block("198.51.100.0/24", 600, "", "alice")
        await dec.revoke("203.0.113.9", "false positive", "bob")
        nc, errors = await node(srv)
        js = nc.jetstream()
        info = await js.stream_info(STREAM)
        everything = await read_all(js, want=2)
        tail = await read_all(js, start_seq=3, want=1)
        last = await js.get_last_msg(STREAM, subject_for("203.0.113.9/32"))
        await nc.close()
        await pub.close()
        return info, everything, tail, last, errors

    info, everything, tail, last, errors = asyncio.run(go())
    assert info.state.messages == 2 and info.state.last_seq == 3
    assert info.config.max_msgs_per_subject == 1 and info.config.max_age == 86400 + 3600
    assert [(m.subject, m.metadata.sequence.stream) for m in everything] == [
        (subject_for("198.51.100.0/24"), 2), (subject_for("203.0.113.9/32"), 3)]
    assert [m.metadata.sequence.stream for m in tail] == [3]
    revoke = VERIFY.open(last.data, last.subject, time.time())
    assert revoke.action == "revoke" and errors == []


def test_a_node_user_can_only_read(srv):
    async def go():
        dec, pub = decider(srv)
        await dec.block("203.0.113.9", 600, "", "alice")
        nc, errors = await node(srv)
        js = nc.jetstream(timeout=1.0)
        # Even a validly signed message (a stolen envelope) cannot be put on the stream.
        forged = Signer(KEY).envelope(Decision(action="revoke", target="203.0.113.9/32",
                                               issued_at=time.time(), expires_at=time.time() + 60))
        await nc.publish(subject_for("203.0.113.9/32"), forged)
        await nc.flush()
        attempts = {
            "js publish": js.publish(subject_for("203.0.113.9/32"), forged),
            "purge": js.purge_stream(STREAM),
            "delete stream": js.delete_stream(STREAM),
            "delete message": js.delete_msg(STREAM, 1),
            "update stream": js.update_stream(pub.config),
            "durable consumer": js.add_consumer(STREAM, ConsumerConfig(durable_name="mine")),
            "named consumer": js.add_consumer(STREAM, ConsumerConfig(name="mine")),
            "list consumers": js.consumers_info(STREAM),
        }
        outcomes = {}
        for what, subject in (("subscribe decisions", "swarm.decisions.>"),
                              ("subscribe mesh inbox", "_INBOX_MESH.>")):
            await nc.subscribe(subject)
        await nc.flush()
        for what, coro in attempts.items():
            try:
                await coro
                outcomes[what] = "allowed"
            except (nats.errors.Error, asyncio.TimeoutError) as e:
                outcomes[what] = type(e).__name__
        await asyncio.sleep(0.2)
        mesh_js = pub._js
        info = await mesh_js.stream_info(STREAM)
        await nc.close()
        await pub.close()
        return outcomes, errors, info

    outcomes, errors, info = asyncio.run(go())
    assert all(v != "allowed" for v in outcomes.values()), outcomes
    violations = [e for e in errors if "permissions violation for publish" in e]
    assert any('"swarm.decisions.v4.203-0-113-9.32"' in e for e in violations), errors
    for subject in ("purge.swarm_decisions", "stream.delete.swarm_decisions",
                    "msg.delete.swarm_decisions", "stream.update.swarm_decisions",
                    "durable.create.swarm_decisions.mine", "consumer.create.swarm_decisions.mine",
                    "consumer.list.swarm_decisions"):
        assert any(subject in e.lower() for e in violations), (subject, errors)
    assert info.state.messages == 1 and info.state.last_seq == 1     # nothing got in
    subs = [e for e in errors if "permissions violation for subscription" in e]
    assert any('"swarm.decisions.>"' in e for e in subs), errors
    assert any('"_inbox_mesh.>"' in e.lower() for e in subs), errors


def test_republish_after_a_restart_is_deduplicated(srv, store):
    async def go():
        dec, pub = decider(srv, store=store)
        # A crash between the ack and mark_published: stored, sent, still pending.
        out = dec.policy.operator_block("203.0.113.9", 600, "", "alice", time.time())
        envelope = dec.signer.envelope(out.decision)
        store.add_decision(out.decision.to_dict(), envelope)
        first = await pub.publish(out.decision.subject, envelope, out.decision.id)
        await pub.close()
        srv.stop()                              # nats-server restarts too
        srv.start()
        dec2, pub2 = decider(srv, store=store)  # the mesh service restarts
        settled = await dec2.republish_pending()
        info = await pub2._js.stream_info(STREAM)
        await pub2.close()
        return first, settled, store.latest_decision("203.0.113.9/32"), info

    first, settled, row, info = asyncio.run(go())
    assert settled == (1, 0)
    assert row["state"] == "published" and row["seq"] == first == 1
    assert info.state.messages == 1 and info.state.last_seq == 1


def test_a_flood_from_one_node_is_refused_and_recorded(srv, store):
    async def go():
        dec, pub = decider(srv, store=store, rate_limit=30)
        kinds = [(await dec.submit(prop("node-1", "p1", f"198.51.100.{i}/32"))).kind
                 for i in range(50)]
        ok = [(await dec.submit(prop(n, p, "198.51.100.1/32"))).kind
              for n, p in (("node-2", "p2"), ("node-3", "p3"))]
        info = await pub._js.stream_info(STREAM)
        await pub.close()
        return dec, kinds, ok, info

    dec, kinds, ok, info = asyncio.run(go())
    assert kinds.count("refuse") == 20 and kinds[-1] == "refuse"
    refusals = dec.store.refusals()
    assert len(refusals) == 20 and all(r["reason"].startswith("rate limit: ") for r in refusals)
    assert ok == ["pending", "decide"]          # node-1's early, in-rate vote still counts
    assert info.state.messages == 1


def test_nats_down_is_one_sentence_and_pending_decisions_follow_when_it_is_back(tmp_path):
    port = free_port()
    s = NatsServer(tmp_path / "nats", port=port)

    async def go():
        dec, pub = decider(s, pub=Publisher(NatsOptions(
            url=s.url, **s.creds("mesh"), connect_timeout_s=1.0), max_ttl_s=86400))
        with pytest.raises(PublishError) as e:
            await pub.connect()
        out = await dec.block("203.0.113.9", 600, "", "alice")
        assert dec.store.latest_decision("203.0.113.9/32")["state"] == "pending"
        s.start()
        stop = asyncio.Event()
        task = asyncio.create_task(dec.run(stop, tick_s=0.1))
        for _ in range(100):
            if not dec.store.pending_decisions():
                break
            await asyncio.sleep(0.1)
        stop.set()
        await task
        nc, _ = await node(s)
        [msg] = await read_all(nc.jetstream(), want=1)
        await nc.close()
        await pub.close()
        return str(e.value), out, msg

    try:
        message, out, msg = asyncio.run(go())
    finally:
        s.kill()
    assert message.startswith(f"cannot connect to nats-server at nats://127.0.0.1:{port}")
    assert "\n" not in message
    assert VERIFY.open(msg.data, msg.subject, out.decision.issued_at).id == out.decision.id


def test_the_node_recipe_survives_a_server_restart(srv):
    """The ordered consumer of the recipe, as a node user: it recreates itself after
    nats-server restarts (needing only the permissions natsconf grants) and goes on from
    the next sequence."""
    async def go():
        dec, pub = decider(srv)
        await dec.block("203.0.113.1", 600, "", "alice")
        got: list = []
        nc = await nats.connect(srv.url, **srv.creds("node-2"), max_reconnect_attempts=-1,
                                reconnect_time_wait=0.2)
        errors: list[str] = []
        nc._error_cb = lambda e: errors.append(str(e)) or asyncio.sleep(0)

        async def on_msg(msg):
            got.append(msg.metadata.sequence.stream)

        sub = await nc.jetstream().subscribe(
            "swarm.decisions.>", stream=STREAM, ordered_consumer=True, idle_heartbeat=0.5,
            cb=on_msg, deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            config=ConsumerConfig(opt_start_seq=1))
        for _ in range(50):
            if got:
                break
            await asyncio.sleep(0.1)
        await asyncio.to_thread(srv.stop)     # off the loop: the clients see the EOF at once
        await asyncio.to_thread(srv.start)
        stop = asyncio.Event()
        loop = asyncio.create_task(dec.run(stop, tick_s=0.1))   # retries what fails meanwhile
        await dec.block("203.0.113.2", 600, "", "alice")
        for _ in range(150):
            if len(got) >= 2:
                break
            await asyncio.sleep(0.1)
        stop.set()
        await loop
        await sub.unsubscribe()
        await nc.close()
        await pub.close()
        return got, errors

    got, errors = asyncio.run(go())
    assert got[:2] == [1, 2], (got, errors)
    assert not [e for e in errors if "permission" in e.lower()], errors


def test_tls_with_client_certificates(tmp_path):
    """natsconf's TLS: the server verifies client certificates; the publisher connects with
    its CA and client pair; a client without a certificate is turned away."""
    from tests.meshrecv import make_certs
    certs = make_certs(tmp_path / "certs")
    with NatsServer(tmp_path / "nats", tls_cert=str(certs["server_cert"]),
                    tls_key=str(certs["server_key"]), tls_ca=str(certs["ca"])) as s:
        async def go():
            pub = Publisher(NatsOptions(url=s.url, **s.creds("mesh"), tls_ca=str(certs["ca"]),
                                        tls_cert=str(certs["client_cert"]),
                                        tls_key=str(certs["client_key"])), max_ttl_s=3600)
            seq = await pub.publish(subject_for("203.0.113.9/32"), b"{}", "tls-1")
            await pub.close()
            bare = Publisher(NatsOptions(url=s.url, **s.creds("mesh"), tls_ca=str(certs["ca"]),
                                         connect_timeout_s=1.0), max_ttl_s=3600)
            with pytest.raises(PublishError) as e:
                await bare.connect()
            return seq, str(e.value)

        seq, message = asyncio.run(go())
    assert s.url.startswith("tls://") and seq == 1
    assert message.startswith("cannot connect to nats-server at tls://")


def test_a_deleted_stream_is_recreated_on_the_next_publish(srv):
    """The publish that finds the stream gone recreates it, then every target's current
    decision is published again (agents reload the new stream's snapshot)."""
    async def go():
        dec, pub = decider(srv)
        await dec.block("203.0.113.1", 600, "", "alice")
        created = (await pub._js.stream_info(STREAM)).created
        await pub._js.delete_stream(STREAM)              # an operator reset the stream
        await dec.block("203.0.113.2", 600, "", "alice")
        info = await pub._js.stream_info(STREAM)
        await pub.close()
        return created, info, dec

    created, info, dec = asyncio.run(go())
    assert info.created != created and info.state.messages == 2
    assert dec.store.latest_decision("203.0.113.2/32")["seq"] == 1 and dec.publish_failures == 0
    assert dec.store.latest_decision("203.0.113.1/32")["seq"] == 2


def test_the_publisher_reaps_consumers_no_node_needs_and_keeps_the_agents_ones(srv):
    """A node's ordered consumer (the agent's recipe) survives the publisher's reaping; a
    pull consumer and a push one asking for an hour's inactive_threshold are deleted."""
    async def go():
        pub = Publisher(NatsOptions(url=srv.url, **srv.creds("mesh")), max_ttl_s=3600)
        await pub.publish(subject_for("203.0.113.9/32"), b"{}", "r-1")
        nc = await nats.connect(srv.url, **srv.creds("node-1"), max_reconnect_attempts=1)
        js = nc.jetstream(timeout=2)
        sub = await js.subscribe("swarm.decisions.>", stream=STREAM, ordered_consumer=True,
                                 deliver_policy=DeliverPolicy.ALL, idle_heartbeat=2.0)
        await js.add_consumer(STREAM, ConsumerConfig(inactive_threshold=3600.0))
        await js.add_consumer(STREAM, ConsumerConfig(deliver_subject="_INBOX.x",
                                                     inactive_threshold=3600.0))
        await asyncio.sleep(0.2)
        await pub.reap_consumers()
        deleted = pub.consumers_reaped      # this call's or the background loop's
        left = await pub._js.consumers_info(STREAM)
        got = await sub.next_msg(timeout=2)
        await nc.close()
        await pub.close()
        return deleted, left, got

    deleted, left, got = asyncio.run(go())
    assert deleted == 2 and len(left) == 1 and left[0].config.inactive_threshold == 5.0
    assert got.subject == subject_for("203.0.113.9/32")
