"""Prometheus's /metrics over HTTP in a daemon thread: the agent's metrics
(agent/report/metrics.py) and the mesh service's (mesh/metrics.py). Only the standard
library and prometheus_client: the swarm-mesh package ships this module."""
from __future__ import annotations

import ipaddress
import socket
import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app


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


class _V6Server(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:   # no access log on stderr
        pass
