"""The mesh store (mesh/store.py) against both backends for real: a SQLite file and a
database on a throwaway PostgreSQL cluster (tests/pgcluster.py). Every test runs on each."""
from __future__ import annotations

from pathlib import Path

import pytest

from agent.proto.swarm.mesh.v1 import mesh_pb2
from mesh.schema import SCHEMA_VERSION
from mesh.store import Store, StoreError, open_store
from tests.pgcluster import pg_cluster, pg_url  # noqa: F401  (fixtures)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path: Path) -> str:
    """The URL of an empty store of each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/mesh.db"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def store(store_url: str):
    s = open_store(store_url)
    yield s
    s.close()


def incident(rid: str, iid: str, state: str = "open", updated_at: float = 10.0,
             cls: str = "system_attack", node_id: str = "n1") -> mesh_pb2.Report:
    r = mesh_pb2.Report(id=rid, node_id=node_id, created_at=updated_at)
    r.incident.CopyFrom(mesh_pb2.IncidentReport(
        incident_id=iid, event_class=cls, entity="ip:198.51.100.7", severity="high",
        state=state, first_seen_at=1.0, detected_at=2.0, rules=["net.syn_flood@1"],
        findings=3, summary="syn flood", deadline=mesh_pb2.DEADLINE_MET, updated_at=updated_at))
    return r


def heartbeat(rid: str, created_at: float, version: str = "1.0", seq: int = 1,
              node_id: str = "n1") -> mesh_pb2.Report:
    r = mesh_pb2.Report(id=rid, node_id=node_id, created_at=created_at)
    r.heartbeat.CopyFrom(mesh_pb2.Heartbeat(
        seq=seq, version=version, started_at=1.0, ready=True, probes={"net": "loaded"},
        ruleset_version="sha256:abcd", rules=["net.syn_flood@1"], fleet_seq=7, fleet_active=2,
        fleet_refused=1, outbox_depth=3))
    return r


def proposal(rid: str, pid: str, target: str = "203.0.113.7/32") -> mesh_pb2.Report:
    r = mesh_pb2.Report(id=rid, node_id="n1", created_at=5.0)
    r.proposal.CopyFrom(mesh_pb2.Proposal(
        proposal_id=pid, target=target, rule="net.port_scan", rule_version=2, incident_id="i1",
        evidence="12 completed handshakes", created_at=4.0, ttl_s=600,
        event_class="system_attack"))
    return r


def test_a_batch_is_processed_once_and_acknowledged_again(store: Store):
    batch = [incident("r1", "i1"), heartbeat("r2", 20.0), proposal("r3", "p1")]
    first = store.record_reports("n1", "prov-a", batch, received_at=100.0)
    assert first.accepted == ["r1", "r2", "r3"] and first.duplicates == 0
    assert [p["proposal_id"] for p in first.proposals] == ["p1"]
    again = store.record_reports("n1", "prov-a", batch, received_at=101.0)
    assert again.accepted == ["r1", "r2", "r3"] and again.duplicates == 3
    assert again.proposals == []                  # the decider sees each proposal once
    assert store.count("reports") == 3 and store.count("incidents") == 1
    [p] = store.proposals()
    assert (p["node"], p["provider"], p["target"], p["rule"], p["rule_version"], p["ttl_s"],
            p["received_at"]) == ("n1", "prov-a", "203.0.113.7/32", "net.port_scan", 2, 600.0,
                                  100.0)


def test_the_latest_snapshot_wins_whatever_the_arrival_order(store: Store):
    store.record_reports("n1", "", [incident("r2", "i1", "resolved", 30.0)], 100.0)
    store.record_reports("n1", "", [incident("r1", "i1", "open", 10.0)], 101.0)   # late, older
    [row] = store.incidents()
    assert (row["state"], row["updated_at"], row["deadline"], row["rules"]) == \
        ("resolved", 30.0, "met", ["net.syn_flood@1"])
    store.record_reports("n1", "", [incident("r3", "i1", "false_positive", 40.0)], 102.0)
    assert store.incidents()[0]["state"] == "false_positive"


def test_records_belong_to_the_certificate_node_whatever_node_id_claims(store: Store):
    store.record_reports("a", "prov-a", [incident("r1", "i1", "open", 10.0, node_id="a")], 100.0)
    # b claims to be a and sends a newer snapshot of a's incident id: stored under b only.
    out = store.record_reports("b", "prov-b", [incident("r1", "i1", "resolved", 50.0,
                                                        node_id="a")], 101.0)
    assert out.mismatched == 1 and out.duplicates == 0
    rows = {r["node"]: r["state"] for r in store.incidents()}
    assert rows == {"a": "open", "b": "resolved"}
    nodes = {n["node"]: n for n in store.nodes()}
    assert (nodes["b"]["claimed"], nodes["b"]["claim_mismatches"]) == ("a", 1)
    assert nodes["a"]["claim_mismatches"] == 0


def test_heartbeats_update_the_node_and_an_older_one_changes_nothing(store: Store):
    store.record_reports("n1", "prov-a", [heartbeat("h2", 200.0, "2.0", seq=2)], 201.0)
    store.record_reports("n1", "prov-a", [heartbeat("h1", 100.0, "1.0", seq=1)], 202.0)
    [n] = store.nodes()
    assert (n["version"], n["hb_seq"], n["hb_at"], n["last_seen"], n["first_seen"]) == \
        ("2.0", 2, 200.0, 202.0, 201.0)
    assert (n["provider"], n["ready"], n["dry_run"], n["probes"], n["ruleset_version"],
            n["rules"], n["fleet_seq"], n["fleet_active"], n["fleet_refused"],
            n["outbox_depth"]) == ("prov-a", True, False, {"net": "loaded"}, "sha256:abcd",
                                   ["net.syn_flood@1"], 7, 2, 1, 3)
    # A node whose clock once ran a day ahead is not frozen on that heartbeat.
    store.record_reports("n1", "prov-a", [heartbeat("h3", 300.0 + 86400, "3.0")], 300.0)
    store.record_reports("n1", "prov-a", [heartbeat("h4", 310.0, "4.0")], 310.0)
    assert store.nodes()[0]["version"] == "4.0"


def test_nodes_count_their_live_incidents_by_class(store: Store):
    store.record_reports("n1", "", [
        incident("r1", "i1"), incident("r2", "i2", cls="security_breach"),
        incident("r3", "i3", "resolved"), incident("r4", "i4", "mitigated")], 100.0)
    store.record_reports("n2", "", [heartbeat("h", 1.0)], 100.0)
    nodes = {n["node"]: n["open_incidents"] for n in store.nodes()}
    assert nodes == {"n1": {"system_attack": 2, "security_breach": 1}, "n2": {}}
    assert {r["incident_id"] for r in store.incidents(state="live")} == {"i1", "i2", "i4"}
    assert [r["incident_id"] for r in store.incidents(event_class="security_breach")] == ["i2"]
    assert [r["incident_id"] for r in store.incidents(state=["resolved"], node="n1")] == ["i3"]
    assert store.incidents(node="n2") == []


def test_mitigations_evidence_and_feedback_are_kept(store: Store):
    m = mesh_pb2.Report(id="m1", node_id="n1", created_at=5.0)
    m.mitigation.CopyFrom(mesh_pb2.MitigationReport(
        mitigation_id="mit1", kind="block_ip", target="198.51.100.7", state="active",
        created_at=4.0, expires_at=604.0, updated_at=4.0, params_json='{"ttl_s": 600}'))
    e = mesh_pb2.Report(id="e1", node_id="n1", created_at=5.0)
    e.evidence.CopyFrom(mesh_pb2.EvidenceReport(incident_id="i1", evidence_id="ev1",
                                                collected_at=5.0, bundle_json='{"procs": []}'))
    f = mesh_pb2.Report(id="f1", node_id="n1", created_at=6.0)
    f.feedback.CopyFrom(mesh_pb2.FeedbackReport(feedback_id="fb1", rule="net.port_scan",
                                                scope_kind="address", scope_value="10.0.0.1",
                                                action="suppress", by="alice"))
    e2 = mesh_pb2.Report(id="e2", node_id="n1", created_at=7.0)    # same bundle, new report
    e2.evidence.CopyFrom(e.evidence)
    out = store.record_reports("n1", "", [m, e, f, e2], 100.0)
    assert out.accepted == ["m1", "e1", "f1", "e2"]
    [mit] = store.mitigations()
    assert (mit["kind"], mit["state"], mit["params"]) == ("block_ip", "active", {"ttl_s": 600})
    assert store.count("evidence") == 1 and store.count("feedback") == 1


def test_unknown_and_malformed_reports_are_kept_raw_and_idless_ones_are_skipped(store: Store):
    unknown = mesh_pb2.Report(id="u1", node_id="n1", created_at=1.0)        # no body set
    bad = mesh_pb2.Report(id="b1", node_id="n1", created_at=1.0)
    bad.incident.CopyFrom(mesh_pb2.IncidentReport(state="open"))           # no incident id
    idless = incident("", "i9")
    out = store.record_reports("n1", "", [unknown, bad, idless], 100.0)
    assert (out.accepted, out.unknown, out.rejected, out.skipped) == (["u1", "b1"], 1, 1, 1)
    assert store.count("incidents") == 0 and store.count("reports") == 2


def test_a_failing_batch_stores_nothing(store: Store):
    def batch():
        yield incident("r1", "i1")
        raise RuntimeError("the batch broke half way")

    with pytest.raises(RuntimeError):
        store.record_reports("n1", "", batch(), 100.0)
    assert store.count("reports") == 0 and store.count("incidents") == 0
    assert store.count("nodes") == 0
    store.record_reports("n1", "", [incident("r1", "i1")], 100.0)     # usable after
    assert store.count("incidents") == 1


def test_proposals_are_kept_once_per_node_and_counted_by_arrival(store: Store):
    base = {"proposal_id": "p1", "node": "a", "provider": "pa", "target": "203.0.113.7/32",
            "received_at": 100.0}
    assert store.add_proposal(base) is True
    assert store.add_proposal({**base, "received_at": 200.0}) is False
    assert store.add_proposal({**base, "node": "b", "received_at": 150.0}) is True
    assert store.add_proposal({**base, "proposal_id": "p2", "target": "198.51.100.0/24",
                               "received_at": 300.0, "operator": "alice"}) is True
    assert store.count_proposals("a", since=0) == 2
    assert store.count_proposals("a", since=150.0) == 1
    assert [p["proposal_id"] for p in store.proposals(node="a")] == ["p2", "p1"]
    assert [p["node"] for p in store.proposals(target="203.0.113.7/32")] == ["b", "a"]
    assert [p["node"] for p in store.proposals(since=120.0)] == ["a", "b"]
    with pytest.raises(ValueError):
        store.add_proposal({**base, "proposal_id": "p3", "colour": "red"})


def decision(did: str, target: str, issued_at: float, expires_at: float,
             action: str = "block") -> dict:
    return {"action": action, "target": target, "issued_at": issued_at,
            "expires_at": expires_at, "reason": "r", "provenance": {"kind": "operator"},
            "scope": {"stage": "all"}, "revokes": "", "id": did, "v": 1}


def test_decisions_are_pending_until_published_and_the_newest_per_target_wins(store: Store):
    d1 = decision("d1", "203.0.113.7/32", 100.0, 700.0)
    d2 = decision("d2", "203.0.113.7/32", 200.0, 700.0, action="revoke")
    d3 = decision("d3", "198.51.100.0/24", 150.0, 160.0)
    for d in (d1, d2, d3):
        store.add_decision(d, b"env-" + d["id"].encode())
    store.add_decision(d1, b"other")                       # the same id again: nothing
    assert [(d["id"], env) for d, env in store.pending_decisions()] == \
        [("d1", b"env-d1"), ("d3", b"env-d3"), ("d2", b"env-d2")]
    store.mark_published("d1", 5, at=101.0)
    assert [d["id"] for d, _ in store.pending_decisions()] == ["d3", "d2"]
    latest = store.latest_decision("203.0.113.7/32")
    assert latest == {**d2, "state": "pending", "seq": 0, "published_at": 0.0}
    store.mark_published("d2", 6, at=201.0)
    latest = store.latest_decision("203.0.113.7/32")
    assert (latest["id"], latest["state"], latest["seq"]) == ("d2", "published", 6)
    assert store.latest_decision("192.0.2.1/32") is None
    assert [d["id"] for d in store.decisions()] == ["d2", "d3", "d1"]
    assert [d["id"] for d in store.decisions(active_at=500.0)] == ["d2", "d1"]
    assert [d["id"] for d in store.decisions(state="published")] == ["d2", "d1"]


def test_refusals_are_recorded_with_their_reason_and_details(store: Store):
    store.add_refusal({"at": 10.0, "node": "a", "provider": "pa", "target": "0.0.0.0/1",
                       "reason": "prefix /1 is wider than /24", "proposal_id": "p1",
                       "source": "proposal"})
    store.add_refusal({"at": 20.0, "node": "b", "target": "100.64.0.1/32",
                       "reason": "allowlisted (CGNAT)", "source": "proposal", "rule": "x"})
    rows = store.refusals()
    assert [(r["node"], r["reason"], r["detail"]) for r in rows] == [
        ("b", "allowlisted (CGNAT)", {"rule": "x"}),
        ("a", "prefix /1 is wider than /24", {})]
    assert [r["node"] for r in store.refusals(since=15.0)] == ["b"]
    assert [r["node"] for r in store.refusals(node="a")] == ["a"]
    assert len(store.refusals(limit=1)) == 1


def test_pruned_report_ids_arriving_again_change_nothing(store: Store):
    store.record_reports("n1", "", [incident("r1", "i1", "open", 10.0),
                                    incident("r2", "i1", "resolved", 20.0)], 100.0)
    assert store.prune_reports(before=150.0) == 2
    out = store.record_reports("n1", "", [incident("r1", "i1", "open", 10.0)], 200.0)
    assert out.duplicates == 0 and out.accepted == ["r1"]
    assert store.incidents()[0]["state"] == "resolved"


def test_proposals_and_refusals_go_after_their_retention_in_bounded_rounds(store: Store):
    for i in range(30):
        store.add_proposal({"proposal_id": f"p{i}", "node": "n", "target": "203.0.113.7/32",
                            "received_at": 100.0 + i})
        store.add_refusal({"at": 100.0 + i, "node": "n", "reason": "rate limit",
                           "proposal_id": f"p{i}"})
    # refusals are never pruned before the proposals they refuse
    assert store.prune_reports(0.0, proposals_before=110.0, refusals_before=200.0) == 20
    assert (store.count("proposals"), store.count("refusals")) == (20, 20)
    assert store.prune_reports(0.0, proposals_before=200.0, refusals_before=200.0,
                               limit=15) == 30
    assert (store.count("proposals"), store.count("refusals")) == (5, 5)


def test_the_schema_is_made_once_and_a_newer_one_is_refused(store_url: str):
    s = open_store(store_url)
    s.record_reports("n1", "", [incident("r1", "i1")], 100.0)
    s.close()
    s = open_store(store_url, create=False)             # reopened: data kept
    assert s.count("incidents") == 1
    with s.tx() as cur:
        cur.run("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                (str(SCHEMA_VERSION + 1),))
    s.close()
    with pytest.raises(StoreError, match="newer than this mesh service"):
        open_store(store_url)


def test_a_missing_store_is_one_sentence(tmp_path: Path, pg_cluster):  # noqa: F811
    with pytest.raises(StoreError, match="does not exist"):
        open_store(str(tmp_path / "none.db"), create=False)
    with pytest.raises(StoreError, match="cannot connect to store .*nosuch"):
        open_store(pg_cluster.url("nosuch"))
    with pytest.raises(StoreError, match="must be sqlite"):
        open_store("mysql://x/y")
    url = pg_cluster.create_db()
    with pytest.raises(StoreError, match="not a mesh store"):
        open_store(url, create=False)
    pg_cluster.drop_db(url)


def test_postgresql_connection_lost_fails_one_transaction_then_reconnects(pg_url: str):  # noqa: F811
    import psycopg2
    s = open_store(pg_url)
    s.record_reports("n1", "", [incident("r1", "i1")], 100.0)
    admin = psycopg2.connect(pg_url)
    admin.autocommit = True
    with admin.cursor() as cur:        # what a server restart does to the connection
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    admin.close()
    with pytest.raises(StoreError):
        s.record_reports("n1", "", [incident("r2", "i2")], 101.0)
    out = s.record_reports("n1", "", [incident("r2", "i2")], 102.0)
    assert out.duplicates == 0 and s.count("incidents") == 2
    s.close()


def test_a_sqlite_store_is_wal_and_synchronous_full(tmp_path: Path):
    s = open_store(str(tmp_path / "m.db"))
    with s.tx(write=False) as cur:
        assert cur.one("PRAGMA journal_mode")["journal_mode"] == "wal"
        assert cur.one("PRAGMA synchronous")["synchronous"] == 2
    s.close()


def test_root_opening_the_services_store_leaves_its_side_files_to_the_service(tmp_path: Path):
    """`swarm-mesh enroll` runs as root and reads the store the service (user swarm-mesh)
    owns: the -wal and -shm files that root's open makes belong to the store's owner
    (SQLite's unix VFS gives them to the database file's owner when it runs as root)."""
    import os
    if os.geteuid() != 0:
        pytest.skip("needs root (to own files as another user)")
    path = tmp_path / "mesh.db"
    open_store(f"sqlite:///{path}").close()
    os.chown(path, 65534, 65534)
    s = open_store(f"sqlite:///{path}", create=False)
    try:
        sides = [path.with_name(path.name + x) for x in ("-wal", "-shm")]
        assert [p.stat().st_uid for p in sides if p.exists()] == [65534, 65534]
    finally:
        s.close()
