"""The network probe: XDP counters per source and per service, passive TCP connections and
sent resets, with threshold crossings pushed from the kernel through a ring buffer.

NetProbe must be opened in the network namespace it watches: the XDP program attaches
by ifindex there, and the tracepoint programs only count events of that namespace.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import ipaddress
import math
import os
import socket
from dataclasses import dataclass
from typing import Callable

from agent.config import Probes
from agent.model import Event
from agent.sources import abi, libbpf
from agent.sources.abi import NetMap, NetProg

SOURCE = "bpf.net"
THRESHOLD_KEYS = ("syns", "packets", "udp", "ports", "conns", "resets",
                  "svc_syns", "svc_packets", "svc_udp", "svc_sources")
# What a kernel says when it does not allow something (as opposed to a broken object).
REFUSED = {errno.EPERM, errno.EACCES, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOENT,
           errno.ENODEV, errno.EBUSY, 524}  # 524: the kernel's ENOTSUPP
PROTO_NAMES = {6: "tcp", 17: "udp"}
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True, slots=True)
class SourceCounters:
    """One source's counters in its current window (a read of the `sources` map)."""

    address: str
    family: int          # 4 or 6
    window_start_ns: int
    packets: int
    bytes: int
    syns: int
    udp: int
    ports: int           # estimated distinct destination ports
    dport: int
    proto: str


def expected_bits(distinct: int) -> int:
    """Bits a hashed bitmap shows on average after `distinct` different values."""
    m = abi.DISTINCT_BITS
    return min(m, math.ceil(m * (1 - math.exp(-distinct / m)))) if distinct > 0 else 0


def estimate_distinct(bits: int) -> int:
    """Linear counting: the number of different values behind `bits` set bits."""
    m = abi.DISTINCT_BITS
    return round(-m * math.log(1 - min(bits, m - 1) / m))


def address_text(addr: bytes, family: int) -> str:
    if family == socket.AF_INET:
        return str(ipaddress.IPv4Address(bytes(addr[:4])))
    v6 = ipaddress.IPv6Address(bytes(addr))
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; rules, the allowlist and
    # the block sets all speak plain IPv4 for them.
    return str(v6.ipv4_mapped) if v6.ipv4_mapped else str(v6)


def window_thresholds(per_s: dict[str, int], window_ms: int) -> abi.net_thresholds:
    """Scale per-second thresholds to one window (at least 1 unless 0 = never)."""
    unknown = set(per_s) - set(THRESHOLD_KEYS)
    if unknown:
        raise ValueError(f"unknown thresholds: {', '.join(sorted(unknown))}")

    def scaled(key: str) -> int:
        value = int(per_s.get(key, 0))
        if value < 0:
            raise ValueError(f"threshold {key} must not be negative")
        return max(1, math.ceil(value * window_ms / 1000)) if value else 0

    t = abi.net_thresholds()
    for key in ("syns", "packets", "udp", "conns", "resets", "svc_syns", "svc_packets", "svc_udp"):
        setattr(t, key, scaled(key))
    t.port_bits = expected_bits(scaled("ports"))
    t.svc_source_bits = expected_bits(scaled("svc_sources"))
    return t


