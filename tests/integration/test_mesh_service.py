"""The mesh service (mesh/) for real: its gRPC server with mutual TLS on loopback, fed by
raw stubs and by the agent's own reporter (agent/report/mesh.py, over a real agent store
and outbox), storing in SQLite and in a throwaway PostgreSQL cluster; the service as a
process (`python -m mesh run`) killed with SIGKILL and restarted mid-stream; the CLI's
fleet view. Certificates are made with openssl (tests/meshrecv.make_certs)."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from agent import __version__
from agent.config import Mesh
from agent.model import EventClass, Finding, IncidentState, Severity
from agent.proto.grpc.health.v1 import health_pb2, health_pb2_grpc
from agent.proto.swarm.mesh.v1 import mesh_pb2, mesh_pb2_grpc
from agent.report.mesh import MeshReporter
from agent.state.outbox import Outbox
from agent.state.store import Store as AgentStore
from mesh.config import from_dict
from mesh.server import MeshServer
from mesh.store import open_store
from tests.meshkit import REPO, MeshProcess, node_cert, write_config
from tests.meshrecv import make_certs
from tests.pgcluster import pg_cluster, pg_url  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    """A CA, the service's certificate and node certificates: node-a and node-b of two
    providers, one without a provider (O), one from a CA the service does not trust."""
    c = make_certs(tmp_path_factory.mktemp("certs"))
    out = {**c}
    for name, cn, org in (("a", "node-a", "provider-a"), ("b", "node-b", "provider-b"),
                          ("noorg", "node-c", None), ("unnamed", None, "provider-x")):
        files = node_cert(c, name, cn, org)
        out[f"{name}_cert"], out[f"{name}_key"] = files["cert"], files["key"]
    other = make_certs(tmp_path_factory.mktemp("other"), ca_name="other-ca")
    out["stranger_cert"], out["stranger_key"] = other["client_cert"], other["client_key"]
    return out


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/mesh.db"
    return request.getfixturevalue("pg_url")


def service_cfg(certs: dict[str, Path], store_url: str):
    return from_dict({"listen": "127.0.0.1:0", "tls_cert": str(certs["server_cert"]),
                      "tls_key": str(certs["server_key"]), "tls_ca": str(certs["ca"]),
                      "store": store_url})


def channel(certs: dict[str, Path], port: int, who: str = "a") -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(certs["ca"].read_bytes(),
                                         certs[f"{who}_key"].read_bytes(),
                                         certs[f"{who}_cert"].read_bytes())
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds)


def incident(rid: str, iid: str, node_id: str = "node-a", state: str = "open",
             updated_at: float = 10.0) -> mesh_pb2.Report:
    r = mesh_pb2.Report(id=rid, node_id=node_id, created_at=updated_at)
    r.incident.CopyFrom(mesh_pb2.IncidentReport(
        incident_id=iid, event_class="system_attack", entity="ip:198.51.100.7",
        severity="high", state=state, updated_at=updated_at))
    return r


def proposal(rid: str, pid: str) -> mesh_pb2.Report:
    r = mesh_pb2.Report(id=rid, node_id="node-a", created_at=5.0)
    r.proposal.CopyFrom(mesh_pb2.Proposal(proposal_id=pid, target="203.0.113.7/32",
                                          rule="net.port_scan", rule_version=1,
                                          evidence="12 completed handshakes"))
    return r


async def in_service(certs, store_url, scenario, on_proposal=None):
    """Run `scenario(server)` against a MeshServer on loopback; returns its result."""
    store = open_store(store_url)
    server = MeshServer(service_cfg(certs, store_url), store, on_proposal)
    await server.start()
    try:
        return await scenario(server)
    finally:
        await server.stop()
        store.close()


def test_reports_are_stored_under_the_certificates_node_and_provider_once(certs, store_url):
    seen: list[dict] = []

    async def decide(p: dict) -> None:
        seen.append(p)
        if len(seen) == 1:
            raise RuntimeError("a decider bug must not stop the next proposal")

    async def scenario(server: MeshServer):
        batch = mesh_pb2.ReportBatch(reports=[incident("r1", "i1"), proposal("r2", "p1"),
                                              incident("r3", "i2", node_id="node-b"),
                                              proposal("r4", "p2")])
        async with channel(certs, server.port, "a") as ch:
            stub = mesh_pb2_grpc.MeshReportingStub(ch)
            first = await stub.Report(batch, timeout=10)
            again = await stub.Report(batch, timeout=10)      # a lost reply: sent again
        async with channel(certs, server.port, "noorg") as ch:
            await mesh_pb2_grpc.MeshReportingStub(ch).Report(
                mesh_pb2.ReportBatch(reports=[incident("r1", "i1", node_id="node-c")]), timeout=10)
        await asyncio.wait_for(server.service.queue.join(), 10)
        return first, again, dict(server.service.counters)

    first, again, counters = asyncio.run(in_service(certs, store_url, scenario, decide))
    assert list(first.accepted) == list(again.accepted) == ["r1", "r2", "r3", "r4"]
    assert (counters["duplicates"], counters["mismatched"], counters["proposals"]) == (4, 1, 2)
    assert [(p["proposal_id"], p["node"], p["provider"]) for p in seen] == \
        [("p1", "node-a", "provider-a"), ("p2", "node-a", "provider-a")]
    store = open_store(store_url, create=False)
    try:
        nodes = {n["node"]: n for n in store.nodes()}
        assert set(nodes) == {"node-a", "node-c"}            # node-b never called
        assert (nodes["node-a"]["provider"], nodes["node-a"]["claimed"],
                nodes["node-a"]["claim_mismatches"]) == ("provider-a", "node-b", 1)
        assert nodes["node-c"]["provider"] == ""
        assert sorted((i["node"], i["incident_id"]) for i in store.incidents()) == \
            [("node-a", "i1"), ("node-a", "i2"), ("node-c", "i1")]
        assert store.count("reports") == 5 and store.count("proposals") == 2
    finally:
        store.close()


def test_untrusted_or_unnamed_callers_are_refused_and_health_answers(certs, tmp_path):
    url = f"sqlite:///{tmp_path}/mesh.db"

    async def scenario(server: MeshServer):
        batch = mesh_pb2.ReportBatch(reports=[incident("r1", "i1")])
        async with channel(certs, server.port, "stranger") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await mesh_pb2_grpc.MeshReportingStub(ch).Report(batch, timeout=5)
        async with channel(certs, server.port, "unnamed") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as unnamed:
                await mesh_pb2_grpc.MeshReportingStub(ch).Report(batch, timeout=5)
        async with channel(certs, server.port, "a") as ch:
            health = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="swarm.mesh.v1.MeshReporting"), timeout=5)
        return e.value.code(), unnamed.value, health.status

    code, unnamed, status = asyncio.run(in_service(certs, url, scenario))
    assert code == grpc.StatusCode.UNAVAILABLE              # the TLS handshake fails
    assert unnamed.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "0 Common Names" in unnamed.details()
    assert status == health_pb2.HealthCheckResponse.SERVING
    store = open_store(url, create=False)
    assert store.count("reports") == 0
    store.close()


def test_a_store_failure_answers_unavailable_so_the_node_keeps_its_reports(certs, tmp_path):
    url = f"sqlite:///{tmp_path}/mesh.db"

    async def scenario(server: MeshServer):
        server.store.close()              # what a broken disk or database looks like
        async with channel(certs, server.port, "a") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await mesh_pb2_grpc.MeshReportingStub(ch).Report(
                    mesh_pb2.ReportBatch(reports=[incident("r1", "i1")]), timeout=5)
        return e.value.code(), server.service.counters["store_errors"]

    code, errors = asyncio.run(in_service(certs, url, scenario))
    assert code == grpc.StatusCode.UNAVAILABLE and errors == 1


# ---- the service as a process, fed by the agent's reporter

def finding(entity: str) -> Finding:
    return Finding(rule_id="net.syn_flood", rule_version=1, event_class=EventClass.SYSTEM_ATTACK,
                   severity=Severity.HIGH, entity=entity, action="block", first_mono_ns=1,
                   detected_mono_ns=2, evidence={"syns": 500})


def reporter_cfg(certs: dict[str, Path], port: int, node_id: str) -> Mesh:
    return Mesh(endpoint=f"127.0.0.1:{port}", tls_ca=str(certs["ca"]),
                tls_cert=str(certs["a_cert"]), tls_key=str(certs["a_key"]), node_id=node_id,
                heartbeat_s=0.5, batch_size=20, timeout_s=5.0, backoff_initial_s=0.05,
                backoff_max_s=0.3)


async def wait_until(predicate, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def test_the_agents_reporter_loses_nothing_when_the_service_is_killed_mid_stream(
        certs, store_url, tmp_path):
    agent_store = AgentStore(tmp_path / "agent.db")
    box = Outbox(agent_store.path, max_reports=100_000, hard_max_reports=200_000)
    mesh = MeshProcess(write_config(tmp_path / "mesh.yaml", certs, store_url)).start()
    delivered: list[int] = []
    failures: list[int] = []

    async def scenario() -> None:
        reporter = MeshReporter(reporter_cfg(certs, mesh.port, "node-a-claims"), box,
                                lambda: {"version": __version__, "ready": True,
                                         "ruleset_version": "sha256:0123456789abcdef"},
                                on_delivered=lambda c: delivered.append(sum(c.values())),
                                on_failure=lambda: failures.append(1))
        task = asyncio.create_task(reporter.run())
        try:
            for i in range(240):          # ~6 s of incidents; the service dies at 80
                inc = agent_store.record_finding(finding(f"ip:198.51.100.{i % 250}"), 1.0, 2.0)
                if i % 3 == 0:
                    agent_store.set_incident_state(inc.id, IncidentState.RESOLVED, 3.0)
                reporter.wake()
                if i == 80:
                    await wait_until(lambda: sum(delivered) > 40)
                    mesh.kill()
                    await asyncio.sleep(0.5)
                    await asyncio.to_thread(mesh.start)
                await asyncio.sleep(0.025)
            await wait_until(lambda: sum(box.depth().values()) == 0)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    try:
        asyncio.run(scenario())
        fleet = mesh.cli("nodes", "--json")
        live = mesh.cli("incidents", "--json")
        every = mesh.cli("incidents", "--json", "--state", "all", "--limit", "10000")
    finally:
        mesh.stop()
    with _ro(tmp_path / "agent.db") as conn:
        expected = dict(conn.execute("SELECT id, state FROM incidents").fetchall())
    assert len(expected) == 240
    assert {i["incident_id"]: i["state"] for i in every} == expected
    assert all(i["node"] == "node-a" for i in every)          # the certificate's, not the claim
    assert len(live) == sum(1 for s in expected.values() if s != "resolved")
    [node] = fleet
    assert (node["node"], node["provider"], node["status"], node["version"],
            node["ruleset_version"], node["ready"], node["claimed"]) == \
        ("node-a", "provider-a", "alive", __version__, "sha256:0123456789abcdef", True,
         "node-a-claims")
    assert node["open_incidents"] == {"system_attack": len(live)}
    store = open_store(store_url, create=False)
    try:
        assert store.count("incidents") == 240
        # Every report the agent queued was processed once: the ledger has no report twice
        # (its key) and the service killed mid-call made the agent send some again.
        assert store.count("reports") >= 240
    finally:
        store.close()
    assert failures                           # the agent saw the service die...
    assert mesh.log.read_text().count('"mesh service ready"') == 2    # ...and come back


def _ro(path: Path):
    import sqlite3
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def test_the_cli_shows_the_fleet_and_says_one_sentence_on_errors(certs, tmp_path):
    import subprocess
    import sys
    url = f"sqlite:///{tmp_path}/mesh.db"
    cfg = write_config(tmp_path / "mesh.yaml", certs, url)
    with MeshProcess(cfg) as mesh:
        async def send() -> None:
            async with channel(certs, mesh.port, "b") as ch:
                await mesh_pb2_grpc.MeshReportingStub(ch).Report(mesh_pb2.ReportBatch(reports=[
                    incident("r1", "i1", node_id="node-b"), proposal("r2", "p1")]), timeout=10)
        asyncio.run(send())
        table = mesh.cli("nodes")
        incidents = mesh.cli("incidents", "--class", "system_attack")
        proposals = mesh.cli("proposals", "--json")
        assert mesh.cli("decisions", "--json") == [] and mesh.cli("refusals", "--json") == []
        assert mesh.stop() == 0                 # SIGTERM: a graceful stop
    assert '"msg": "stopped"' in mesh.log.read_text()
    assert "node-b" in table and "alive" in table and "1 nodes: 1 alive, 0 stale" in table
    assert "1 incidents by class: system_attack=1" in incidents
    assert [(p["node"], p["provider"], p["target"]) for p in proposals] == \
        [("node-b", "provider-b", "203.0.113.7/32")]
    bad = tmp_path / "bad.yaml"
    for text, needle in (("listen: nowhere\n", "listen must be host:port"),
                         ("store: mysql://x/y\n", "store must be"),
                         ("node_stale_s: -1\n", "node_stale_s must be a positive"),
                         ("nats: [1]\n", "nats must be a mapping"),
                         ("colour: red\n", "unknown config key"),
                         (f"store: postgresql:///x?host={tmp_path}/nope\n", "cannot connect")):
        bad.write_text(text)
        out = subprocess.run([sys.executable, "-m", "mesh", "nodes", "--config", str(bad)],
                             capture_output=True, text=True, timeout=60, cwd=REPO)
        assert out.returncode == 2, (text, out.stderr)
        assert needle in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
