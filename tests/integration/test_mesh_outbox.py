"""The mesh outbox and reporter against a real SQLite store and a real mTLS gRPC receiver
(tests/meshrecv.py) on loopback: same-transaction queueing, the bound, backoff, delivery
with de-duplication, and refusal of an untrusted client."""
from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import time
from pathlib import Path

import pytest

from agent.config import Mesh
from agent.model import (EventClass, Finding, IncidentState, Mitigation, MitigationKind,
                         MitigationState, Severity)
from agent.report.mesh import MeshReporter, backoff_s
from agent.state.outbox import Outbox
from agent.state.store import Store
from tests.meshrecv import make_certs, received, serve


def finding(entity: str = "ip:198.51.100.7") -> Finding:
    return Finding(rule_id="net.syn_flood", rule_version=1, event_class=EventClass.SYSTEM_ATTACK,
                   severity=Severity.HIGH, entity=entity, action="block", first_mono_ns=1,
                   detected_mono_ns=2, evidence={"syns": 500})


@pytest.fixture
def store(tmp_path: Path):
    """A store on a fresh file; closed after the test."""
    s = Store(tmp_path / "agent.db")
    yield s
    s.close()


def outbox_for(store: Store, max_reports: int = 1000, hard: int = 2000) -> Outbox:
    return Outbox(store.path, max_reports=max_reports, hard_max_reports=hard)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    return make_certs(tmp_path_factory.mktemp("certs"))


def test_every_change_is_queued_with_it_and_newer_snapshots_replace_older(store):
    box = outbox_for(store)
    inc = store.record_finding(finding(), 100.0, 101.0)
    first = box.pending(10)
    assert [(p.kind, p.ref, p.payload["state"]) for p in first] == [("incident", inc.id, "open")]
    m = Mitigation(kind=MitigationKind.BLOCK_IP, target="198.51.100.7", created_at=101.0,
                   expires_at=701.0, incident_id=inc.id, params={"ttl_s": 600})
    store.add_mitigation(m, rule="net.syn_flood@1")
    store.mark_mitigated(inc.id, 101.5, False)
    store.set_mitigation_state(m.id, MitigationState.EXPIRED, 701.0)
    pending = {p.kind: p for p in box.pending(10)}
    assert set(pending) == {"incident", "mitigation"}       # one per row: the newest
    assert pending["incident"].id != first[0].id
    assert pending["incident"].payload["state"] == "mitigated"
    assert pending["incident"].payload["deadline_missed"] == 0
    assert pending["mitigation"].payload["state"] == "expired"
    assert pending["mitigation"].payload["params"] == {"ttl_s": 600}
    # A failed transaction queues nothing: the same mitigation id again is refused.
    with pytest.raises(sqlite3.IntegrityError):
        store.add_mitigation(m)
    assert len(box.pending(10)) == 2
    assert box.acknowledge([p.id for p in box.pending(10)]) == 2
    assert box.depth() == {"incident": 0, "mitigation": 0, "heartbeat": 0, "evidence": 0,
                           "feedback": 0, "proposal": 0}
    box.close()


def test_the_bound_drops_heartbeats_then_mitigations_and_incidents_only_past_the_hard_cap(store):
    box = outbox_for(store, max_reports=10, hard=12)
    for i in range(6):
        box.add_heartbeat({"seq": i}, time.time())
    incidents = [store.record_finding(finding(f"ip:198.51.100.{i}"), 1.0, 2.0) for i in range(8)]
    for inc in incidents[:4]:
        store.add_mitigation(Mitigation(kind=MitigationKind.BLOCK_IP, target="x", created_at=2.0,
                                        expires_at=3.0, incident_id=inc.id))
    assert sum(box.depth().values()) == 18
    assert box.trim() == {"heartbeat": 6, "mitigation": 2}
    assert box.depth() == {"incident": 8, "mitigation": 2, "heartbeat": 0, "evidence": 0,
                           "feedback": 0, "proposal": 0}
    for i in range(8, 14):
        store.record_finding(finding(f"ip:198.51.100.{i}"), 1.0, 2.0)
    # 16 queued: the 2 mitigations go, the soft bound keeps incidents, so only the hard
    # cap drops them, the oldest first.
    assert box.trim() == {"mitigation": 2, "incident": 2}
    left = box.pending(100)
    assert [p.kind for p in left] == ["incident"] * 12
    assert left[0].payload["entity"] == "ip:198.51.100.2"
    assert dict(box.dropped) == {"heartbeat": 6, "mitigation": 4, "incident": 2}
    box.close()


