"""Patterns made of real TCP connections: floods, a scan, a load balancer's burst, a
well-behaved client, and the handshake probe that measures when a victim cut us off."""
from __future__ import annotations

import errno
import selectors
import socket
import struct
import time
from collections import OrderedDict
from typing import Callable, Iterable

from swarmlab.attacks.common import NS_PER_S, Options, Pacer, Tally
from swarmlab.attacks.packets import family_of

# close() with SO_LINGER 0 sends RST and leaves no TIME_WAIT behind: a flood of graceful
# closes would exhaust the attacker's ~28k ephemeral ports within seconds.
_LINGER_ABORT = struct.pack("ii", 1, 0)


def _close_abort(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
    sock.close()


def connect_many(opts: Options, ports: Iterable[int], on_open: Callable[[socket.socket, int], None],
                 pacer: Pacer) -> tuple[Tally, dict[str, int]]:
    """Non-blocking connects to target:port for each port, at most `concurrency` in flight,
    each given `timeout_ms`. Returns the tally and outcome counts (open/refused/timeout)."""
    family, timeout_ns = family_of(opts.target), int(opts.timeout_ms * 1e6)
    tally, outcomes = Tally(), {"open": 0, "refused": 0, "timeout": 0, "error": 0}
    pending: OrderedDict[socket.socket, tuple[int, int]] = OrderedDict()
    port_iter = iter(ports)
    with selectors.DefaultSelector() as sel:
        def finish(sock: socket.socket, port: int, err: int) -> None:
            del pending[sock]
            sel.unregister(sock)
            if err == 0:
                outcomes["open"] += 1
                on_open(sock, port)
                return
            kind = {errno.ECONNREFUSED: "refused", errno.ETIMEDOUT: "timeout"}.get(err, "error")
            outcomes[kind] += 1
            if kind == "error":
                tally.error(OSError(err, ""))
            _close_abort(sock)

        more = True
        while True:
            while more and len(pending) < opts.concurrency:
                port, now = next(port_iter, None), pacer.next()
                if port is None or now is None:
                    more = False
                    break
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setblocking(False)
                tally.mark(now)
                pending[sock] = (port, now)
                sel.register(sock, selectors.EVENT_WRITE)
                err = sock.connect_ex((opts.target, port))
                if err not in (0, errno.EINPROGRESS):
                    finish(sock, port, err)
            if not pending and not more:
                break
            # Sleep until the oldest attempt times out, or (with room for more) until the
            # pacer's next slot, whichever comes first.
            wake_ns = next(iter(pending.values()))[1] + timeout_ns if pending else pacer.next_ns
            if more and len(pending) < opts.concurrency:
                wake_ns = min(wake_ns, pacer.next_ns)
            for key, _ in sel.select(timeout=max(0.0, (wake_ns - time.monotonic_ns()) / NS_PER_S)):
                finish(key.fileobj, pending[key.fileobj][0],
                       key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
            now = time.monotonic_ns()
            for sock, (port, started_ns) in list(pending.items()):
                if now - started_ns < timeout_ns:
                    break
                finish(sock, port, errno.ETIMEDOUT)
    return tally, outcomes


def conn_flood(opts: Options) -> dict:
    pacer = Pacer(opts.count, opts.duration_s, opts.rate)
    tally, outcomes = connect_many(opts, _repeat(opts.port), lambda s, _p: _close_abort(s), pacer)
    return tally.report(opts, **outcomes)


def lb_burst(opts: Options) -> dict:
    """Like a load balancer's health checks and pooled connections after a restart: many
    connections at once from one address, each closed politely."""
    pacer = Pacer(opts.count, opts.duration_s, opts.rate)
    tally, outcomes = connect_many(opts, _repeat(opts.port), lambda s, _p: s.close(), pacer)
    return tally.report(opts, **outcomes)


def port_scan(opts: Options) -> dict:
    first, _, last = opts.ports.partition("-")
    ports = range(int(first), int(last or first) + 1)
    found: list[int] = []

    def on_open(sock: socket.socket, port: int) -> None:
        found.append(port)
        _close_abort(sock)

    pacer = Pacer(min(opts.count, len(ports)), opts.duration_s, opts.rate)
    tally, outcomes = connect_many(opts, ports, on_open, pacer)
    return tally.report(opts, ports=opts.ports, open_ports=sorted(found), **outcomes)


def _repeat(port: int) -> Iterable[int]:
    while True:
        yield port


def benign(opts: Options) -> dict:
    """A polite client: connect, send a line, read the reply, close; `rate` per second."""
    pacer = Pacer(opts.count, opts.duration_s, opts.rate or 20.0)
    tally, ok, failed = Tally(), 0, 0
    while (now := pacer.next()) is not None:
        tally.mark(now)
        try:
            with socket.create_connection((opts.target, opts.port), timeout=opts.timeout_ms / 1000) as s:
                s.sendall(b"hello\n")
                reply = s.recv(256)
        except OSError as e:
            tally.error(e)
            failed += 1
            continue
        if reply:
            ok += 1
        else:
            failed += 1
    return tally.report(opts, successes=ok, failures=failed)


def probe(opts: Options) -> dict:
    """Try a handshake every `interval_ms` (each given `timeout_ms`) and report when they
    stopped succeeding for good: cut_off_mono_ns is the start of the first failed attempt
    after which none succeeded, so the victim cut us off in (last_success, cut_off]."""
    pacer = Pacer(opts.count, opts.duration_s, 1000.0 / opts.interval_ms)
    family, timeout_s = family_of(opts.target), opts.timeout_ms / 1000
    tally, ok, failed, run = Tally(), 0, 0, 0
    first_ok_ns: int | None = None
    last_ok_ns: int | None = None
    cut_off_ns: int | None = None
    while (now := pacer.next()) is not None:
        tally.mark(now)
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(timeout_s)
            try:
                s.connect((opts.target, opts.port))
            except OSError as e:
                tally.error(e)
                failed, run = failed + 1, run + 1
                cut_off_ns = cut_off_ns or now
                if opts.stop_after_failures and run >= opts.stop_after_failures:
                    break
                continue
            ok, run, last_ok_ns, cut_off_ns = ok + 1, 0, now, None
            first_ok_ns = first_ok_ns or now
    return tally.report(opts, successes=ok, failures=failed, first_success_mono_ns=first_ok_ns,
                        last_success_mono_ns=last_ok_ns, cut_off_mono_ns=cut_off_ns)
