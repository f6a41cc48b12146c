"""The mesh decision service end to end, as it runs: `swarm-mesh run` with a real nats-server,
nodes proposing over the mutual-TLS reporting API with their own certificates, and a node
user reading the decision stream and verifying every message with the agent's Verifier.

Corroboration across nodes and providers spreads a block; refusals (too wide, allowlisted,
a flood from one node) are recorded with their reasons; an operator's block and revoke
from the CLI reach the stream; a decision made while nats-server is down is published
when it comes back; proposals stored just before a crash are decided after the restart.
"""
from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from pathlib import Path

import grpc
import pytest

from agent.fleet.decision import STREAM, Verifier, load_public_key, subject_for
from agent.proto.swarm.mesh.v1 import mesh_pb2, mesh_pb2_grpc
from agent._vendor import nats
from agent._vendor.nats.js.api import ConsumerConfig, DeliverPolicy
from tests.meshkit import MeshProcess, node_cert, write_config
from tests.meshrecv import make_certs
from tests.natsserver import NatsServer

NODES = {"node-a": "provider-a", "node-b": "provider-a", "node-c": "provider-b",
         "node-d": "provider-c"}


@pytest.fixture
def fleet(tmp_path: Path):
    certs = make_certs(tmp_path / "certs")
    node_certs = {n: node_cert(certs, n, n, org) for n, org in NODES.items()}
    ns = NatsServer(tmp_path / "nats", nodes=("reader",))
    ns.start()
    (tmp_path / "mesh.password").write_text(ns.creds("mesh")["password"] + "\n")
    keydir = tmp_path / "keys"
    cfg = write_config(tmp_path / "mesh.yaml", certs, f"sqlite:///{tmp_path / 'mesh.db'}", extra=f"""
nats:
  url: {ns.url}
  user: mesh
  password_file: {tmp_path / 'mesh.password'}
signing:
  private_key: {keydir / 'decisions.key'}
policy:
  min_nodes: 3
  min_providers: 2
  rate_limit: 10
  stage_s: 0
""")
    mesh = MeshProcess(cfg)
    mesh.cli("keygen", "--dir", str(keydir))
    mesh.start()
    try:
        yield {"mesh": mesh, "nats": ns, "certs": certs, "nodes": node_certs,
               "verifier": Verifier([load_public_key(keydir / "decisions.pub")]),
               "db": tmp_path / "mesh.db"}
    finally:
        mesh.stop()
        ns.kill()


