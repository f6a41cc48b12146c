"""A line echo server for the victim: dual stack, one thread, bounded lifetime."""
from __future__ import annotations

import json
import resource
import selectors
import signal
import socket
import time

from swarmlab.attacks.common import NS_PER_S, Options


def listen(bind: str | None, port: int, backlog: int = 4096) -> socket.socket:
    """Listen on `bind` (default: every IPv4 and IPv6 address, one dual-stack socket)."""
    v4 = bind is not None and ":" not in bind
    sock = socket.socket(socket.AF_INET if v4 else socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if not v4:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((bind or "::", port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def serve(opts: Options) -> dict:
    """Accept and echo until `duration_s` ends or SIGTERM; print a ready line first so a
    launcher knows when to start the clients."""
    # A connection flood holds hundreds of sockets at once; the soft limit of 1024 is an
    # accident of defaults, the hard one is what this process may really use.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
    accepted = echoed_bytes = 0
    deadline_ns = time.monotonic_ns() + int(opts.duration_s * NS_PER_S)
    with listen(opts.bind, opts.port) as lsock, selectors.DefaultSelector() as sel:
        print(json.dumps({"event": "listening", "port": lsock.getsockname()[1]}), flush=True)
        sel.register(lsock, selectors.EVENT_READ)
        while not stopping and (left_ns := deadline_ns - time.monotonic_ns()) > 0:
            for key, _ in sel.select(timeout=min(left_ns / NS_PER_S, 0.2)):
                if key.fileobj is lsock:
                    accepted += _accept_all(lsock, sel)
                else:
                    echoed_bytes += _echo(key.fileobj, sel)
        open_conns = [k.fileobj for k in sel.get_map().values() if k.fileobj is not lsock]
        for conn in open_conns:
            sel.unregister(conn)
            conn.close()
    return {"pattern": "serve", "port": opts.port, "accepted": accepted,
            "echoed_bytes": echoed_bytes, "stopped_by": "signal" if stopping else "duration"}


def _accept_all(lsock: socket.socket, sel: selectors.BaseSelector) -> int:
    n = 0
    while True:
        try:
            conn, _ = lsock.accept()
        except OSError:   # EAGAIN: queue drained; EMFILE or a reset peer: try next round
            return n
        conn.setblocking(False)
        sel.register(conn, selectors.EVENT_READ)
        n += 1


def _echo(conn: socket.socket, sel: selectors.BaseSelector) -> int:
    try:
        data = conn.recv(4096)
        if data:
            return conn.send(data)   # lines are small: one send fits the empty buffer
    except OSError:
        pass
    sel.unregister(conn)
    conn.close()
    return 0