def _setns(fd: int) -> None:
    if _libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class NetProbe:
    """Loads probes/net.bpf.o into the calling thread's network namespace.

    open() loads and attaches; what the kernel refuses is reported by status() as
    "degraded" (or "failed" for other errors) and the rest keeps running; a missing or
    broken object raises. run() emits one Event per kernel alert until cancelled.
    close() detaches everything (from the namespace open() ran in) and is idempotent.
    """

    def __init__(self, probes_cfg: Probes, interfaces: list[str], thresholds: dict[str, int],
                 object_path: str | os.PathLike = abi.NET_OBJECT):
        self.cfg = probes_cfg
        self.interfaces = list(interfaces)
        self.thresholds = window_thresholds(thresholds, probes_cfg.window_ms)
        self.object_path = str(object_path)
        self._obj: libbpf.Object | None = None
        self._links: list[libbpf.Link | libbpf.XdpLink] = []
        self._ring: libbpf.RingBuffer | None = None
        self._netns_fd: int | None = None
        self._status: dict[str, dict[str, str]] = {}
        self.undecoded = 0

    # --- loading -------------------------------------------------------------------------

    def open(self) -> None:
        self._netns_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            refused = self._classify()
            self._obj = self._configured(set(NetProg) - set(refused))
            if len(refused) < len(NetProg):
                self._obj.load()
                self._map(NetMap.THRESHOLDS).update(ctypes.c_uint32(0), self.thresholds)
                self._ring = libbpf.RingBuffer(self._map(NetMap.ALERTS))
            for prog, reason in refused.items():
                self._set(prog, "degraded", f"the kernel refused the program: {reason}")
            if len(refused) < len(NetProg):
                self._attach(set(NetProg) - set(refused))
        except BaseException:
            self.close()
            raise

    def _configured(self, progs: set[NetProg]) -> libbpf.Object:
        """An opened object with sizes and .rodata set and only `progs` loading."""
        obj = libbpf.Object(self.object_path)
        try:
            for name in abi.SIZED_MAPS:
                obj.map(name).set_max_entries(self.cfg.map_entries)
            cfg = abi.net_config(window_ns=self.cfg.window_ms * 1_000_000,
                                 netns_ino=os.fstat(self._netns_fd).st_ino)
            obj.map(NetMap.RODATA).set_initial_value(bytes(cfg))
            for prog in NetProg:
                obj.program(prog).set_autoload(prog in progs)
        except BaseException:
            obj.close()
            raise
        return obj

    def _classify(self) -> dict[NetProg, str]:
        """Programs this kernel will not load, with why: first everything at once, and
        only if that fails, each program alone."""
        try:
            self._trial(set(NetProg))
            return {}
        except OSError:
            pass
        refused = {}
        for prog in NetProg:
            try:
                self._trial({prog})
            except OSError as e:
                if e.errno not in REFUSED:
                    raise
                refused[prog] = f"{e.strerror} ({libbpf.log_tail(1) or 'no log'})"
        return refused

    def _trial(self, progs: set[NetProg]) -> None:
        obj = self._configured(progs)
        try:
            obj.load()
        finally:
            obj.close()

    def _attach(self, progs: set[NetProg]) -> None:
        for prog, (category, name) in abi.NET_TRACEPOINTS.items():
            if prog in progs:
                self._attach_one(prog, lambda: self._obj.program(prog).attach_tracepoint(category, name))
        if NetProg.XDP in progs:
            self._attach_xdp()

    def _attach_one(self, prog: NetProg, attach: Callable[[], libbpf.Link]) -> None:
        try:
            self._links.append(attach())
            self._set(prog, "loaded", "attached")
        except OSError as e:
            self._set(prog, "degraded" if e.errno in REFUSED else "failed", str(e))

    def _attach_xdp(self) -> None:
        names = self.interfaces or [n for _, n in socket.if_nameindex() if n != "lo"]
        prog, errors = self._obj.program(NetProg.XDP), []
        for name in names:
            try:
                self._links.append(libbpf.XdpLink(prog, socket.if_nametoindex(name)))
            except OSError as e:
                errors.append(f"{name}: {e.strerror}")
        attached = len(names) - len(errors)
        if not names:
            self._set(NetProg.XDP, "degraded", "no interface to watch")
        elif errors:
            state = "degraded" if attached else "failed"
            self._set(NetProg.XDP, state, f"attached to {attached}/{len(names)}: " + "; ".join(errors))
        else:
            self._set(NetProg.XDP, "loaded", f"generic XDP on {', '.join(names)}")

    def _set(self, prog: NetProg, state: str, reason: str) -> None:
        self._status[prog.value] = {"state": state, "reason": reason}

    def _map(self, name: NetMap) -> libbpf.Map:
        if self._obj is None:
            raise RuntimeError("the network probe is not loaded")
        return self._obj.map(name)

    # --- reading -------------------------------------------------------------------------

    def status(self) -> dict[str, dict[str, str]]:
        return {k: dict(v) for k, v in self._status.items()}

    def losses(self) -> int:
        """Alerts the kernel could not queue (ring buffer full), over all CPUs."""
        return self._map(NetMap.LOSSES).percpu_u64_sum() if self._ring else 0

    def set_thresholds(self, thresholds: dict[str, int]) -> None:
        """Replace the thresholds of the running probe (per second, as in __init__)."""
        self.thresholds = window_thresholds(thresholds, self.cfg.window_ms)
        self._map(NetMap.THRESHOLDS).update(ctypes.c_uint32(0), self.thresholds)

    def read_sources(self) -> list[SourceCounters]:
        return [SourceCounters(
            address=address_text(bytes(k.addr), k.family), family=4 if k.family == socket.AF_INET else 6,
            window_start_ns=v.window_start_ns, packets=v.packets, bytes=v.bytes, syns=v.syns,
            udp=v.udp, ports=estimate_distinct(v.ports), dport=v.dport,
            proto=PROTO_NAMES.get(v.proto, "ip"))
            for k, v in self._map(NetMap.SOURCES).items(abi.addr_key, abi.source_stats)]

    def poll(self) -> list[Event]:
        """Alerts queued now, decoded (what run() emits; usable without a loop)."""
        if self._ring is None:
            return []
        events = []
        for record in self._ring.consume():
            event = to_event(abi.decode(record), self.cfg.window_ms)
            if event is None:
                self.undecoded += 1
            else:
                events.append(event)
        return events

    async def run(self, emit: Callable[[Event], None]) -> None:
        """Emit every alert until cancelled; woken by the ring buffer's epoll fd."""
        if self._ring is None:
            await asyncio.Future()  # nothing loaded: idle until cancelled
        loop = asyncio.get_running_loop()
        fd = self._ring.epoll_fd

        def drain() -> None:
            for event in self.poll():
                emit(event)

        loop.add_reader(fd, drain)
        try:
            drain()  # alerts queued before the reader was registered
            await asyncio.Future()
        finally:
            loop.remove_reader(fd)

    # --- teardown ------------------------------------------------------------------------

    def close(self) -> None:
        if self._ring:
            self._ring.free()
            self._ring = None
        if self._links:
            with self._in_own_netns():
                for link in self._links:
                    link.destroy()
            self._links.clear()
        if self._obj:
            self._obj.close()
            self._obj = None
        if self._netns_fd is not None:
            os.close(self._netns_fd)
            self._netns_fd = None

    @contextlib.contextmanager
    def _in_own_netns(self):
        # XDP is detached by ifindex, which only means something in the namespace it was
        # attached in; the caller may have moved on.
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            moved = os.fstat(home).st_ino != os.fstat(self._netns_fd).st_ino
            if moved:
                _setns(self._netns_fd)
            try:
                yield
            finally:
                if moved:
                    _setns(home)
        finally:
            os.close(home)

    def __enter__(self) -> "NetProbe":
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def to_event(ev: ctypes.Structure | None, window_ms: int) -> Event | None:
    """The model Event for one decoded kernel alert."""
    if ev is None:
        return None
    kind = ev.hdr.kind
    reason = abi.Reason(ev.reason).name.lower() if ev.reason in set(abi.Reason) else str(ev.reason)
    if kind == abi.EventKind.NET_SOURCE:
        return Event("net.source", address_text(bytes(ev.addr), ev.family), ev.hdr.ts_ns,
                     ev.window_start_ns, {
                         "packets": ev.packets, "bytes": ev.bytes, "syns": ev.syns, "udp": ev.udp,
                         "ports": estimate_distinct(ev.port_bits), "reason": reason,
                         "dport": ev.dport, "proto": PROTO_NAMES.get(ev.proto, "ip"),
                         "family": 4 if ev.family == socket.AF_INET else 6,
                         "window_ns": window_ms * 1_000_000}, SOURCE)
    if kind == abi.EventKind.NET_SERVICE:
        proto = PROTO_NAMES.get(ev.proto, "ip")
        return Event("net.service", f"{proto}/{ev.dport}", ev.hdr.ts_ns, ev.window_start_ns, {
            "packets": ev.packets, "syns": ev.syns, "udp": ev.udp,
            "sources": estimate_distinct(ev.source_bits), "reason": reason,
            "dport": ev.dport, "proto": proto}, SOURCE)
    name, count = (("tcp.established", "conns") if kind == abi.EventKind.TCP_ESTABLISHED
                   else ("tcp.reset", "resets"))
    return Event(name, address_text(bytes(ev.addr), ev.family), ev.hdr.ts_ns, ev.window_start_ns,
                 {count: ev.count, "dport": ev.dport}, SOURCE)
