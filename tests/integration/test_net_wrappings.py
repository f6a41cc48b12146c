"""Packets by what they carry, not by how they are wrapped: the real ingress program on the
victim's veth, at each hook it can run at (native XDP, tc ingress, generic XDP), gets the same SYN flood and UDP flood plainly and under every wrapping
(IPv6 extension headers alone and chained, IPv4 options, first fragments, AH, 802.1Q and
QinQ tags), each wrapping from its own source and to its own ports, and every one must
draw the same verdict as the plain flood: the same source and service alerts and the
same counts. What the parser cannot follow is counted by reason and still counted to
its source. Every hook draws the same verdicts."""
from __future__ import annotations

import ipaddress
import socket
import struct
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from swarmlab.attacks import wrappings as w
from swarmlab.lab import Lab, netns, sh, wait_for
from agent.sources.net import NetProbe
from tests.conftest import skip_unsupported
from tests.integration.test_net_probe import (PROBES, REPO, built, canonical, find,  # noqa: F401
                                              listen, open_probe)

pytestmark = pytest.mark.privileged
# Per second; the probe scales them to its 2 s window (x2): 20 SYNs, 20 datagrams.
THRESHOLDS = {"syns": 10, "udp": 10, "svc_syns": 10, "svc_udp": 10, "svc_sources": 0}
FLOOD = 30      # of each kind per wrapping, all well inside one window
TCP_PORT, UDP_PORT = 7000, 8000   # + the case's index: closed ports of the victim
MAX_EXT_HEADERS = 8   # probes/net.bpf.h

# (family, IP wrapping, VLAN tags) -> one flood; the plain untagged case of each family is
# the reference.
CASES = ([(4, name, "untagged") for name in w.V4_WRAPPINGS]
         + [(4, "plain", "vlan"), (4, "plain", "qinq"), (4, "options", "qinq")]
         + [(6, name, "untagged") for name in w.V6_CHAINS]
         + [(6, "plain", "vlan"), (6, "plain", "qinq"), (6, "chain", "qinq")])


# The hooks the ingress program can run at on a veth (agent/sources/ingress.py); every
# test runs at each, and each must give the same verdicts.
HOOKS = {"tc": "tc ingress", "native": "native XDP", "generic": "generic XDP"}


@pytest.fixture(params=list(HOOKS))
def hook(request) -> str:
    return request.param


def open_at(lab: Lab, hook: str, **probes) -> NetProbe:
    """The probe in the victim with probes.attach_mode `hook`, which v0 must have got."""
    probe = open_probe(lab.victim, THRESHOLDS, replace(PROBES, attach_mode=hook, **probes))
    if probe.attach_modes() != {"v0": HOOKS[hook]}:
        probe.close()
        pytest.fail(f"v0 did not get {HOOKS[hook]}: {probe.status()}")
    return probe


class Frames:
    """Builds frames from the attacker's veth to the victim's, in the lab's subnets."""

    def __init__(self, lab: Lab):
        self.lab = lab
        self.dst_mac = w.mac(sh("cat", "/sys/class/net/v0/address", ns=lab.victim).stdout.strip())
        self.src_mac = w.mac(sh("cat", "/sys/class/net/a0/address", ns=lab.attacker).stdout.strip())

    def source(self, family: int, index: int) -> str:
        net = ipaddress.ip_network(f"{self.lab.addr('attacker', family == 6)}/{24 if family == 4 else 64}",
                                   strict=False)
        return str(net[0x40 + index])

    def ip(self, family: int, src: str, proto: int, segment: bytes, wrapping: str, ident: int) -> bytes:
        dst = self.lab.addr("victim", family == 6)
        if family == 4:
            return w.ipv4(src, dst, proto, segment, wrapping, ident)
        return w.ipv6(src, dst, proto, segment, w.V6_CHAINS[wrapping], ident)

    def frame(self, family: int, packet: bytes, tags: tuple = ()) -> bytes:
        return w.ethernet(self.dst_mac, self.src_mac, w.ETH_P_IP if family == 4 else w.ETH_P_IPV6,
                          packet, tags)

    def flood(self, index: int, family: int, wrapping: str, vlan: str) -> list[bytes]:
        """FLOOD SYNs and FLOOD datagrams from the case's own source to its own ports."""
        src, dst = self.source(family, index), self.lab.addr("victim", family == 6)
        frames = []
        for n in range(FLOOD):
            for proto, seg in ((socket.IPPROTO_TCP, w.tcp_syn(src, dst, 40000 + n, TCP_PORT + index, n)),
                               (socket.IPPROTO_UDP, w.udp(src, dst, 40000 + n, UDP_PORT + index))):
                frames.append(self.frame(family, self.ip(family, src, proto, seg, wrapping, n + 1),
                                         w.VLAN_TAGS[vlan]))
        return frames


