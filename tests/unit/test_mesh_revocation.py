"""Node revocation (mesh/revocation.py) in the store on both backends for real (a SQLite file
and a throwaway PostgreSQL, tests/pgcluster.py), in the decider's votes, and from the
command line (`swarm-mesh node-revoke`, `node-revocations`, `nodes`), including what a
careless operator does: an unknown name, revoking twice, a store that is down."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.fleet.decision import Signer
from agent.proto.swarm.mesh.v1 import mesh_pb2
from mesh import cli
from mesh.decide import Decider
from mesh.policy import Policy, PolicyConfig
from mesh.revocation import NodeRevoked
from mesh.schema import SCHEMA_VERSION
from mesh.store import Store, StoreError, open_store
from tests.pgcluster import pg_cluster, pg_url  # noqa: F401  (fixtures)
from tests.unit.test_mesh_store import store, store_url  # noqa: F401  (fixtures: both backends)

T0 = 1_800_000_000.0
OLD, NEW = T0 - 86400, T0 + 1        # notBefore of a node's certificate before / after


@pytest.fixture
def sqlite_store(tmp_path: Path):
    """Where the store's SQL is not what is tested (that is, above, on both backends)."""
    s = open_store(f"sqlite:///{tmp_path}/mesh.db")
    yield s
    s.close()


def heartbeat(rid: str) -> mesh_pb2.Report:
    r = mesh_pb2.Report(id=rid, node_id="n1", created_at=T0)
    r.heartbeat.CopyFrom(mesh_pb2.Heartbeat(seq=1, version="1.0"))
    return r


def proposal(rid: str, pid: str, target: str = "203.0.113.7/32") -> mesh_pb2.Report:
    r = mesh_pb2.Report(id=rid, node_id="n1", created_at=T0)
    r.proposal.CopyFrom(mesh_pb2.Proposal(proposal_id=pid, target=target, rule="net.port_scan",
                                          rule_version=1, created_at=T0 - 1))
    return r


# ---- the store
def test_a_revocation_refuses_the_nodes_certificates_until_then_and_stores_nothing_of_them(
        store: Store):
    store.record_reports("n1", "acme", [heartbeat("h1")], T0 - 10, not_before=OLD)
    assert store.revoke_node("nobody", "", "op", T0) is None          # never reported
    assert store.count("node_revocations") == 0
    done = store.revoke_node("n1", "stolen", "alice", T0)
    assert (done["revoked_at"], done["previous"], done["known"]) == (T0, None, True)
    with pytest.raises(NodeRevoked, match="n1's certificate was revoked"):
        store.record_reports("n1", "acme", [heartbeat("h2"), proposal("p", "p1")], T0 + 5,
                             not_before=OLD)
    with pytest.raises(NodeRevoked):                  # a copy made at the very second
        store.record_reports("n1", "acme", [heartbeat("h3")], T0 + 5, not_before=T0)
    assert store.count("reports") == 1 and store.count("proposals") == 0
    assert store.nodes()[0]["last_seen"] == T0 - 10 and store.nodes()[0]["revoked"] is True
    out = store.record_reports("n1", "acme", [heartbeat("h4")], T0 + 6, not_before=NEW)
    assert out.accepted == ["h4"]                     # re-enrolled: the name works again
    (node,) = store.nodes()
    assert (node["revoked"], node["revoked_at"], node["cert_not_before"]) == (False, T0, NEW)
    with pytest.raises(NodeRevoked):                  # and the old certificate never again
        store.record_reports("n1", "acme", [heartbeat("h5")], T0 + 7, not_before=OLD)


def test_revoking_twice_also_covers_a_certificate_issued_in_between_even_if_the_clock_stepped_back(
        store: Store):
    store.record_reports("n1", "acme", [heartbeat("h1")], T0 - 10, not_before=OLD)
    first = store.revoke_node("n1", "", "op", T0)["revoked_at"]
    store.record_reports("n1", "acme", [heartbeat("h2")], T0 + 2, not_before=NEW)
    again = store.revoke_node("n1", "leaked again", "op", T0 - 3600)   # clock stepped back
    assert again["previous"] == first and again["revoked_at"] >= NEW
    with pytest.raises(NodeRevoked):
        store.record_reports("n1", "acme", [heartbeat("h3")], T0 + 3, not_before=NEW)
    unseen = int(again["revoked_at"]) + 1             # enrolled again, never reported
    third = store.revoke_node("n1", "", "op", T0 - 7200)
    assert third["revoked_at"] >= unseen
    with pytest.raises(NodeRevoked):
        store.record_reports("n1", "acme", [heartbeat("h4")], T0 + 4, not_before=unseen)
    rows = store.node_revocations()
    assert [r["reason"] for r in rows] == ["", "leaked again", ""]    # newest first, all kept
    assert all(r["current"] is True for r in rows) and store.node_revocations(node="x") == []
    assert store.revoke_node("ghost", "", "op", T0, unknown_ok=True)["known"] is False
    assert store.node_revocations(node="ghost")[0]["current"] is None


