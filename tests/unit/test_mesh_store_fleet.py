"""The mesh store's queries for fleet decisions (mesh/store.py) against both backends for
real (a SQLite file, a throwaway PostgreSQL cluster): the votes of a target (one per node
and target, refused and stale proposals aside, no row limit), every target's current
decision, canaries due for promotion, failed decisions, bounded proposals and the upgrade
of a version 1 store."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.proto.swarm.mesh.v1 import mesh_pb2
from mesh import records
from mesh.schema import SCHEMA_VERSION
from mesh.store import Store, StoreError, open_store
from tests.pgcluster import pg_cluster, pg_url  # noqa: F401  (fixtures)

NOW = 1_800_000_000.0
WINDOW = 1800.0


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path: Path):
    url = f"sqlite:///{tmp_path}/mesh.db" if request.param == "sqlite" \
        else request.getfixturevalue("pg_url")
    s = open_store(url)
    yield s
    s.close()


def prop(node: str, n: int = 0, target: str = "203.0.113.7/32", received_at: float = NOW,
         **kw) -> dict:
    p = {"proposal_id": f"{node}-{n}", "node": node, "provider": "p", "target": target,
         "rule": "net.connect_scan", "created_at": received_at - 1, "received_at": received_at}
    p.update(kw)
    return p


def decision(target: str, issued_at: float, action: str = "block", stage: str = "all",
             ttl: float = 3600.0, i: int = 0) -> dict:
    scope = {"stage": stage, **({"nodes": ["n1"]} if stage == "canary" else {})}
    return {"id": f"{target}-{issued_at}-{i}", "target": target, "action": action,
            "issued_at": issued_at, "expires_at": issued_at + ttl, "scope": scope,
            "reason": 'a "stage": "canary" in a reason', "provenance": {}}


def test_votes_are_one_per_node_and_target_whatever_a_flood(store: Store):
    targets = ["203.0.113.7/32", "203.0.113.6/31"]
    store.add_proposal(prop("n1", received_at=NOW - 100))
    store.add_proposal(prop("n2", target="203.0.113.6/31", received_at=NOW - 50))
    for i in range(1500):                   # newer than both, one node
        store.add_proposal(prop("evil", i + 1, received_at=NOW - 10 + i / 1000))
    got = store.votes(targets, since=NOW - WINDOW, now=NOW, window_s=WINDOW)
    assert sorted((v["node"], v["target"]) for v in got) == [
        ("evil", "203.0.113.7/32"), ("n1", "203.0.113.7/32"), ("n2", "203.0.113.6/31")]
    assert next(v for v in got if v["node"] == "evil")["proposal_id"] == "evil-1500"
    assert "rn" not in got[0]


def test_refused_stale_and_old_proposals_are_no_votes(store: Store):
    store.add_proposal(prop("refused"))
    store.add_refusal({"at": NOW, "node": "refused", "proposal_id": "refused-0",
                       "reason": "rate limit"})
    store.add_proposal(prop("stale", created_at=NOW - 2 * 86400))
    store.add_proposal(prop("expired", created_at=NOW - 100, ttl_s=50))
    store.add_proposal(prop("old", received_at=NOW - 2 * WINDOW))
    store.add_proposal(prop("undated", created_at=0))
    # the newest valid one of a node counts, even behind a newer stale one
    store.add_proposal(prop("n1", 1, received_at=NOW - 5))
    store.add_proposal(prop("n1", 2, received_at=NOW - 1, created_at=NOW - 3 * 86400))
    got = store.votes(["203.0.113.7/32"], since=NOW - WINDOW, now=NOW, window_s=WINDOW)
    assert sorted((v["node"], v["proposal_id"]) for v in got) == [
        ("n1", "n1-1"), ("undated", "undated-0")]
    assert store.votes([], since=0, now=NOW, window_s=WINDOW) == []


def test_current_decisions_are_the_latest_per_target_unexpired_and_not_failed(store: Store):
    for d in (decision("203.0.113.1/32", NOW - 300),
              decision("203.0.113.1/32", NOW - 200, action="revoke"),
              decision("203.0.113.2/32", NOW - 100),
              decision("203.0.113.2/32", NOW - 50, i=1),          # failed: not current
              decision("203.0.113.3/32", NOW - 7200)):             # expired
        store.add_decision(d, b"env-" + d["id"].encode())
    store.mark_failed(f"203.0.113.2/32-{NOW - 50}-1")
    store.mark_published(f"203.0.113.2/32-{NOW - 100}-0", 7)
    got = store.current_decisions(NOW)
    assert [(d["target"], d["action"]) for d in got] == [("203.0.113.1/32", "revoke"),
                                                          ("203.0.113.2/32", "block")]
    assert store.current_decisions(NOW, action="revoke")[0]["target"] == "203.0.113.1/32"
    with_env = store.current_decisions(NOW, envelopes=True)
    assert with_env[1]["envelope"] == f"env-203.0.113.2/32-{NOW - 100}-0".encode()
    assert store.latest_decision("203.0.113.2/32")["seq"] == 7
    assert [d["state"] for d in store.decisions(target="203.0.113.2/32")] == ["failed", "published"]
    store.mark_failed(f"203.0.113.2/32-{NOW - 100}-0")          # a published one stays
    assert store.latest_decision("203.0.113.2/32")["state"] == "published"


def test_due_canaries_have_no_row_limit_and_skip_the_replaced(store: Store):
    canary = decision("203.0.113.7/32", NOW - 120, stage="canary")
    replaced = decision("203.0.113.8/32", NOW - 120, stage="canary")
    young = decision("203.0.113.9/32", NOW - 10, stage="canary")
    for d in (canary, replaced, young):
        store.add_decision(d, b"e")
        store.mark_published(d["id"], 1)
    store.add_decision(decision("203.0.113.8/32", NOW - 60), b"e")        # promoted already
    for i in range(1200):                                                  # newer, unrelated
        store.add_decision(decision(f"2001:db8::{i + 1:x}/128", NOW - 30 + i / 100), b"e")
    got = store.due_canaries(NOW - 60, NOW)
    assert [d["id"] for d in got] == [canary["id"]]


def test_proposal_text_is_cut_and_long_identifiers_refused(store: Store):
    assert store.add_proposal(prop("n1", rule="r" * 20000, evidence="e" * 10 ** 5,
                                   operator="o" * 500))
    row = store.proposals()[0]
    limits = records.PROPOSAL_TEXT_MAX_CHARS
    assert (len(row["rule"]), len(row["evidence"]), len(row["operator"])) == (
        limits["rule"], limits["evidence"], limits["operator"])
    with pytest.raises(ValueError, match="target longer"):
        store.add_proposal(prop("n1", 1, target=" " * 80 + "203.0.113.7/32"))
    r = mesh_pb2.Report(id="r1", node_id="n1", created_at=NOW)
    r.proposal.CopyFrom(mesh_pb2.Proposal(proposal_id="p1", target="1" * 65, rule="x"))
    done = store.record_reports("n1", "p", [r], NOW)
    assert done.rejected == 1 and not done.proposals
    r2 = mesh_pb2.Report(id="r2", node_id="n1", created_at=NOW)
    r2.proposal.CopyFrom(mesh_pb2.Proposal(proposal_id="p2", target="203.0.113.7/32",
                                           rule="x" * 5000))
    done = store.record_reports("n1", "p", [r2], NOW)
    assert len(done.proposals[0]["rule"]) == limits["rule"]


def test_a_version_1_store_is_upgraded_by_the_service_and_named_by_queries(tmp_path: Path):
    path = tmp_path / "mesh.db"
    open_store(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as conn:
        conn.execute("DROP INDEX refusals_node_proposal_id")
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="schema version 1, older"):
        open_store(f"sqlite:///{path}", create=False)
    open_store(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM meta").fetchone()[0] == str(SCHEMA_VERSION)
        assert conn.execute("SELECT 1 FROM sqlite_master WHERE name = "
                            "'refusals_node_proposal_id'").fetchone()
