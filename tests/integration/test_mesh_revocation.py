"""Node revocation against the real reporting API: a grpc.aio MeshServer with mutual TLS on
loopback, a SQLite store, certificates from the mesh's own CA code (mesh/pki.py), and
`swarm-mesh node-revoke` run in-process on its own store connection, as an operator's
shell would beside the service. The store and the CLI are covered on both backends in
tests/unit/test_mesh_revocation.py."""
from __future__ import annotations

import asyncio
import datetime
import logging
import time
from pathlib import Path

import grpc
import pytest

from agent.config import Mesh as AgentMesh
from agent.proto.grpc.health.v1 import health_pb2, health_pb2_grpc
from agent.report.mesh import MeshReporter
from agent.state.outbox import Outbox
from agent.state.store import Store as AgentStore
from agent.proto.swarm.mesh.v1 import mesh_pb2, mesh_pb2_grpc
from mesh import cli, pki
from mesh.config import from_dict
from mesh.server import MeshServer
from mesh.store import open_store


def write_pki(d: Path) -> tuple[pki.Authority, dict[str, Path]]:
    """The mesh's CA and its server certificate for 127.0.0.1, as files in `d`."""
    ca = pki.make_ca()
    cert, key = pki.server_cert(ca, ["127.0.0.1", "localhost"])
    files = {"ca": d / "ca.pem", "cert": d / "mesh.pem", "key": d / "mesh.key"}
    files["ca"].write_bytes(pki.cert_pem(ca.cert))
    files["cert"].write_bytes(pki.cert_pem(cert))
    files["key"].write_bytes(pki.key_pem(key))
    return ca, files


def channel(ca: pki.Authority, port: int, cert, key) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(pki.cert_pem(ca.cert), pki.key_pem(key),
                                         pki.cert_pem(cert))
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds)


def batch(rid: str) -> mesh_pb2.ReportBatch:
    r = mesh_pb2.Report(id=rid, node_id="gpu-1", created_at=time.time())
    r.heartbeat.CopyFrom(mesh_pb2.Heartbeat(seq=1, version="t", ready=True))
    return mesh_pb2.ReportBatch(reports=[r])


def wait_s(cert) -> float:
    """Until a certificate is valid: a re-enrolled node's starts the second after its
    revocation, at most a second from now."""
    start = cert.not_valid_before.replace(tzinfo=datetime.timezone.utc).timestamp()
    return max(0.0, start - time.time() + 0.05)


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call
    return e.value


def test_a_revoked_node_is_cut_at_its_next_call_and_comes_back_only_with_a_new_certificate(
        tmp_path: Path, caplog):
    ca, files = write_pki(tmp_path)
    url = f"sqlite:///{tmp_path}/mesh.db"
    (tmp_path / "mesh.yaml").write_text(f'store: "{url}"\n')
    cfg = from_dict({"listen": "127.0.0.1:0", "tls_cert": str(files["cert"]),
                     "tls_key": str(files["key"]), "tls_ca": str(files["ca"]), "store": url})
    old_cert, old_key = pki.node_cert(ca, "gpu-1", "acme")

    def node_revoke() -> int:
        with pytest.raises(SystemExit) as done:
            cli.main(["node-revoke", "gpu-1", "--reason", "stolen", "--config",
                      str(tmp_path / "mesh.yaml"), "--json"])
        return done.value.code

    async def scenario(server: MeshServer):
        async with channel(ca, server.port, old_cert, old_key) as old:
            stub = mesh_pb2_grpc.MeshReportingStub(old)
            assert list((await stub.Report(batch("r1"), timeout=5)).accepted) == ["r1"]
            assert await asyncio.to_thread(node_revoke) == 0
            cut = await refused(stub.Report(batch("r2"), timeout=5))   # the same channel
            health = await refused(health_pb2_grpc.HealthStub(old).Check(
                health_pb2.HealthCheckRequest(), timeout=5))
        told = await agent_is_told(server.port)
        revoked_at = server.store.node_revoked_at("gpu-1")
        new_cert, new_key = pki.node_cert(ca, "gpu-1", "acme", after=revoked_at)
        await asyncio.sleep(wait_s(new_cert))
        async with channel(ca, server.port, new_cert, new_key) as new:
            back = await mesh_pb2_grpc.MeshReportingStub(new).Report(batch("r3"), timeout=5)
        async with channel(ca, server.port, old_cert, old_key) as again:
            still = await refused(mesh_pb2_grpc.MeshReportingStub(again).Report(
                batch("r4"), timeout=5))
        return cut, health, back, still, told, dict(server.service.counters)

    async def run():
        store = open_store(url)
        server = MeshServer(cfg, store)
        await server.start()
        try:
            return await scenario(server)
        finally:
            await server.stop()
            store.close()

    async def agent_is_told(port: int) -> str:
        """The agent's own reporter, with the revoked certificate: refused, and it says why."""
        for name, data in (("node.pem", pki.cert_pem(old_cert)), ("node.key", pki.key_pem(old_key))):
            (tmp_path / name).write_bytes(data)
        mesh = AgentMesh(endpoint=f"127.0.0.1:{port}", server_name="127.0.0.1",
                         tls_cert=str(tmp_path / "node.pem"), tls_key=str(tmp_path / "node.key"),
                         tls_ca=str(files["ca"]), node_id="gpu-1", backoff_max_s=0.2)
        box = Outbox(AgentStore(tmp_path / "agent.db").path, max_reports=10, hard_max_reports=20)
        reporter = MeshReporter(mesh, box, lambda: {"version": "t", "ready": True})
        reporter.queue_heartbeat()
        task = asyncio.create_task(reporter.run())
        try:
            deadline = time.monotonic() + 10
            while not reporter.refused and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert box.depth()["heartbeat"] >= 1               # heartbeats stay queued
        return reporter.refused

    caplog.set_level(logging.WARNING, logger="swarm_mesh")
    cut, health, back, still, told, counters = asyncio.run(run())
    assert "gpu-1's certificate was revoked" in told
    for e in (cut, health, still):
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED, e
        assert "gpu-1's certificate was revoked" in e.details()
    assert list(back.accepted) == ["r3"]
    assert counters["revoked_calls"] >= 4 and counters["batches"] == 2
    said = [r for r in caplog.records if "certificate is revoked" in r.getMessage()]
    assert len(said) == 1                       # one certificate, logged once
    store = open_store(url, create=False)
    try:
        assert store.count("reports", "gpu-1") == 2               # r1 and r3, nothing else
        (node,) = store.nodes()
        assert node["revoked"] is False and node["revoked_at"] is not None
    finally:
        store.close()
