"""A test mesh: a real grpc.aio MeshReporting server with mutual TLS that records every
report it processes in SQLite and de-duplicates on the report id, plus `make_certs`, which
builds a CA, a server and client certificates with the openssl CLI.

In a test process:   server, port = await serve("127.0.0.1:0", certs, db_path)
As a process:        python -m tests.meshrecv --listen ADDR --certs DIR --db PATH
                     (prints {"listening": ...} once ready; SIGTERM stops it)

`lose_acks=N`: the first N batches are processed, then answered UNAVAILABLE as if the
reply were lost, so the agent sends them again and the receiver must not process them
twice. Tables: reports (id primary key, kind, ref, state, node, peer, payload,
received_at) and stats (deliveries: reports received, duplicates among them, batches).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import grpc
from google.protobuf import json_format

from agent.proto.swarm.mesh.v1 import mesh_pb2, mesh_pb2_grpc


def make_certs(out: Path, server_ips: tuple[str, ...] = ("127.0.0.1",),
               client_cn: str = "node-1", ca_name: str = "ca") -> dict[str, Path]:
    """CA, server (SAN: the IPs and DNS:localhost) and client certificates, EC P-256,
    valid for a day. Returns paths: ca, server_cert, server_key, client_cert, client_key."""
    out.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)

    def key_and_csr(name: str, cn: str) -> None:
        run("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(out / f"{name}.key"), "-out", str(out / f"{name}.csr"),
            "-subj", f"/CN={cn}")

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(out / f"{ca_name}.key"), "-out", str(out / f"{ca_name}.pem"),
        "-days", "1", "-subj", f"/CN=test {ca_name}")
    sans = ",".join([f"IP:{ip}" for ip in server_ips] + ["DNS:localhost"])
    for name, cn, ext in (("server", "mesh", f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\n"),
                          ("client", client_cn, "extendedKeyUsage=clientAuth\n")):
        key_and_csr(name, cn)
        (out / f"{name}.ext").write_text(ext)
        run("x509", "-req", "-in", str(out / f"{name}.csr"), "-CA", str(out / f"{ca_name}.pem"),
            "-CAkey", str(out / f"{ca_name}.key"), "-CAcreateserial", "-days", "1",
            "-out", str(out / f"{name}.pem"), "-extfile", str(out / f"{name}.ext"))
    return {"ca": out / f"{ca_name}.pem", "server_cert": out / "server.pem",
            "server_key": out / "server.key", "client_cert": out / "client.pem",
            "client_key": out / "client.key"}


class Receiver(mesh_pb2_grpc.MeshReportingServicer):
    def __init__(self, db_path: Path, lose_acks: int = 0):
        self.lose_acks = lose_acks
        self.db = sqlite3.connect(db_path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS reports (id TEXT PRIMARY KEY, kind TEXT, "
                        "ref TEXT, state TEXT, node TEXT, peer TEXT, payload TEXT, received_at REAL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS stats (key TEXT PRIMARY KEY, n INTEGER)")
        for key in ("deliveries", "duplicates", "batches"):
            self.db.execute("INSERT OR IGNORE INTO stats VALUES (?, 0)", (key,))

    async def Report(self, request: mesh_pb2.ReportBatch, context) -> mesh_pb2.ReportAck:
        peer = b",".join(context.auth_context().get("x509_common_name", [])).decode()
        accepted = []
        self.db.execute("BEGIN IMMEDIATE")
        for r in request.reports:
            kind = r.WhichOneof("body")
            body = getattr(r, kind)
            ref = getattr(body, "incident_id", "") if kind == "incident" else \
                getattr(body, "mitigation_id", "") if kind == "mitigation" else \
                getattr(body, "evidence_id", "") if kind == "evidence" else \
                getattr(body, "feedback_id", "") if kind == "feedback" else ""
            cur = self.db.execute(
                "INSERT OR IGNORE INTO reports VALUES (?,?,?,?,?,?,?,?)",
                (r.id, kind, ref, getattr(body, "state", ""), r.node_id, peer,
                 json_format.MessageToJson(r, preserving_proto_field_name=True), time.time()))
            self.db.execute("UPDATE stats SET n = n + 1 WHERE key = 'deliveries'")
            if cur.rowcount == 0:
                self.db.execute("UPDATE stats SET n = n + 1 WHERE key = 'duplicates'")
            accepted.append(r.id)
        self.db.execute("UPDATE stats SET n = n + 1 WHERE key = 'batches'")
        self.db.execute("COMMIT")
        if self.lose_acks > 0:
            self.lose_acks -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "reply lost (test receiver)")
        return mesh_pb2.ReportAck(accepted=accepted)


def server_credentials(certs: dict[str, Path]) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(certs["server_key"].read_bytes(), certs["server_cert"].read_bytes())],
        root_certificates=certs["ca"].read_bytes(), require_client_auth=True)


async def serve(listen: str, certs: dict[str, Path], db_path: Path,
                lose_acks: int = 0) -> tuple[grpc.aio.Server, int, Receiver]:
    """Start a receiver on `listen` (port 0: any); returns the server, port and servicer."""
    server = grpc.aio.server()
    receiver = Receiver(db_path, lose_acks)
    mesh_pb2_grpc.add_MeshReportingServicer_to_server(receiver, server)
    port = server.add_secure_port(listen, server_credentials(certs))
    await server.start()
    return server, port, receiver


def received(db_path: Path) -> tuple[list[dict], dict[str, int]]:
    """(every processed report as a dict, stats) from a receiver's database."""
    with sqlite3.connect(db_path) as db:
        db.row_factory = sqlite3.Row
        rows = [dict(r) for r in db.execute("SELECT * FROM reports ORDER BY received_at")]
        stats = {r["key"]: r["n"] for r in db.execute("SELECT * FROM stats")}
    return rows, stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True)
    p.add_argument("--certs", required=True, type=Path, help="directory from make_certs")
    p.add_argument("--db", required=True, type=Path)
    p.add_argument("--lose-acks", type=int, default=0)
    p.add_argument("--max-s", type=float, default=300.0, help="exit after this long anyway")
    args = p.parse_args()
    certs = {"ca": args.certs / "ca.pem", "server_cert": args.certs / "server.pem",
             "server_key": args.certs / "server.key"}

    async def run() -> None:
        server, port, _ = await serve(args.listen, certs, args.db, args.lose_acks)
        print(json.dumps({"listening": args.listen, "port": port}), flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        try:
            await asyncio.wait_for(stop.wait(), args.max_s)
        except TimeoutError:
            pass
        await server.stop(grace=None)

    asyncio.run(run())


if __name__ == "__main__":
    main()