def test_backoff_doubles_up_to_the_cap_with_jitter():
    assert [backoff_s(n, 0.5, 8.0, 1.0) for n in range(1, 8)] == [0.5, 1, 2, 4, 8, 8, 8]
    assert backoff_s(3, 0.5, 8.0, 0.0) == 1.0              # never below half the cap
    delays = {backoff_s(3, 0.5, 8.0, random.random()) for _ in range(50)}
    assert len(delays) > 1 and all(1.0 <= d < 2.0 for d in delays)
    assert backoff_s(10_000, 0.5, 60.0, 0.99) < 60.0        # no overflow for long outages


def mesh_cfg(certs: dict[str, Path], port: int, **kw) -> Mesh:
    base = dict(endpoint=f"127.0.0.1:{port}", tls_ca=str(certs["ca"]),
                tls_cert=str(certs["client_cert"]), tls_key=str(certs["client_key"]),
                node_id="node-a", heartbeat_s=60.0, batch_size=5, timeout_s=5.0,
                backoff_initial_s=0.05, backoff_max_s=0.2)
    return Mesh(**{**base, **kw})


async def wait_until(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_reports_are_delivered_once_each_even_when_acks_are_lost(store, certs, tmp_path):
    box = outbox_for(store)
    incidents = [store.record_finding(finding(f"ip:198.51.100.{i}"), 1.0, 2.0) for i in range(12)]
    db = tmp_path / "recv.db"
    failures = []

    async def scenario() -> None:
        server, port, receiver = await serve("127.0.0.1:0", certs, db, lose_acks=2)
        reporter = MeshReporter(mesh_cfg(certs, port), box, lambda: {"version": "t"},
                                on_failure=lambda: failures.append(1))
        task = asyncio.create_task(reporter.run())
        try:
            await wait_until(lambda: sum(box.depth().values()) == 0)
            store.set_incident_state(incidents[0].id, IncidentState.RESOLVED, 5.0)
            reporter.wake()
            await wait_until(lambda: sum(box.depth().values()) == 0)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.stop(None)

    asyncio.run(scenario())
    rows, stats = received(db)
    incident_rows = [r for r in rows if r["kind"] == "incident"]
    assert {r["ref"] for r in incident_rows} == {i.id for i in incidents}
    assert [r["state"] for r in incident_rows if r["ref"] == incidents[0].id] == ["open", "resolved"]
    assert any(r["kind"] == "heartbeat" for r in rows)
    assert {r["peer"] for r in rows} == {"node-1"} and {r["node"] for r in rows} == {"node-a"}
    # Two replies were lost: those batches came again and were not processed again.
    assert len(failures) == 2
    assert stats["duplicates"] >= 2
    assert stats["deliveries"] == len(rows) + stats["duplicates"]


def test_a_client_without_a_trusted_certificate_is_refused(store, certs, tmp_path):
    other = make_certs(tmp_path / "other", ca_name="other-ca")
    box = outbox_for(store)
    store.record_finding(finding(), 1.0, 2.0)
    db = tmp_path / "recv.db"

    async def scenario() -> MeshReporter:
        server, port, _ = await serve("127.0.0.1:0", certs, db)
        # The mesh's CA, but a client certificate signed by a CA the mesh does not trust.
        cfg = mesh_cfg(certs, port, tls_cert=str(other["client_cert"]),
                       tls_key=str(other["client_key"]))
        reporter = MeshReporter(cfg, box, lambda: {})
        task = asyncio.create_task(reporter.run())
        try:
            await wait_until(lambda: reporter.failures >= 2)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.stop(None)
        return reporter

    reporter = asyncio.run(scenario())
    assert reporter.reachable is False
    assert received(db)[0] == []
    assert box.depth()["incident"] == 1        # still queued for when it is fixed
    assert box.pending(10)[0].attempts >= 2


def test_evidence_bundles_reach_the_mesh_in_calls_under_grpcs_limit(store, certs, tmp_path):
    """Investigations' evidence (up to investigation.max_bytes each) is delivered in batches
    of at most MAX_BATCH_BYTES of payload, each bundle once; over the bound it is dropped
    before mitigation reports, never before incidents."""
    from agent.state.outbox import MAX_BATCH_BYTES

    box = outbox_for(store)
    inc = store.record_finding(finding(), 1.0, 2.0)
    bundle = {"processes": [{"pid": i, "cmdline": "x" * 1000} for i in range(200)],
              "summary": "evidence: 200 processes", "collected_at": 3.0}
    ids = [f"ev{i:02d}" for i in range(30)]        # 30 x ~210 KB: more than one call holds
    for evidence_id in ids:
        box.add_evidence(inc.id, evidence_id, bundle, 3.0)
    first = box.pending(200)
    assert 1 < len(first) < 32 and first[0].kind == "incident"
    assert sum(len(json.dumps(p.payload)) for p in first) <= MAX_BATCH_BYTES
    db = tmp_path / "recv.db"

    async def scenario() -> None:
        server, port, _ = await serve("127.0.0.1:0", certs, db)
        reporter = MeshReporter(mesh_cfg(certs, port, batch_size=200), box,
                                lambda: {"version": "t"})
        task = asyncio.create_task(reporter.run())
        try:
            await wait_until(lambda: box.depth()["evidence"] == 0)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.stop(None)

    asyncio.run(scenario())
    rows, _ = received(db)
    evidence = [r for r in rows if r["kind"] == "evidence"]
    assert sorted(r["ref"] for r in evidence) == ids
    report = json.loads(evidence[0]["payload"])
    assert report["evidence"]["incident_id"] == inc.id
    assert report["evidence"]["summary"] == "evidence: 200 processes"
    assert len(json.loads(report["evidence"]["bundle_json"])["processes"]) == 200

    small = outbox_for(store, max_reports=3, hard=10)
    small.add_evidence(inc.id, "late", {"summary": "x"}, 4.0)
    store.add_mitigation(Mitigation(kind=MitigationKind.BLOCK_IP, target="x", created_at=2.0,
                                    expires_at=3.0, incident_id=inc.id))
    small.add_heartbeat({"seq": 1}, 4.0)
    store.record_finding(finding("ip:198.51.100.98"), 1.0, 2.0)
    store.record_finding(finding("ip:198.51.100.99"), 1.0, 2.0)
    assert small.trim() == {"heartbeat": 1, "evidence": 1}        # 5 queued, bound 3
    assert small.depth() == {"incident": 2, "mitigation": 1, "heartbeat": 0, "evidence": 0,
                             "feedback": 0, "proposal": 0}
    small.close()


def test_feedback_made_and_reverted_reaches_the_mesh(store, certs, tmp_path):
    """Each verdict made or reverted is a report queued in its own transaction (a trigger);
    its hits going up is not; the mesh keeps the newest snapshot per feedback_id."""
    from agent.respond.feedbackbook import FeedbackBook

    box = outbox_for(store)
    inc = store.record_finding(finding("ip:198.51.100.44"), 1.0, 2.0)
    book = FeedbackBook(store, "node-a", max_ttl_s=86400.0)
    [rec] = book.plan(inc.id, by="local:uid=0", reason="scanner we run")
    book.commit([rec])
    assert box.depth()["feedback"] == 1
    book.check(finding("ip:198.51.100.44"))
    book.flush()                                   # hits stored: no new report
    assert [p.payload.get("reverted_at") for p in box.pending(100)
            if p.kind == "feedback"] == [None]
    db = tmp_path / "recv.db"

    async def scenario() -> None:
        server, port, _ = await serve("127.0.0.1:0", certs, db)
        reporter = MeshReporter(mesh_cfg(certs, port), box, lambda: {"version": "t"})
        task = asyncio.create_task(reporter.run())
        try:
            await wait_until(lambda: box.depth()["feedback"] == 0)
            book.revert(rec.id, "ops.example", "wrong call")
            reporter.wake()
            await wait_until(lambda: box.depth()["feedback"] == 0)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.stop(None)

    asyncio.run(scenario())
    rows, _ = received(db)
    reports = [json.loads(r["payload"])["feedback"] for r in rows if r["kind"] == "feedback"]
    assert [r["feedback_id"] for r in reports] == [rec.id, rec.id]
    assert (reports[0]["rule"], reports[0]["scope_kind"], reports[0]["scope_value"]) == \
        ("net.syn_flood", "address", "198.51.100.44/32")
    assert "reverted_at" not in reports[0] and reports[1]["reverted_by"] == "ops.example"