def send(lab: Lab, frames: list[bytes], ifname: str = "a0") -> None:
    with netns(lab.attacker):
        sender = w.FrameSender(ifname)
        try:
            sender.send(frames)
        finally:
            sender.close()


def collect(probe: NetProbe, done, timeout_s: float = 5.0) -> list:
    events: list = []

    def ready():
        events.extend(probe.poll())
        return done(events)

    try:
        wait_for(ready, timeout_s)
    except TimeoutError:
        pass
    return events


def verdict(probe_sources: dict, events: list, src: str, index: int) -> tuple:
    """What the probe concluded about one flood: the source's alerts, its counters, and
    the alerts of the flood's two services."""
    s = probe_sources.get(canonical(src))
    counts = None if s is None else (s.packets, s.syns, s.udp, s.ports)
    return (sorted(e.fields["reason"] for e in find(events, "net.source", canonical(src))), counts,
            sorted(e.fields["reason"] for e in find(events, "net.service", f"tcp/{TCP_PORT + index}")),
            sorted(e.fields["reason"] for e in find(events, "net.service", f"udp/{UDP_PORT + index}")))


def test_every_wrapping_draws_the_plain_floods_verdict(lab, hook):
    probe = open_at(lab, hook)
    try:
        frames = Frames(lab)
        send(lab, [f for i, case in enumerate(CASES) for f in frames.flood(i, *case)])
        sources = lambda ev: {e.subject for e in ev if e.kind == "net.source"}
        want = {canonical(frames.source(case[0], i)) for i, case in enumerate(CASES)}
        events = collect(probe, lambda ev: want <= sources(ev))
        seen = {s.address: s for s in probe.read_sources()}
        got = {case: verdict(seen, events, frames.source(case[0], i), i) for i, case in enumerate(CASES)}
        plain = {4: got[(4, "plain", "untagged")], 6: got[(6, "plain", "untagged")]}
        assert plain[4] == plain[6] == (["syns", "udp"], (2 * FLOOD, FLOOD, FLOOD, 2),
                                        ["svc_syns"], ["svc_udp"])
        assert got == {case: plain[case[0]] for case in CASES}
        assert probe.unparsed() == dict.fromkeys(probe.unparsed(), 0)
    finally:
        probe.close()


def _ipv4_later_fragment(packet: bytes) -> bytes:
    """`packet` made a later fragment (offset 8 words): its payload is no L4 header."""
    header = packet[:6] + struct.pack("!HBBH", 1, packet[8], packet[9], 0) + packet[12:20]
    return header[:10] + struct.pack("!H", w.fold(w.word_sum(header))) + header[12:] + packet[20:]


def _ipv4_short_header(packet: bytes) -> bytes:
    """`packet` with an IPv4 header length of 16 bytes, which no stack accepts."""
    return bytes([0x44]) + packet[1:]


