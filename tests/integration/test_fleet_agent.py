"""Fleet decisions end to end on the agent's side: a real nats-server (JetStream) in the
attacker namespace on a second, mesh-allowlisted address, a real agent in the victim
namespace subscribed to it, decisions signed with a test key and published by the test.
Assertions read the kernel (nft -j in the victim namespace), real traffic from the
attacker namespace, and the agent's database. Each test builds its namespaces, server and
agent and removes them (swarmlab.lab.Lab, tests.fleetnats.NatsServer, AgentProcess)."""
from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from agent.fleet.decision import Decision, Signer, generate_key, load_private_key
from swarmlab.lab import Lab, sh, wait_for
from swarmlab.scenario import AgentProcess
from tests.conftest import skip_unsupported
from tests.fleetnats import (NATS_SERVER, NatsServer, create_stream, delete_stream,
                             fleet_in_force, publish, signed)
from tests.integration.nftlab import listener, reaches

pytestmark = pytest.mark.privileged
PORT = 8080


@pytest.fixture
def fleet(tmp_path):
    """A lab, nats-server on 10.N.0.3 in the attacker namespace with the decision stream,
    a signing key the agent trusts and one it does not, and an agent (not started)."""
    if not Path(NATS_SERVER).exists():
        skip_unsupported("needs nats-server (apt install nats-server)")
    with Lab() as lab:
        nats_ip = f"10.{lab.subnet}.0.3"
        sh("ip", "addr", "add", f"{nats_ip}/24", "dev", "a0", ns=lab.attacker)
        generate_key(tmp_path / "mesh.key", tmp_path / "mesh.pub")
        generate_key(tmp_path / "forger.key", tmp_path / "forger.pub")
        server = NatsServer(tmp_path / "nats", host=nats_ip, ns=lab.attacker)
        with server:
            create_stream(server.url, lab.attacker)
            (tmp_path / "agent").mkdir()
            agent = AgentProcess(lab.victim, tmp_path / "agent", f"""\
allowlist:
  mesh: [{nats_ip}/32]
  management: [10.{lab.subnet}.0.9/32]
mesh:
  node_id: victim
fleet:
  nats_url: {server.url}
  keys: [{tmp_path / 'mesh.pub'}]
  reconnect_initial_s: 0.2
  reconnect_max_s: 1.0
metrics:
  listen: null
""")
            f = Fleet(lab, server, agent, Signer(load_private_key(tmp_path / "mesh.key")),
                      Signer(load_private_key(tmp_path / "forger.key")))
            try:
                yield f
            finally:
                agent.stop()


class Fleet:
    def __init__(self, lab, server, agent, signer, forger):
        self.lab, self.server, self.agent, self.signer, self.forger = lab, server, agent, signer, forger

    def publish(self, *decisions: Decision, signer: Signer | None = None) -> list[int]:
        return publish(self.server.url, signed(signer or self.signer, *decisions), self.lab.attacker)

    def raw(self, subject: str, body: bytes) -> list[int]:
        return publish(self.server.url, [(subject, body)], self.lab.attacker)

    def in_force(self) -> set[str]:
        """Addresses and networks in the fleet sets, from the kernel."""
        return fleet_in_force(self.lab.victim)

    def db(self, sql: str) -> list[tuple]:
        with sqlite3.connect(f"file:{self.agent.db_path}?mode=ro", uri=True) as c:
            return c.execute(sql).fetchall()

    def cursor(self) -> int | None:
        rows = self.db("SELECT seq FROM fleet_cursor")
        return rows[0][0] if rows else None

    def refused(self) -> dict[str, int]:
        return dict(self.db("SELECT reason, COUNT(*) FROM fleet_refusals GROUP BY reason"))

    def block(self, target: str, ttl_s: float = 600, **kw) -> Decision:
        now = time.time()
        return Decision("block", target, now, now + ttl_s, reason="test", **kw)

    def revoke(self, d: Decision) -> Decision:
        return Decision("revoke", d.target, time.time(), d.expires_at, revokes=d.id)

    def start(self) -> None:
        self.agent.start()
        wait_for(lambda: self.cursor() is not None, timeout_s=15)   # connected, caught up


def test_block_is_enforced_within_a_second_and_a_revoke_lifts_it(fleet):
    fleet.start()
    attacker, victim = fleet.lab.addr("attacker"), fleet.lab.addr("victim")
    with listener(fleet.lab.victim, victim, PORT):
        assert reaches(fleet.lab.attacker, victim, PORT)
        d = fleet.block(f"{attacker}/32")
        t0 = time.monotonic()
        fleet.publish(d)
        wait_for(lambda: attacker in fleet.in_force(), timeout_s=5, interval_s=0.01)
        took_s = time.monotonic() - t0
        assert took_s < 1.0, took_s
        assert not reaches(fleet.lab.attacker, victim, PORT)
        # the agent's own addresses and the NATS server stay reachable: it is not cut off
        assert fleet.db("SELECT action, seq FROM fleet_decisions")[0][0] == "block"
        fleet.publish(fleet.revoke(d))
        wait_for(lambda: attacker not in fleet.in_force(), timeout_s=5, interval_s=0.01)
        assert reaches(fleet.lab.attacker, victim, PORT)
        # a replay of the old block cannot undo the revocation
        fleet.publish(d)
        wait_for(lambda: fleet.refused().get("stale"), timeout_s=5)
        assert attacker not in fleet.in_force()
    print(f"\npublish -> in the kernel: {took_s * 1000:.0f} ms")


