"""FleetSubscriber without a server: decisions refused for a passing reason are fetched
again (a stand-in for js.get_last_msg), and a changed trusted key set asks for a snapshot."""
from __future__ import annotations

import asyncio
import ipaddress
from types import SimpleNamespace

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import config as C
from agent.enforce.fleet import FleetEnforcer
from agent.fleet import subscriber as fs
from agent.fleet.apply import Message
from agent.fleet.decision import Decision, Signer
from agent.state import fleet as fleetdb
from agent.state.store import Store

T0 = 1_800_000_000.0
KEY = Ed25519PrivateKey.generate()


def pem(tmp_path, key, name):
    path = tmp_path / name
    path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return str(path)


def subscriber(tmp_path, clock, keys):
    cfg = C.Config(state_dir=str(tmp_path), fleet=C.FleetConfig(
        nats_url="nats://127.0.0.1:4222", keys=tuple(keys)))
    store = Store(cfg.db_path)
    sub = fs.FleetSubscriber(cfg, store, FleetEnforcer(dry_run=True), "node-a",
                             lambda: [ipaddress.ip_network("127.0.0.0/8")], clock=clock)
    sub.start()
    return sub, store


class Stream:
    """js.get_last_msg over a dict subject -> Message."""

    def __init__(self, *msgs: Message):
        self.last = {m.subject: m for m in msgs}

    async def get_last_msg(self, stream, subject):
        m = self.last[subject]
        return SimpleNamespace(seq=m.seq, subject=m.subject, data=m.body)


def test_a_decision_from_the_future_is_applied_once_the_clock_allows(tmp_path):
    now = {"t": T0 - 420}                                   # 7 minutes slow
    sub, store = subscriber(tmp_path, lambda: now["t"], [pem(tmp_path, KEY, "k.pub")])
    d = Decision("block", "203.0.113.3/32", T0, T0 + 3600)
    m = Message(1, d.subject, Signer(KEY).envelope(d))
    try:
        asyncio.run(sub.apply([m]))
        assert sub.cursor == 1 and sub.blocks(now["t"]) == {} and list(sub.retry) == [d.subject]
        asyncio.run(sub._retry(Stream(m)))                    # still slow: not recorded again
        assert len(fleetdb.refusals(store)) == 1 and list(sub.retry) == [d.subject]
        sub2, _ = subscriber(tmp_path, lambda: now["t"], [pem(tmp_path, KEY, "k.pub")])
        assert list(sub2.retry) == [d.subject]              # a restart remembers it
        now["t"] = T0 + 5                                   # NTP is back
        asyncio.run(sub._retry(Stream(m)))
        assert d.target in sub.blocks(now["t"]) and sub.retry == {}
    finally:
        store.close()


def test_a_changed_trusted_key_set_reloads_the_snapshot(tmp_path):
    sub, store = subscriber(tmp_path, lambda: T0, [pem(tmp_path, KEY, "k.pub")])
    try:
        fleetdb.set_trusted_keys(store, sorted(sub.verifier.keys))
        assert not subscriber(tmp_path, lambda: T0, [pem(tmp_path, KEY, "k.pub")])[0]._keys_changed
        new = pem(tmp_path, Ed25519PrivateKey.generate(), "new.pub")
        assert subscriber(tmp_path, lambda: T0, [pem(tmp_path, KEY, "k.pub"), new])[0]._keys_changed
    finally:
        store.close()


def test_the_mesh_and_nats_servers_are_the_agent_tables_infrastructure(tmp_path):
    """agent.daemon resolves the mesh endpoint and the NATS servers for its own table; the
    subscriber shares that list (no second resolution) and adds the server it meets."""
    from agent.daemon import Agent

    cfg = C.Config(state_dir=str(tmp_path),
                   mesh=C.Mesh(endpoint="[2001:db8::7]:7443"),
                   fleet=C.FleetConfig(nats_url="nats://198.51.100.5:4222",
                                       nats_urls=("tls://203.0.113.9:4222",),
                                       keys=(pem(tmp_path, KEY, "k.pub"),)))
    nets = Agent._infrastructure(SimpleNamespace(cfg=cfg))
    assert [str(n) for n in nets] == ["198.51.100.5/32", "203.0.113.9/32", "2001:db8::7/128"]
    no_fleet = C.Config(mesh=C.Mesh(endpoint="192.0.2.1:7443"))
    assert [str(n) for n in Agent._infrastructure(SimpleNamespace(cfg=no_fleet))] == ["192.0.2.1/32"]
    assert Agent._infrastructure(SimpleNamespace(cfg=C.Config())) == []

    sub = fs.FleetSubscriber(cfg, Store(cfg.db_path), FleetEnforcer(dry_run=True), "node-a",
                             lambda: [], clock=lambda: T0, servers=nets)
    sub.start()
    assert sub.server_allow is nets and len(nets) == 3
    peer = SimpleNamespace(_transport=SimpleNamespace(_io_writer=SimpleNamespace(
        get_extra_info=lambda what: ("192.0.2.44", 4222))))
    assert sub._allow_server(peer)
    assert ipaddress.ip_network("192.0.2.44/32") in nets      # the agent's table sees it too


def test_a_block_lifted_by_a_forward_clock_step_is_put_back_when_the_clock_returns(tmp_path):
    """The entry outlives the step (forgotten a margin after it ran out) and reconcile puts
    what the entries want back in the fleet table, not only what the table held."""
    now = {"t": T0}
    sub, store = subscriber(tmp_path, lambda: now["t"], [pem(tmp_path, KEY, "k.pub")])
    d = Decision("block", "203.0.113.3/32", T0, T0 + 3600)
    try:
        asyncio.run(sub.apply([Message(1, d.subject, Signer(KEY).envelope(d))]))
        assert d.target in sub.enforcer.blocks
        now["t"] = T0 + 2 * 86400                           # the step forward
        asyncio.run(sub.forget_expired())
        asyncio.run(sub.reconcile())
        assert sub.enforcer.blocks == {}
        now["t"] = T0 + 60                                  # corrected
        asyncio.run(sub.reconcile())
        assert d.target in sub.enforcer.blocks and fleetdb.entries(store)[d.target].key
    finally:
        store.close()
