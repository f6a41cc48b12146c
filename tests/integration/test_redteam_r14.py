"""Red team r14 against the real reporting API (a grpc.aio MeshServer with mutual TLS on
loopback and a SQLite store, as tests/integration/test_mesh_revocation.py builds it): what
a revoked certificate's holder keeps of a call it opened before the revocation."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import serialization

from agent.proto.grpc.reflection.v1 import reflection_pb2, reflection_pb2_grpc
from agent.proto.swarm.mesh.v1 import mesh_pb2_grpc
from mesh import pki
from mesh.config import from_dict
from mesh.server import MeshServer
from mesh.store import open_store
from tests.integration.test_mesh_revocation import batch, channel, write_pki


def test_finding_a_stream_opened_before_the_revocation_keeps_being_answered(tmp_path: Path):
    """The gate (mesh/gate.py) checks a call once, when it starts: a reflection stream
    (bidirectional) the node opened before `node-revoke` goes on answering every request
    it writes afterwards, even after a Report on the same channel was refused. Health's
    Watch is the same. What leaks is little (the API's own schema, SERVING), but "every
    call from a revoked certificate is refused" does not hold for a call in flight."""
    ca, files = write_pki(tmp_path)
    url = f"sqlite:///{tmp_path}/mesh.db"
    cfg = from_dict({"listen": "127.0.0.1:0", "tls_cert": str(files["cert"]),
                     "tls_key": str(files["key"]), "tls_ca": str(files["ca"]), "store": url})
    cert, key = pki.node_cert(ca, "gpu-1", "acme")
    ask = reflection_pb2.ServerReflectionRequest(list_services="")

    async def scenario(server: MeshServer) -> tuple[grpc.StatusCode | None, object]:
        async with channel(ca, server.port, cert, key) as ch:
            await mesh_pb2_grpc.MeshReportingStub(ch).Report(batch("r1"), timeout=5)
            stream = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                timeout=10)
            await stream.write(ask)
            await stream.read()
            server.store.revoke_node("gpu-1", "stolen", "op", time.time())
            try:
                await mesh_pb2_grpc.MeshReportingStub(ch).Report(batch("r2"), timeout=5)
                cut = None
            except grpc.aio.AioRpcError as e:
                cut = e.code()
            await stream.write(ask)
            try:
                after = await asyncio.wait_for(stream.read(), 5)
            except grpc.aio.AioRpcError as e:
                after = e.code()
            stream.cancel()
            return cut, after

    async def run():
        store = open_store(url)
        server = MeshServer(cfg, store)
        await server.start()
        try:
            return await scenario(server)
        finally:
            await server.stop(0.5)
            store.close()

    cut, after = asyncio.run(run())
    assert cut == grpc.StatusCode.PERMISSION_DENIED
    assert not isinstance(after, reflection_pb2.ServerReflectionResponse), \
        "the revoked certificate's reflection stream answered after the revocation"


def test_finding_the_meshs_server_key_reports_as_a_node(tmp_path: Path):
    """The unit test's finding against the real API: a Report over mutual TLS with the
    mesh's own server certificate and key (mesh.pem/mesh.key) is accepted and stored as
    a node of provider swarm-mesh."""
    ca, files = write_pki(tmp_path)
    url = f"sqlite:///{tmp_path}/mesh.db"
    cfg = from_dict({"listen": "127.0.0.1:0", "tls_cert": str(files["cert"]),
                     "tls_key": str(files["key"]), "tls_ca": str(files["ca"]), "store": url})
    cert = pki.load_cert(files["cert"])
    key = serialization.load_pem_private_key(files["key"].read_bytes(), None)

    async def run():
        store = open_store(url)
        server = MeshServer(cfg, store)
        await server.start()
        try:
            async with channel(ca, server.port, cert, key) as ch:
                try:
                    await mesh_pb2_grpc.MeshReportingStub(ch).Report(batch("r1"), timeout=5)
                except grpc.aio.AioRpcError as e:
                    return e.code(), []
            return None, store.nodes()
        finally:
            await server.stop(0.5)
            store.close()

    refused, nodes = asyncio.run(run())
    assert refused is not None, \
        f"the mesh's server certificate reported as {[(n['node'], n['provider']) for n in nodes]}"
