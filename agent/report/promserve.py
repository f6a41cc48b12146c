"""Prometheus's /metrics over HTTP in a daemon thread: the agent's metrics
(agent/report/metrics.py) and the mesh service's (mesh/metrics.py). Only the standard
library and prometheus_client: the swarm-mesh package ships this module.

A connection gets a thread while it is served, at most MAX_HANDLERS at once, and a
TIMEOUT_S on every read and write: idle connections to the port (any local user can open
thousands) cannot pin the threads of the process, which the mesh's gRPC handlers and the
agent need (asyncio.to_thread). A connection beyond the cap is answered 503 and closed
without a thread; a scrape, a request and a reply, takes milliseconds."""
from __future__ import annotations

import ipaddress
import socket
import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

MAX_HANDLERS = 8            # connections served at once; Prometheus scrapes one at a time
TIMEOUT_S = 10.0            # per read or write of a connection (Prometheus's scrape timeout)
_BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
         b"Connection: close\r\n\r\ntoo many connections to the metrics port\n")


def serve_registry(registry: CollectorRegistry, listen: str) -> WSGIServer:
    """Serve `registry` as /metrics on `listen` ("host:port", "[v6]:port") in a daemon
    thread (the mesh service's metrics use it too); raises OSError when the address cannot
    be bound. `shutdown()` and `server_close()` stop it."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    try:
        v6 = ipaddress.ip_address(host).version == 6
    except ValueError:
        v6 = False       # a host name; bind resolves it
    server = make_server(host, int(port), make_wsgi_app(registry),
                         _V6Server if v6 else _Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    request_queue_size = 64     # the listen backlog: a burst waits, is not reset

    def server_activate(self) -> None:
        self._slots = threading.BoundedSemaphore(MAX_HANDLERS)
        super().server_activate()

    def process_request(self, request, client_address) -> None:
        """A thread for the connection while a slot is free, else 503 and close."""
        if not self._slots.acquire(blocking=False):
            _refuse(request)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()           # no thread started: it will not release it
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _V6Server(_Server):
    address_family = socket.AF_INET6


def _refuse(sock: socket.socket) -> None:
    """503 if the socket takes it at once (its send buffer is empty), never waiting."""
    try:
        sock.setblocking(False)
        sock.send(_BUSY)
    except OSError:
        pass


class _QuietHandler(WSGIRequestHandler):
    timeout = TIMEOUT_S         # socket timeout on every read and write of the connection

    def log_message(self, format: str, *args: Any) -> None:   # no access log on stderr
        pass


class Endpoint:
    """A registry served on demand: the agent's Metrics and the mesh's MeshMetrics."""

    registry: CollectorRegistry
    _server: Any = None

    def serve(self, listen: str) -> None:
        """Serve /metrics on `listen` ("host:port", "[v6]:port") in a daemon thread;
        raises OSError when the address cannot be bound."""
        self._server = serve_registry(self.registry, listen)

    @property
    def address(self) -> tuple[str, int] | None:
        return self._server.server_address[:2] if self._server else None

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
