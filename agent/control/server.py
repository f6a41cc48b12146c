"""The control server: swarm.control.v1.Control, health and reflection over grpc.aio.

Listeners: the unix socket <run_dir>/control.sock for local root (through LocalFront,
which checks SO_PEERCRED; gRPC itself listens on a private socket in a 0700 directory and
answers only connections LocalFront made, see agent.control.auth), and, when
control.listen is set, TCP with mutual TLS (a client certificate signed by
control.tls_ca is required by the handshake; its CN is the identity). Requests above
MAX_REQUEST_BYTES are refused with RESOURCE_EXHAUSTED by gRPC before any handler runs:
a rule bundle's 1 MiB (agent.bundles.MAX_BYTES) and 64 KiB for the rest of its request;
every other call's text fields are limited by its handler (1024 characters), and what
the audit log keeps of a request is capped (agent.control.service.AUDIT_ARGS_MAX).

`ControlServer(agent).run()` is a task for the agent's TaskGroup: it serves until
cancelled, then stops (streams are cancelled after a short grace period).
"""
from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import grpc

from agent import bundles
from agent.config import Config, ConfigError
from agent.control import health, reflection
from agent.control.auth import Authenticator, Gate
from agent.control.local import LocalFront, SocketInUse
from agent.control.service import ControlService
from agent.control.watch import WatchHub
from agent.proto.swarm.control.v1 import control_pb2, control_pb2_grpc

log = logging.getLogger("swarm_agent")

MAX_REQUEST_BYTES = bundles.MAX_BYTES + 64 * 1024
STOP_GRACE_S = 1.0
CONTROL_SERVICE = control_pb2.DESCRIPTOR.services_by_name["Control"].full_name


def private_socket(cfg: Config) -> Path:
    return Path(cfg.run_dir) / "control.d" / "grpc.sock"


class ControlServer:
    """Serves `agent` (cfg, store, responder, status(), reload_rules(), ready). Only
    peers with a uid in `allowed_uids` may use the local socket."""

    def __init__(self, agent: Any, allowed_uids: tuple[int, ...] = (0,)):
        self.agent = agent
        self.allowed_uids = allowed_uids
        self.cfg: Config = agent.cfg
        self.server: grpc.aio.Server | None = None
        self.front: LocalFront | None = None
        self.hub: WatchHub | None = None
        self.tcp_port: int | None = None

    async def start(self) -> None:
        """Bind every listener; raises ConfigError with one sentence when one cannot be."""
        self.hub = WatchHub(asyncio.get_running_loop())
        self.agent.responder.observers.append(self.hub.on_change)
        backend = private_socket(self.cfg)
        front = LocalFront(self.cfg.control_socket, backend, self.allowed_uids)
        auth = Authenticator(self.cfg.control, front.peers)
        service = ControlService(self.agent, self.hub, auth)
        server = grpc.aio.server(interceptors=[Gate(auth, service.audit_call)],
                                 options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                                          ("grpc.so_reuseport", 0)])
        control_pb2_grpc.add_ControlServicer_to_server(service, server)
        health.add_to_server(health.HealthService(lambda: bool(self.agent.ready),
                                                  [CONTROL_SERVICE]), server)
        reflection.add_to_server(server, [CONTROL_SERVICE, health.SERVICE_NAME])
        self._prepare_dirs()
        server.add_insecure_port(f"unix:{backend}")
        if self.cfg.control.listen:
            self.tcp_port = self._add_tcp(server)
        await server.start()
        self.server = server
        os.chmod(backend, 0o600)
        self.front = front
        try:
            await self.front.start()
        except (SocketInUse, OSError) as e:
            await self.stop()
            raise ConfigError(f"control socket: {e}") from None

    def _prepare_dirs(self) -> None:
        backend = private_socket(self.cfg)
        try:
            Path(self.cfg.run_dir).mkdir(parents=True, exist_ok=True, mode=0o755)
            backend.parent.mkdir(exist_ok=True, mode=0o700)
            os.chmod(backend.parent, 0o700)
            backend.unlink(missing_ok=True)   # ours: the state_dir lock says we own run_dir
        except OSError as e:
            raise ConfigError(f"run_dir {self.cfg.run_dir}: {e.strerror}") from None

    def _add_tcp(self, server: grpc.aio.Server) -> int:
        c = self.cfg.control
        try:
            creds = grpc.ssl_server_credentials(
                [(Path(c.tls_key).read_bytes(), Path(c.tls_cert).read_bytes())],
                root_certificates=Path(c.tls_ca).read_bytes(), require_client_auth=True)
        except OSError as e:
            raise ConfigError(f"control TLS files: {e.filename}: {e.strerror}") from None
        try:
            port = server.add_secure_port(c.listen, creds)
        except RuntimeError:
            port = 0
        if not port:
            raise ConfigError(f"control.listen: cannot listen on {c.listen}")
        return port

    async def stop(self) -> None:
        if self.front is not None:
            await self.front.close()
            self.front = None
        if self.server is not None:
            await self.server.stop(STOP_GRACE_S)
            self.server = None
        if self.hub is not None and self.hub.on_change in self.agent.responder.observers:
            self.agent.responder.observers.remove(self.hub.on_change)
        private_socket(self.cfg).unlink(missing_ok=True)

    async def run(self) -> None:
        """Start (unless started), serve until cancelled, then stop."""
        if self.server is None:
            await self.start()
        log.info("control server listening", extra={
            "socket": str(self.cfg.control_socket), "tcp_port": self.tcp_port})
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.shield(self.stop())