def test_a_revoked_certificates_proposals_are_no_votes_and_a_new_ones_are(store: Store):
    for node, prov in (("n1", "a"), ("n2", "b")):
        store.record_reports(node, prov, [proposal("r1", "p1")], T0 - 5, not_before=OLD)
    store.revoke_node("n1", "", "op", T0)
    votes = store.votes(["203.0.113.7/32"], since=T0 - 60, now=T0 + 10, window_s=1800)
    assert [v["node"] for v in votes] == ["n2"]
    store.record_reports("n1", "a", [proposal("r2", "p2")], T0 + 5, not_before=NEW)
    votes = store.votes(["203.0.113.7/32"], since=T0 - 60, now=T0 + 10, window_s=1800)
    assert sorted((v["node"], v["proposal_id"]) for v in votes) == [("n1", "p2"), ("n2", "p1")]


def test_a_version_2_store_is_upgraded_and_its_rows_count_as_from_old_certificates(
        store_url: str):
    s = open_store(store_url)
    s.record_reports("n1", "a", [proposal("r1", "p1")], T0 - 5, not_before=OLD)
    with s.tx() as cur:                               # what a version 2 store looks like
        for table in ("nodes", "proposals"):
            cur.run(f"ALTER TABLE {table} DROP COLUMN cert_not_before")
        cur.run("DROP TABLE node_revocations")
        cur.run("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    s.close()
    with pytest.raises(StoreError, match="schema version 2, older"):
        open_store(store_url, create=False)
    s = open_store(store_url)                         # the service starts: upgraded
    try:
        assert s.node_revocations() == [] and s.nodes()[0]["cert_not_before"] == 0
        assert s.proposals()[0]["cert_not_before"] == 0
        s.revoke_node("n1", "", "op", T0)
        assert s.votes(["203.0.113.7/32"], since=0, now=T0, window_s=1800) == []
        with s.tx(write=False) as cur:
            assert cur.one("SELECT value FROM meta")["value"] == str(SCHEMA_VERSION)
    finally:
        s.close()


def test_a_revocation_cut_off_by_a_lost_connection_is_not_half_written(pg_url: str):  # noqa: F811
    import psycopg2
    s = open_store(pg_url)
    s.record_reports("n1", "a", [heartbeat("h1")], T0 - 5, not_before=OLD)
    admin = psycopg2.connect(pg_url)
    admin.autocommit = True
    with admin.cursor() as cur:                       # the server restarts under it
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    admin.close()
    with pytest.raises(StoreError):
        s.revoke_node("n1", "", "op", T0)
    assert s.count("node_revocations") == 0 and s.node_revoked_at("n1") is None
    assert s.revoke_node("n1", "", "op", T0)["revoked_at"] == T0     # again: reconnected
    s.close()


# ---- the decider
class Recorder:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def publish(self, subject: str, body: bytes, msg_id: str) -> int:
        self.sent.append(msg_id)
        return len(self.sent)


def prop(node: str, provider: str, n: int, not_before: float) -> dict:
    return {"proposal_id": f"{node}-{n}", "node": node, "provider": provider,
            "target": "203.0.113.7/32", "rule": "net.ssh_bruteforce", "rule_version": 2,
            "created_at": T0 - 1, "received_at": T0, "cert_not_before": not_before}


def test_a_revoked_nodes_votes_stop_counting_and_its_waiting_proposals_are_refused(
        sqlite_store: Store):
    store = sqlite_store
    policy = Policy(PolicyConfig.from_dict({"min_nodes": 3, "min_providers": 2, "stage_s": 0}))
    dec = Decider(store, policy, Signer(Ed25519PrivateKey.generate()), Recorder(),
                  clock=lambda: T0)

    async def go():
        n2 = {**prop("n2", "a", 1, OLD), "received_at": T0 + 0.5}   # the target's newest
        first = [(await dec.submit(p)).kind for p in (prop("n1", "a", 1, OLD), n2)]
        store.revoke_node("n2", "stolen", "op", T0, unknown_ok=True)
        without = await dec.submit(prop("n3", "b", 1, OLD))         # n2's vote is gone
        swept = await dec.sweep()             # a restart: n2's is not the one decided again
        refused_by_sweep = store.refusals(node="n2")
        replay = await dec.on_proposal(n2)                           # still queued, say
        back = await dec.submit(prop("n2", "a", 2, NEW))             # re-enrolled
        return first, without, swept, refused_by_sweep, replay, back

    first, without, swept, refused_by_sweep, replay, back = asyncio.run(go())
    assert first == ["pending", "pending"]
    assert without.kind == "pending" and "2 of 3 nodes" in without.reason
    assert swept == 1 and refused_by_sweep == []
    assert replay.kind == "refuse" and "node n2 that sent this proposal was revoked" in \
        replay.reason
    assert back.kind == "decide" and back.decision.provenance["nodes"] == ["n1", "n2", "n3"]
    assert "n2-1" not in back.decision.provenance["proposals"]
    assert [r["proposal_id"] for r in store.refusals(node="n2")] == ["n2-1"]
    store.revoke_node("n1", "", "op", T0 + 1, unknown_ok=True)       # decided stays decided
    assert store.latest_decision("203.0.113.7/32")["action"] == "block"


def test_a_revoked_node_is_drawn_as_no_canary(sqlite_store: Store):
    store = sqlite_store
    policy = Policy(PolicyConfig.from_dict({"min_nodes": 3, "min_providers": 2, "stage_s": 60,
                                            "stage_canary": 1}))
    dec = Decider(store, policy, Signer(Ed25519PrivateKey.generate()), Recorder(),
                  clock=lambda: T0)
    store.record_reports("n4", "c", [heartbeat("h")], T0 - 5, not_before=OLD)
    store.revoke_node("n4", "", "op", T0 - 1)
    for node, prov in (("n1", "a"), ("n2", "a"), ("n3", "b")):
        store.record_reports(node, prov, [proposal("r", "p1")], T0, not_before=OLD)
    outcome = asyncio.run(dec.on_proposal(store.proposals(node="n3")[0]))
    assert outcome.kind == "decide"
    assert outcome.decision.scope == {"stage": "canary", "nodes": ["n1", "n2", "n3"]}


# ---- the command line
def swarm_mesh(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as done:
        cli.main(list(args))
    out, err = capsys.readouterr()
    return done.value.code, out, err


def test_node_revoke_from_the_command_line(tmp_path: Path, capsys):
    store_url = f"sqlite:///{tmp_path}/mesh.db"
    config = str(tmp_path / "mesh.yaml")
    Path(config).write_text(f'store: "{store_url}"\nnode_stale_s: 600\n')
    open_store(store_url).close()                     # the service has run once
    code, out, err = swarm_mesh(capsys, "node-revoke", "gpu-1", "--config", config)
    assert code == 2 and "gpu-1 has never reported to this mesh" in err and "--force" in err
    s = open_store(store_url)
    s.record_reports("gpu-1", "acme", [heartbeat("h1")], T0, not_before=OLD)
    s.close()
    code, out, _ = swarm_mesh(capsys, "node-revoke", "gpu-1", "--reason", "stolen", "--config",
                              config)
    assert code == 0 and "revoked gpu-1" in out and "swarm-mesh revoke" in out
    assert "NATS" in out and "had been revoked before" not in out
    code, out, _ = swarm_mesh(capsys, "node-revoke", "gpu-1", "--config", config)
    assert code == 0 and "had been revoked before" in out          # twice: said so
    code, out, _ = swarm_mesh(capsys, "nodes", "--config", config)
    assert "revoked" in out.splitlines()[1] and "1 revoked" in out
    code, out, _ = swarm_mesh(capsys, "node-revocations", "--config", config, "--json")
    rows = json.loads(out)
    assert [(r["node"], r["reason"], r["current"]) for r in rows] == \
        [("gpu-1", "revoked by operator " + rows[0]["operator"], True),
         ("gpu-1", "stolen", True)]
    code, out, _ = swarm_mesh(capsys, "node-revocations", "--config", config)
    assert "2 revocations" in out and "stolen" in out
    code, _, err = swarm_mesh(capsys, "node-revoke", "gpu\x1b[2J", "--config", config)
    assert code == 2 and "is not a node name" in err


def test_node_revoke_with_the_store_down_is_one_sentence_and_writes_nothing(tmp_path: Path,
                                                                            capsys):
    cfg = tmp_path / "pg.yaml"
    cfg.write_text(f'store: "postgresql:///mesh?host={tmp_path}/nowhere&user=postgres"\n')
    code, out, err = swarm_mesh(capsys, "node-revoke", "gpu-1", "--force", "--config", str(cfg))
    assert code == 2 and err.startswith("swarm-mesh: cannot connect to store")
    assert "Traceback" not in err and out == "" and len(err.strip().splitlines()) == 1
    cfg.write_text(f'store: "sqlite:///{tmp_path}/typo/mesh.db"\n')     # a wrong --config
    code, out, err = swarm_mesh(capsys, "node-revoke", "gpu-1", "--force", "--config", str(cfg))
    assert code == 2 and "does not exist" in err and not (tmp_path / "typo").exists()
