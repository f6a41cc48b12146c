"""The network probe: ingress counters per source and per service of unsolicited packets
(those outside every flow this host accepted or started: probes/flow.bpf.h), at native
XDP, tc ingress or generic XDP, whichever costs each link least (sources/ingress.py),
passive TCP connections, sent resets (and those drawn by SYN-proxy-verified handshakes,
as "tcp.verified_reset"), with threshold crossings pushed from the kernel through a ring
buffer. A tc egress program records the UDP peers this host sends to. The watched links
follow the namespace's (sources/watched.py): a link created later is attached within
about a second while run() is on the loop, a deleted one leaves the status.

NetProbe must be opened in the network namespace it watches: the ingress program attaches
by ifindex there, and the tracepoint programs only count events of that namespace.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import logging
import math
import os
import socket
import time
from dataclasses import dataclass

from agent.config import Probes
from agent.model import Event
from agent.sources import abi, ingress, libbpf, links, watched
from agent.sources.abi import NetMap, NetProg
from agent.sources.probe import BpfProbe

SOURCE = "bpf.net"
THRESHOLD_KEYS = ("syns", "packets", "udp", "ports", "conns", "resets",
                  "svc_syns", "svc_packets", "svc_udp", "svc_sources")
PROTO_NAMES = {6: "tcp", 17: "udp"}
_libc = ctypes.CDLL(None, use_errno=True)
logger = logging.getLogger("swarm_agent")


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


class NetProbe(BpfProbe):
    """Loads probes/net.bpf.o into the calling thread's network namespace.

    open() loads and attaches; what the kernel refuses is reported by status() as
    "degraded" (or "failed" for other errors) and the rest keeps running; a missing or
    broken object raises. run() emits one Event per kernel alert until cancelled, and
    attaches to links created since (sync_links(), on rtnetlink's word, rate-limited).
    close() detaches everything (from the namespace open() ran in) and is idempotent.
    """

    NAME = "network"
    PROGS = NetProg
    TRACEPOINTS = abi.NET_TRACEPOINTS
    RING_MAP = NetMap.ALERTS
    LOSS_MAP = NetMap.LOSSES
    ATTACHED = "attached"  # its status() text as before; the tracepoints are in abi

    def __init__(self, probes_cfg: Probes, interfaces: list[str], thresholds: dict[str, int],
                 object_path: str | os.PathLike = abi.NET_OBJECT):
        self.cfg = probes_cfg
        self.interfaces = list(interfaces)
        self.thresholds = window_thresholds(thresholds, probes_cfg.window_ms)
        super().__init__(object_path)
        self._netns_fd: int | None = None
        self.ingress: list[ingress.Attached] = []   # what each watched link got
        self.linkset: watched.LinkSet | None = None
        self._changes: watched.LinkChanges | None = None
        self._changes_error = ""
        self._progs: set[NetProg] = set()
        self._last_sync = 0.0

    # --- loading -------------------------------------------------------------------------

    def open(self) -> None:
        # Held until close(): .rodata filters on its inode, and XDP must be detached here.
        self._netns_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        super().open()

    def _configure(self, obj: libbpf.Object) -> None:
        for name in abi.SIZED_MAPS:
            obj.map(name).set_max_entries(self.cfg.map_entries)
        cfg = abi.net_config(window_ns=self.cfg.window_ms * 1_000_000,
                             netns_ino=os.fstat(self._netns_fd).st_ino,
                             drop_unparsable=int(self.cfg.drop_unparsable))
        obj.map(NetMap.RODATA).set_initial_value(bytes(cfg))

    def _fill_maps(self) -> None:
        self._map(NetMap.THRESHOLDS).update(ctypes.c_uint32(0), self.thresholds)

    def _attach(self, progs: set[NetProg]) -> None:
        super()._attach(progs)
        # A program the kernel refused is not offered: its status already says why.
        offered = {p: self._obj.program(p) if p in progs else None
                   for p in (NetProg.XDP, NetProg.TC_INGRESS, NetProg.TC_EGRESS)}
        # Without egress, answers from UDP peers this host talks to through an unconnected
        # socket (wireguard-go, QUIC servers) count as unsolicited: degraded, reported.
        self.linkset = watched.LinkSet(self.interfaces, self.cfg.attach_mode,
                                       offered[NetProg.XDP], offered[NetProg.TC_INGRESS],
                                       offered[NetProg.TC_EGRESS], egress_link, self._links)
        self._progs = progs
        try:
            self._changes = watched.LinkChanges()
        except OSError as e:     # links are then those of now: the status says so
            self._changes_error = f"; links added later are not watched ({e.strerror})"
        self.sync_links()

    def sync_links(self) -> bool:
        """Attach to the links that appeared since the last call, let go of those that went
        (or are now judged below: a bridge whose ports are all watched), and update the
        status; True if anything changed. Raises nothing: a refusal degrades its link."""
        if self.linkset is None or self._netns_fd is None:
            return False
        self._last_sync = time.monotonic()
        try:
            with self._in_own_netns():
                changed = self.linkset.sync()
        except OSError as e:   # the namespace or its link list unreadable: keep what we have
            for prog in (NetProg.XDP, NetProg.TC_INGRESS, NetProg.TC_EGRESS):
                if prog.value in self._status:
                    self._status[prog.value]["reason"] += f"; links not re-read: {e.strerror}"
            return False
        self.ingress = [w.got for w in self.linkset.links.values() if w.got is not None]
        note = self._changes_error
        loaded = {k for k, p in (("xdp", NetProg.XDP), ("tc", NetProg.TC_INGRESS))
                  if p in self._progs}
        for key, (state, text) in self.linkset.ingress_status(loaded).items():
            self._set(NetProg.XDP if key == "xdp" else NetProg.TC_INGRESS, state, text + note)
        if NetProg.TC_EGRESS in self._progs:
            state, text = self.linkset.egress_status("tc egress")
            self._set(NetProg.TC_EGRESS, state, text + note)
        return changed

    def attach_modes(self) -> dict[str, str | None]:
        """Watched link -> the hook its ingress program runs at (None: none took it)."""
        return {r.link: None if r.mode is None else str(r.mode) for r in self.ingress}

    async def run(self, emit) -> None:
        """As BpfProbe.run(), and follows link changes: rtnetlink's word that a link came,
        went or changed schedules sync_links(), at most once every watched.RESYNC_MIN_S."""
        if self._changes is None:
            return await super().run(emit)
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle | None = None

        def resync() -> None:
            nonlocal timer
            timer = None
            self.sync_links()

        def changed() -> None:
            nonlocal timer
            try:
                news = self._changes.drain()
            except OSError as e:
                logger.warning("link changes unreadable: %s", e.strerror)
                news = True
            if news and timer is None:
                wait = self._last_sync + watched.RESYNC_MIN_S - time.monotonic()
                timer = loop.call_later(max(0.0, wait), resync)

        loop.add_reader(self._changes.fileno(), changed)
        try:
            await super().run(emit)
        finally:
            loop.remove_reader(self._changes.fileno())
            if timer is not None:
                timer.cancel()

    def status(self) -> dict[str, dict[str, str]]:
        """As BpfProbe.status(), and a tcx program (ours at tc ingress or egress) that is
        not first on its link's chain is "degraded": any program before ours that ends the
        chain (TC_ACT_OK) hides the link's traffic from it. Read from the kernel each time."""
        out = super().status()
        late: dict[str, list[str]] = {}
        tcx = [k for k in self._links if getattr(k, "attach_type", None) in
               (libbpf.BPF_TCX_INGRESS, libbpf.BPF_TCX_EGRESS)]
        if self._obj is None or self._netns_fd is None or not tcx:
            return out
        try:
            with self._in_own_netns():
                for link in tcx:
                    self._check_first(link, late)
        except OSError as e:      # the namespace cannot be entered: say so, raise nothing
            for which in (NetProg.TC_INGRESS, NetProg.TC_EGRESS):
                late.setdefault(which, []).append(f"tcx chains unreadable: {e.strerror}")
        for which, why in late.items():
            if which.value in out:
                st = out[which.value]
                st["state"] = "degraded" if st["state"] == "loaded" else st["state"]
                st["reason"] += "; degraded: " + "; ".join(why)
        return out

    def _check_first(self, link: object, late: dict[str, list[str]]) -> None:
        which = {libbpf.BPF_TCX_INGRESS: NetProg.TC_INGRESS,
                 libbpf.BPF_TCX_EGRESS: NetProg.TC_EGRESS}[link.attach_type]
        if link.fd < 0:
            return
        try:
            ahead = links.before(link.ifindex, link.attach_type,
                                 links.prog_id(self._obj.program(which).fd))
            name = socket.if_indextoname(link.ifindex)
        except OSError as e:
            late.setdefault(which, []).append(f"tcx chain unreadable: {e.strerror}")
            return
        if ahead:
            progs = ", ".join(f"{links.prog_name(i)} (id {i})" for i in ahead)
            late.setdefault(which, []).append(f"program {progs} runs before ours on {name}")
        elif ahead is None:
            late.setdefault(which, []).append(f"ours is no longer on {name}")

    # --- reading -------------------------------------------------------------------------

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
            for k, v in self._map(NetMap.SOURCES).items(abi.addr_key, abi.source_stats)
            if v.window_start_ns != abi.WINDOW_RESETTING]   # mid-reset: counters in flux

    def unparsed(self) -> dict[str, int]:
        """Packets the ingress parser could not follow, by reason (over all CPUs):
        "truncated", "chain_too_long", "unknown_header", "vlan_depth", "bad_header". Each
        still counted to its source when the source address was readable. {} when nothing
        is loaded."""
        if self._obj is None:
            return {}
        return {why.name.lower(): sum(self._per_cpu(NetMap.UNPARSED, why))
                for why in abi.ParseFailure}

    def verdicts(self) -> dict[str, int]:
        """Packets the ingress program has seen since load: solicited (never counted) and
        unsolicited."""
        return {name: sum(self._per_cpu(NetMap.VERDICTS, index))
                for index, name in ((0, "solicited"), (1, "unsolicited"))}

    def _decode(self, record: bytes) -> Event | None:
        return to_event(abi.decode(record), self.cfg.window_ms)

    # --- teardown ------------------------------------------------------------------------

    def close(self) -> None:
        if self._changes is not None:
            self._changes.close()
            self._changes = None
        super().close()
        self.linkset = None
        if self._netns_fd is not None:
            os.close(self._netns_fd)
            self._netns_fd = None

    def _detach(self) -> None:
        if self._links:
            with self._in_own_netns():
                super()._detach()

    @contextlib.contextmanager
    def _in_own_netns(self):
        # clsact filters (tc egress; tc ingress before tcx) are detached by ifindex, which
        # only means something in the namespace it was attached in; the caller may have
        # moved on. (BPF links need no namespace: closing their fd detaches them.)
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


def egress_link(prog: libbpf.Program, ifindex: int):
    """The egress program on `ifindex` as a tcx link (Linux 6.6: the kernel detaches it when
    the agent's process ends, and deleting the clsact qdisc does not remove it), else a
    clsact filter, which replaces one a killed agent left (libbpf.TC_HANDLE)."""
    try:
        return libbpf.tcx_egress(prog, ifindex)
    except OSError as e:
        if e.errno not in ingress.NO_TCX:
            raise
    return libbpf.TcLink(prog, ifindex)


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
                   else ("tcp.verified_reset", "resets") if ev.reason == abi.Reason.VERIFIED_RESETS
                   else ("tcp.reset", "resets"))
    return Event(name, address_text(bytes(ev.addr), ev.family), ev.hdr.ts_ns, ev.window_start_ns,
                 {count: ev.count, "dport": ev.dport}, SOURCE)