@pytest.mark.parametrize("drop", [False, True], ids=["pass", "drop"])
def test_what_the_parser_cannot_follow_is_counted_by_reason(lab, hook, drop):
    probe = open_at(lab, hook, drop_unparsable=drop)
    try:
        frames, v4, v6 = Frames(lab), lab.addr("victim"), lab.addr("victim", True)
        syn = lambda src, dst: w.tcp_syn(src, dst, 40000, 9000, 1)
        opts = lambda nxt: struct.pack("!BB", nxt, 0) + bytes([1, 4, 0, 0, 0, 0])
        # name -> (family, packet from source `src`, VLAN tags)
        cases = {
            "at_the_limit": (6, lambda s: w.ipv6(s, v6, 6, syn(s, v6), (w.DEST,) * MAX_EXT_HEADERS), ()),
            "chain_too_long": (6, lambda s: w.ipv6(s, v6, 6, syn(s, v6), (w.DEST,) * (MAX_EXT_HEADERS + 1)), ()),
            "unknown_header": (6, lambda s: w.ipv6(s, v6, 135, opts(6) + syn(s, v6)), ()),  # Mobility
            "truncated_v6": (6, lambda s: w.ipv6(s, v6, 6, syn(s, v6)[:12]), ()),
            "truncated_v4": (4, lambda s: w.ipv4(s, v4, 6, syn(s, v4)[:12]), ()),
            # RFC 1858's tiny fragment: the first 8 bytes of TCP, flags in the next one
            "tiny_fragment_v4": (4, lambda s: w.ipv4(s, v4, 6, syn(s, v4)[:8], "fragment"), ()),
            "bad_header": (4, lambda s: _ipv4_short_header(w.ipv4(s, v4, 6, syn(s, v4))), ()),
            "later_fragment_v4": (4, lambda s: _ipv4_later_fragment(w.ipv4(s, v4, 6, syn(s, v4))), ()),
            "later_fragment_v6": (6, lambda s: w.ipv6(s, v6, w.FRAGMENT, struct.pack("!BBHI", 6, 0, 8 << 3, 7)
                                                      + syn(s, v6)), ()),
            "vlan_depth": (4, lambda s: w.ipv4(s, v4, 6, syn(s, v4)),
                           ((w.TPID_8021AD, 1), (w.TPID_8021Q, 2), (w.TPID_8021Q, 3))),
        }
        srcs = {name: frames.source(family, 100 + i) for i, (name, (family, *_)) in enumerate(cases.items())}
        send(lab, [frames.frame(family, build(srcs[name]), tags)
                   for name, (family, build, tags) in cases.items() for _ in range(FLOOD)])
        want = {"truncated": 3 * FLOOD, "chain_too_long": FLOOD, "unknown_header": FLOOD,
                "vlan_depth": FLOOD, "bad_header": FLOOD}
        wait_for(lambda: probe.unparsed() == want, 3.0)
        seen = {s.address: s for s in probe.read_sources()}
        got = {name: (lambda s: s and (s.packets, s.syns, s.ports))(seen.get(canonical(src)))
               for name, src in srcs.items()}
        counted_without_ports = (FLOOD, 0, 0)
        # dropped (probes.drop_unparsable): what the kernel would deliver unseen
        dropped = ("chain_too_long", "truncated_v6", "truncated_v4", "tiny_fragment_v4",
                   "bad_header") if drop else ()
        assert got == {"at_the_limit": (FLOOD, FLOOD, 1), "vlan_depth": None,
                       **{name: None for name in dropped},
                       **{name: counted_without_ports for name in cases
                          if name not in ("at_the_limit", "vlan_depth", *dropped)}}
    finally:
        probe.close()


def _tcp_in_segs(ns: str) -> int:
    """The victim kernel's TCP segments received (both families: Tcp InSegs counts both)."""
    lines = sh("cat", "/proc/net/snmp", ns=ns).stdout.splitlines()
    head, values = [ln.split() for ln in lines if ln.startswith("Tcp:")][:2]
    return int(values[head.index("InSegs")])


@pytest.mark.parametrize("drop", [False, True], ids=["pass", "drop"])
def test_a_flood_behind_a_chain_too_long_never_reaches_the_kernel_unseen(lab, hook, drop):
    """Linux follows any number of extension headers; the parser follows 8. A SYN flood
    behind 9 reaches the victim's TCP unless XDP drops it (probes.drop_unparsable)."""
    probe = open_at(lab, hook, drop_unparsable=drop)
    try:
        frames, v6 = Frames(lab), lab.addr("victim", True)
        src = frames.source(6, 180)
        packet = w.ipv6(src, v6, 6, w.tcp_syn(src, v6, 40000, 9000, 1), (w.DEST,) * (MAX_EXT_HEADERS + 1))
        before = _tcp_in_segs(lab.victim)
        send(lab, [frames.frame(6, packet)] * FLOOD)
        wait_for(lambda: probe.unparsed().get("chain_too_long") == FLOOD, 3.0)
        if drop:
            assert _tcp_in_segs(lab.victim) == before
        else:
            wait_for(lambda: _tcp_in_segs(lab.victim) >= before + FLOOD, 3.0)
    finally:
        probe.close()


@pytest.fixture(scope="module")
def vlan_push(tmp_path_factory) -> Path:
    """tests/integration/vlan_push.bpf.o, built with the probes' flags and vmlinux.h."""
    out = tmp_path_factory.mktemp("bpf") / "vlan_push.bpf.o"
    cmd = ["clang", "-g", "-O2", "-target", "bpf", f"-I{REPO / 'probes/build'}", "-c",
           str(Path(__file__).with_name("vlan_push.bpf.c")), "-o", str(out)]
    subprocess.run(cmd, check=True, timeout=120)
    return out