def propose(fleet, node: str, target: str, rule: str = "net.ssh_bruteforce") -> str:
    """One Proposal report from `node`, over mutual TLS with its own certificate."""
    c = fleet["nodes"][node]
    creds = grpc.ssl_channel_credentials(root_certificates=fleet["certs"]["ca"].read_bytes(),
                                         private_key=c["key"].read_bytes(),
                                         certificate_chain=c["cert"].read_bytes())
    pid = uuid.uuid4().hex
    report = mesh_pb2.Report(id=uuid.uuid4().hex, node_id=node, created_at=time.time(),
                             proposal=mesh_pb2.Proposal(
                                 proposal_id=pid, target=target, rule=rule, rule_version=1,
                                 incident_id="i-" + pid[:8], evidence="40 completed handshakes",
                                 created_at=time.time(), ttl_s=3600, event_class="system_attack"))
    with grpc.secure_channel(f"127.0.0.1:{fleet['mesh'].port}", creds,
                             options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
        ack = mesh_pb2_grpc.MeshReportingStub(ch).Report(
            mesh_pb2.ReportBatch(reports=[report]), timeout=10)
    assert list(ack.accepted) == [report.id]
    return pid


async def read_stream(fleet, expect: int, timeout_s: float = 10.0) -> list:
    """Every message of the decision stream as a node reads it, verified: [(seq, Decision)]."""
    nc = await nats.connect(fleet["nats"].url, **fleet["nats"].creds("reader"))
    got: list = []
    done = asyncio.Event()

    async def on_msg(msg) -> None:
        got.append((msg.metadata.sequence.stream,
                    fleet["verifier"].open(msg.data, msg.subject, time.time())))
        if len(got) >= expect:
            done.set()
    try:
        js = nc.jetstream()
        await js.subscribe(f"{subject_for('0.0.0.0/0').rsplit('.', 3)[0]}.>", stream=STREAM,
                           ordered_consumer=True, cb=on_msg,
                           deliver_policy=DeliverPolicy.ALL, config=ConsumerConfig())
        try:
            await asyncio.wait_for(done.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass
        await asyncio.sleep(0.3)            # anything more than expected shows up too
    finally:
        await nc.close()
    return got


def wait_for(fn, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    return fn()


def test_corroborated_proposals_spread_a_signed_block(fleet):
    mesh = fleet["mesh"]
    propose(fleet, "node-a", "203.0.113.7/32")
    propose(fleet, "node-b", "203.0.113.7/32")
    time.sleep(0.5)
    assert mesh.cli("decisions", "--json") == [], "two nodes of one provider are not enough"
    propose(fleet, "node-c", "203.0.113.7/32")
    rows = wait_for(lambda: [d for d in mesh.cli("decisions", "--json") if d["state"] == "published"])
    assert len(rows) == 1 and rows[0]["target"] == "203.0.113.7/32" and rows[0]["seq"] >= 1
    assert sorted(rows[0]["provenance"]["nodes"]) == ["node-a", "node-b", "node-c"]
    got = asyncio.run(read_stream(fleet, 1))
    assert [(d.action, d.target) for _, d in got] == [("block", "203.0.113.7/32")]
    assert got[0][1].applies_to("node-d")               # stage_s 0: every node at once


def test_wide_allowlisted_and_flooded_proposals_are_refused_and_recorded(fleet):
    mesh = fleet["mesh"]
    propose(fleet, "node-a", "0.0.0.0/1")
    propose(fleet, "node-a", "100.64.3.4/32")           # CGNAT: thousands of users behind it
    for i in range(14):                                 # rate_limit 10 per window
        propose(fleet, "node-d", f"198.51.100.{i + 1}/32")
    refusals = wait_for(lambda: [r for r in mesh.cli("refusals", "--json")
                                 if r["node"] == "node-d"] and mesh.cli("refusals", "--json"))
    by_target = {r["target"]: r["reason"] for r in refusals}
    assert "prefix" in by_target["0.0.0.0/1"]
    assert "100.64" in by_target["100.64.3.4/32"] or "CGNAT" in by_target["100.64.3.4/32"]
    flood = [r for r in refusals if r["node"] == "node-d"]
    assert len(flood) >= 4 and all("rate" in r["reason"] for r in flood), flood
    assert mesh.cli("decisions", "--json") == []
    assert asyncio.run(read_stream(fleet, 1, timeout_s=1.0)) == []


def test_operator_block_and_revoke_from_the_cli(fleet):
    mesh = fleet["mesh"]
    out = mesh.cli("block", "192.0.2.10", "--reason", "scanner", "--ttl", "600",
                   "--operator", "ana", "--json")
    assert out["outcome"] == "decide" and out["state"] == "published"
    out = mesh.cli("revoke", "192.0.2.10", "--reason", "owner asked", "--operator", "ana", "--json")
    assert out["outcome"] == "decide" and out["decision"]["action"] == "revoke"
    got = asyncio.run(read_stream(fleet, 1, timeout_s=3.0))
    # one message per target: the revoke replaced the block on the stream
    assert [(d.action, d.target, d.provenance.get("operator")) for _, d in got] == \
        [("revoke", "192.0.2.10/32", "ana")]
    refused = mesh.cli("block", "10.1.2.3", "--reason", "x", "--json", check=False)
    assert "unexpected" not in str(refused)


def test_a_decision_made_while_nats_is_down_is_published_when_it_returns(fleet):
    mesh, ns = fleet["mesh"], fleet["nats"]
    ns.stop()
    out = mesh.cli("block", "192.0.2.20", "--reason", "scanner", "--operator", "ana", "--json")
    assert out["outcome"] == "decide" and out["state"] == "pending"
    ns.start()
    rows = wait_for(lambda: [d for d in mesh.cli("decisions", "--json")
                             if d["state"] == "published"], timeout_s=40)
    assert rows, "the service did not publish the pending decision"
    got = asyncio.run(read_stream(fleet, 1))
    assert [d.target for _, d in got] == ["192.0.2.20/32"]


def test_proposals_stored_before_a_crash_are_decided_after_the_restart(fleet):
    mesh = fleet["mesh"]
    propose(fleet, "node-a", "203.0.113.50/32")
    propose(fleet, "node-c", "203.0.113.50/32")
    mesh.kill()
    # the third proposal reached the store, then the service died before deciding on it
    now = time.time()
    with sqlite3.connect(fleet["db"]) as db:
        cols = [r[1] for r in db.execute("PRAGMA table_info(proposals)")]
        row = {c: None for c in cols}
        row.update(proposal_id="p-late", node="node-d", provider="provider-c",
                   target="203.0.113.50/32", rule="net.ssh_bruteforce", rule_version=1,
                   incident_id="i-late", operator="", evidence="", created_at=now, ttl_s=3600,
                   event_class="system_attack", received_at=now)
        row = {k: v for k, v in row.items() if k in cols}
        db.execute(f"INSERT INTO proposals ({', '.join(row)}) VALUES "
                   f"({', '.join('?' for _ in row)})", list(row.values()))
    mesh.start()
    rows = wait_for(lambda: [d for d in mesh.cli("decisions", "--json")
                             if d["state"] == "published"])
    assert [d["target"] for d in rows] == ["203.0.113.50/32"]