def test_forged_unsigned_allowlisted_and_too_wide_decisions_are_refused_and_counted(fleet):
    fleet.start()
    sub = fleet.lab.subnet
    forged = fleet.block(f"10.{sub}.0.50/32")
    fleet.publish(forged, signer=fleet.forger)
    fleet.raw(forged.subject, json.dumps({"d": forged.to_dict()}).encode())   # unsigned
    fleet.raw(forged.subject, json.dumps(forged.to_dict()).encode())          # bare
    fleet.publish(fleet.block(f"10.{sub}.0.9/32"))          # management: allowlisted
    fleet.publish(fleet.block(f"10.{sub}.0.3/32"))          # the mesh/NATS: allowlisted
    fleet.publish(fleet.block(f"10.{sub}.0.0/24"))          # overlaps this host's address
    fleet.publish(fleet.block("10.0.0.0/8"))                 # wider than the /16 floor
    fleet.publish(fleet.block("198.51.100.7/32", scope={"stage": "canary", "nodes": ["other"]}))
    ok = fleet.block("198.51.100.8/32", scope={"stage": "canary", "nodes": ["victim"]})
    fleet.publish(ok)
    wait_for(lambda: "198.51.100.8" in fleet.in_force(), timeout_s=5)
    wait_for(lambda: sum(fleet.refused().values()) >= 7, timeout_s=5)
    assert fleet.refused() == {"untrusted_key": 1, "malformed": 2, "allowlisted": 3, "too_wide": 1}
    assert fleet.in_force() == {"198.51.100.8"}     # the other node's canary is not ours


def test_partition_and_restart_catch_up_from_the_cursor(fleet):
    fleet.start()
    a, b, c, d = (fleet.block(f"203.0.113.{i}/32") for i in (1, 2, 3, 4))
    fleet.publish(a, b)
    wait_for(lambda: {"203.0.113.1", "203.0.113.2"} <= fleet.in_force(), timeout_s=5)
    port = fleet.server.port
    # 1. a partition (8 s here; the 30 s one, with the mesh, is in test_fleet_e2e.py): the
    # agent's NATS connection is dropped in the attacker namespace
    sh("nft", "-f", "-", ns=fleet.lab.attacker, input=f"""table inet partition {{
  chain in {{ type filter hook input priority 0; iifname "a0" tcp dport {port} drop; }}
  chain out {{ type filter hook output priority 0; oifname "a0" tcp sport {port} drop; }}
}}
""")
    try:
        time.sleep(2)
        fleet.publish(fleet.revoke(a), c)
        time.sleep(3)
        # still enforced meanwhile: the kernel holds what was in force
        assert {"203.0.113.1", "203.0.113.2"} <= fleet.in_force()
        fleet.publish(fleet.block("203.0.113.5/32"))
        time.sleep(3)
        assert "203.0.113.3" not in fleet.in_force()
    finally:
        sh("nft", "delete", "table", "inet", "partition", ns=fleet.lab.attacker)
    t0 = time.monotonic()
    wait_for(lambda: fleet.in_force() == {"203.0.113.2", "203.0.113.3", "203.0.113.5"},
             timeout_s=30, interval_s=0.1)
    print(f"\ncaught up {time.monotonic() - t0:.1f} s after the partition ended")
    # 2. stopped while decisions are published: the restart replays from its cursor
    fleet.agent.stop(signal.SIGTERM)
    seqs = fleet.publish(fleet.revoke(b), d)
    fleet.agent.start()
    wait_for(lambda: fleet.in_force() == {"203.0.113.3", "203.0.113.4", "203.0.113.5"},
             timeout_s=15, interval_s=0.1)
    wait_for(lambda: fleet.cursor() == seqs[-1], timeout_s=5)
    # a catch-up, not a snapshot: the stream is the one the cursor belongs to
    assert not any("fleet snapshot loaded" in line and '"messages": 0' not in line
                   for line in fleet.agent.log_lines[1:])


def test_stream_reset_loads_the_snapshot_and_lifts_nothing_on_the_servers_word(fleet):
    """A recreated stream is read whole; what it does not name stays in force to its own
    expiry (a server cannot sign a revocation: red team r12), a signed revoke lifts it."""
    fleet.start()
    a, b = fleet.block("192.0.2.1/32"), fleet.block("192.0.2.0/28")
    fleet.publish(a, b)
    wait_for(lambda: {"192.0.2.1", "192.0.2.0/28"} <= fleet.in_force(), timeout_s=5)
    delete_stream(fleet.server.url, fleet.lab.attacker)
    create_stream(fleet.server.url, fleet.lab.attacker)
    fleet.publish(fleet.block("192.0.2.0/28"), fleet.block("192.0.2.99/32"))
    wait_for(lambda: fleet.in_force() == {"192.0.2.0/28", "192.0.2.1", "192.0.2.99"},
             timeout_s=20, interval_s=0.1)
    fleet.publish(fleet.revoke(a))
    wait_for(lambda: fleet.in_force() == {"192.0.2.0/28", "192.0.2.99"}, timeout_s=20,
             interval_s=0.1)
    assert [t for (t,) in fleet.db("SELECT target FROM fleet_decisions WHERE action = 'block' "
                                   "ORDER BY target")] == ["192.0.2.0/28", "192.0.2.99/32"]
    assert any("fleet snapshot loaded" in line for line in fleet.agent.log_lines)