@pytest.mark.parametrize("mode,in_frame", [("vlan", 0), ("qinq", 1)])
def test_tags_in_the_skb_are_not_in_the_frame_xdp_sees(lab, hook, vlan_push, mode, in_frame):
    """What a vlan device (or NIC VLAN offload) does to a tag, done by tc on the attacker's
    egress: generic XDP on the veth sees the outer tag nowhere (it stays in the skb's
    hwaccel field), and the packet parses as if it had one tag fewer: same counts, and
    bytes that show how many tags were left in the frame."""
    if sh("tc", "qdisc", "add", "dev", "a0", "clsact", ns=lab.attacker, check=False).returncode or sh(
            "tc", "filter", "add", "dev", "a0", "egress", "bpf", "da", "obj", str(vlan_push),
            "sec", f"tc/{mode}", ns=lab.attacker, check=False).returncode:
        skip_unsupported("tc cannot attach a BPF classifier here")
    probe = open_at(lab, hook)
    try:
        frames = Frames(lab)
        for family in (4, 6):
            src, dst = frames.source(family, 150), lab.addr("victim", family == 6)
            packet = frames.ip(family, src, socket.IPPROTO_TCP, w.tcp_syn(src, dst, 40000, 9000, 1),
                               "plain", 1)
            send(lab, [frames.frame(family, packet)] * FLOOD)
            s = wait_for(lambda: next((x for x in probe.read_sources()
                                       if x.address == canonical(src) and x.packets >= FLOOD), None), 3.0)
            assert (s.packets, s.syns, s.ports) == (FLOOD, FLOOD, 1)
            assert s.bytes == FLOOD * (14 + 4 * in_frame + len(packet))
        assert probe.unparsed() == dict.fromkeys(probe.unparsed(), 0)
    finally:
        probe.close()


ACK = 0x10


@pytest.mark.parametrize("family", [4, 6])
def test_segments_of_an_accepted_connection_are_solicited_under_every_wrapping(lab, hook, family):
    """A real connection from the attacker to a listener of the victim, then ACKs with its
    4-tuple, crafted (out of window: the victim's TCP drops them): under every wrapping
    the socket lookup finds the connection, as the counters see through the wrapping, and
    the ACKs are solicited, never counted to their source. Controls: the same ACK to a port
    no socket owns, or behind what the parser cannot follow, is unsolicited."""
    v6 = family == 6
    # A window longer than the test, so the source's counter never restarts in between.
    probe = open_at(lab, hook, drop_unparsable=False, window_ms=60_000)
    srv = listen(lab.victim, v6)
    with netns(lab.attacker):
        cli = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET)
    try:
        cli.connect((lab.addr("victim", v6), srv.getsockname()[1]))
        frames, src, dst = Frames(lab), lab.addr("attacker", v6), lab.addr("victim", v6)
        sport, dport = cli.getsockname()[1], srv.getsockname()[1]
        ack = lambda port: w.tcp_segment(src, dst, sport, port, 1, 1, ACK)
        wrapped = lambda name, tags=(), port=dport: [frames.frame(family, frames.ip(
            family, src, socket.IPPROTO_TCP, ack(port), name, n + 1), tags) for n in range(FLOOD)]
        cases = {(name, "untagged"): wrapped(name) for name in (w.V6_CHAINS if v6 else w.V4_WRAPPINGS)}
        for name in ("plain", "chain" if v6 else "options"):
            cases[(name, "qinq")] = wrapped(name, w.VLAN_TAGS["qinq"])
        controls = {"closed_port": wrapped("plain", port=dport ^ 1),
                    "truncated": [frames.frame(family, packet[:-8]) for packet in
                                  (frames.ip(family, src, socket.IPPROTO_TCP, ack(dport), "plain", 1),)] * FLOOD}
        if v6:
            controls["chain_too_long"] = [frames.frame(family, w.ipv6(
                src, dst, socket.IPPROTO_TCP, ack(dport), (w.DEST,) * (MAX_EXT_HEADERS + 1)))] * FLOOD

        def counted() -> tuple[int, int]:
            """(solicited packets, packets counted to the attacker's address) so far."""
            s = next((x for x in probe.read_sources() if x.address == canonical(src)), None)
            return probe.verdicts()["solicited"], s.packets if s else 0

        def outcome(batch: list[bytes]) -> tuple[int, int]:
            before = counted()
            send(lab, batch)
            delta = lambda: tuple(now - then for now, then in zip(counted(), before))
            try:
                wait_for(lambda: sum(delta()) >= FLOOD, 3.0)
            except TimeoutError:
                pass
            return delta()

        got = {case: outcome(batch) for case, batch in {**cases, **controls}.items()}
        assert got == {**dict.fromkeys(cases, (FLOOD, 0)), **dict.fromkeys(controls, (0, FLOOD))}
        assert probe.unparsed()["truncated"] == FLOOD
        assert probe.unparsed()["chain_too_long"] == (FLOOD if v6 else 0)
    finally:
        cli.close()
        srv.close()
        probe.close()
