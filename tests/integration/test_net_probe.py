"""The network probe against the real kernel: net.bpf.o is loaded into the victim
namespace of a lab (attacker <-> victim over veth) and triggered with a few real packets
from the attacker. Assertions are on the decoded ring-buffer events."""
from __future__ import annotations

import asyncio
import ipaddress
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from agent.config import Probes
from swarmlab.lab import Lab, netns, sh, wait_for
from agent.sources import capability
from agent.sources.abi import NetProg
from agent.sources.net import NetProbe
from tests.conftest import skip_unsupported

pytestmark = pytest.mark.privileged
REPO = Path(__file__).resolve().parents[2]
PROBES = Probes(map_entries=4096, window_ms=2000)
# Per second; the probe scales them to the 2 s window (x2).
THRESHOLDS = {"syns": 10, "ports": 10, "udp": 10, "resets": 10, "conns": 3,
              "svc_udp": 10, "svc_sources": 0}  # 0: no minimum of distinct sources

SCAN = """
import socket, sys
fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
for port in range(int(sys.argv[2]), int(sys.argv[2]) + int(sys.argv[3])):
    s = socket.socket(fam, socket.SOCK_STREAM); s.setblocking(False)
    try: s.connect((sys.argv[1], port))
    except BlockingIOError: pass
    s.close()
"""
UDP = """
import socket, sys
fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
for _ in range(int(sys.argv[3])): s.sendto(b'x', (sys.argv[1], int(sys.argv[2])))
"""
CONNECT = """
import socket, sys
for _ in range(int(sys.argv[3])):
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
"""


@pytest.fixture(scope="module", autouse=True)
def built():
    """Builds the probe object (no-op when up to date) and checks the kernel can run it."""
    if shutil.which("clang") is None and not (REPO / "agent/probes/net.bpf.o").exists():
        skip_unsupported("no clang to build probes/net.bpf.o")
    subprocess.run(["make", "-s", "-C", str(REPO / "probes")], check=True, timeout=300)
    caps = capability.probe()
    for need in ("btf", "xdp", "tracepoint", "tracefs"):
        if not caps[need][0]:
            skip_unsupported(f"{need}: {caps[need][1]}")


def attack(lab: Lab, script: str, *args: object, ns: str | None = None) -> None:
    sh("python3", "-c", script, *map(str, args), ns=ns or lab.attacker, timeout=20)


def open_probe(ns: str, thresholds: dict[str, int] = THRESHOLDS,
               probes: Probes = PROBES) -> NetProbe:
    with netns(ns):
        probe = NetProbe(probes, [], thresholds)
        probe.open()
    states = {k: v["state"] for k, v in probe.status().items()}
    if states != dict.fromkeys(states, "loaded") or len(states) != len(NetProg):
        probe.close()
        skip_unsupported(f"network probe degraded here: {probe.status()}")
    return probe


def run_until(probe: NetProbe, trigger, done, timeout_s: float = 10.0) -> list:
    """Runs probe.run() on a loop, fires `trigger` in a thread, returns the events once
    done(events) holds or the timeout passes."""
    events: list = []

    async def main():
        task = asyncio.create_task(probe.run(events.append))
        await asyncio.to_thread(trigger)
        try:
            async with asyncio.timeout(timeout_s):
                while not done(events):
                    await asyncio.sleep(0.02)
        except TimeoutError:
            pass
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    return events


def canonical(addr: str) -> str:
    """The probe's text form (compressed IPv6); lab addresses keep a ':0:' group."""
    return str(ipaddress.ip_address(addr))


def find(events, kind, subject=None, **fields):
    return [e for e in events if e.kind == kind and subject in (None, e.subject)
            and all(e.fields.get(k) == v for k, v in fields.items())]


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_port_scan_raises_syns_ports_and_resets(lab, v6):
    probe = open_probe(lab.victim)
    try:
        att, vic = canonical(lab.addr("attacker", v6)), lab.addr("victim", v6)
        want = lambda ev: (find(ev, "net.source", att, reason="syns") and find(ev, "net.source", att, reason="ports")
                           and find(ev, "tcp.reset", att))
        events = run_until(probe, lambda: attack(lab, SCAN, vic, 3000, 40), want)
        assert want(events), [(e.kind, e.subject, dict(e.fields)) for e in events]
        syn = find(events, "net.source", att, reason="syns")[0]
        assert syn.source == "bpf.net" and syn.fields["family"] == (6 if v6 else 4)
        assert syn.fields["syns"] >= 20 and syn.fields["proto"] == "tcp"
        assert 3000 <= syn.fields["dport"] < 3040 and syn.fields["window_ns"] == 2_000_000_000
        assert syn.first_mono_ns <= syn.mono_ns <= syn.first_mono_ns + 2_000_000_000
        assert find(events, "net.source", att, reason="ports")[0].fields["ports"] >= 18
        assert find(events, "tcp.reset", att)[0].fields["resets"] >= 20
        assert len(find(events, "net.source", att, reason="syns")) == 1  # once per window
        sources = {s.address: s for s in probe.read_sources()}
        assert sources[att].syns >= 40 and sources[att].family == (6 if v6 else 4)
        assert probe.losses() == 0
    finally:
        probe.close()


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_udp_flood_raises_source_and_service(lab, v6):
    probe = open_probe(lab.victim)
    try:
        att, vic = canonical(lab.addr("attacker", v6)), lab.addr("victim", v6)
        want = lambda ev: find(ev, "net.source", att, reason="udp") and find(ev, "net.service", "udp/5353")
        events = run_until(probe, lambda: attack(lab, UDP, vic, 5353, 30), want)
        assert want(events), [(e.kind, e.subject, dict(e.fields)) for e in events]
        svc = find(events, "net.service", "udp/5353")[0]
        assert svc.fields["reason"] == "svc_udp" and svc.fields["udp"] >= 20
        assert svc.fields["sources"] == 1 and svc.fields["proto"] == "udp"
        assert find(events, "net.source", att, reason="udp")[0].fields["proto"] == "udp"
    finally:
        probe.close()


def listen(ns: str, v6: bool) -> socket.socket:
    with netns(ns):  # the socket belongs to the namespace it was created in
        srv = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET)
        srv.bind(("::" if v6 else "0.0.0.0", 0))
        srv.listen(64)
    return srv


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_passive_connections_raise_established(lab, v6):
    probe, srv = open_probe(lab.victim), listen(lab.victim, v6)
    try:
        att, port = canonical(lab.addr("attacker", v6)), srv.getsockname()[1]
        want = lambda ev: find(ev, "tcp.established", att)
        events = run_until(probe, lambda: attack(lab, CONNECT, lab.addr("victim", v6), port, 8), want)
        assert want(events), [(e.kind, e.subject, dict(e.fields)) for e in events]
        est = find(events, "tcp.established", att)[0]
        assert est.fields["conns"] >= 6 and est.fields["dport"] == port
    finally:
        srv.close()
        probe.close()


def test_probes_in_two_namespaces_see_only_their_own(lab):
    low = {"resets": 1, "conns": 1}
    with Lab() as other:
        mine, theirs = open_probe(lab.victim, low), open_probe(other.victim, low)
        srv = listen(lab.victim, False)
        try:
            vic = lab.addr("victim")

            def trigger():
                attack(lab, SCAN, vic, 4000, 3)
                attack(lab, CONNECT, vic, srv.getsockname()[1], 2)

            want = lambda ev: find(ev, "tcp.reset") and find(ev, "tcp.established")
            events = run_until(mine, trigger, want)
            assert want(events), [(e.kind, e.subject, dict(e.fields)) for e in events]
            assert {e.subject for e in events if e.kind.startswith("tcp.")} == {lab.addr("attacker")}
            assert [e for e in theirs.poll() if e.kind.startswith("tcp.")] == []
        finally:
            srv.close()
            mine.close()
            theirs.close()


FREEBIND_SCAN = """
import os, socket, sys
os.setgid(65534); os.setuid(65534)      # nobody: no privilege at all
for port in range(int(sys.argv[3]), int(sys.argv[3]) + int(sys.argv[4])):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM); s.setblocking(False)
    s.setsockopt(socket.IPPROTO_IPV6, 78, 1)     # IPV6_FREEBIND: any source address
    s.bind((sys.argv[1], 0))
    try: s.connect((sys.argv[2], port))
    except BlockingIOError: pass
    s.close()
"""


def test_a_local_users_syns_from_any_address_through_lo_are_not_verified(lab):
    """An unprivileged local user can send SYNs from any IPv6 address to the host's own
    address (IPV6_FREEBIND), through the loopback device as the SYN proxy's are: the
    resets they draw must not count as verified, or anyone on the host gets any address
    blocked (net.connect_scan)."""
    probe = open_probe(lab.victim)
    try:
        innocent, vic = canonical(lab.addr("attacker", True)), lab.addr("victim", True)
        events = run_until(probe, lambda: attack(lab, FREEBIND_SCAN, innocent, vic, 3000, 40,
                                                 ns=lab.victim),
                           lambda ev: find(ev, "tcp.reset", innocent), timeout_s=5)
        assert find(events, "tcp.reset", innocent), [(e.kind, e.subject) for e in events]
        time.sleep(0.3)
        events += probe.poll()
        assert not find(events, "tcp.verified_reset"), [(e.kind, e.subject) for e in events]
    finally:
        probe.close()


TUN_RECEIVER = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 7777)); s.settimeout(1.5)
print("ready", flush=True)
n = 0
try:
    while True: s.recv(100); n += 1
except OSError: pass
print(n, flush=True)
"""


def test_tunnel_traffic_on_an_l3_device_is_not_misread_or_dropped(lab):
    """A tun device (wireguard-go's; wireguard, ipip and gre are alike) has no Ethernet
    header: read as one, an inner source in 8.0.0.0/16 looks like EtherType IPv4 and
    the packet was dropped as unparsable. The probe leaves such devices unwatched."""
    import fcntl, os, struct
    from swarmlab.attacks.packets import UdpBuilder
    from swarmlab.lab import spawn_in
    with netns(lab.victim):
        fd = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", b"tun0", 0x0001 | 0x1000))  # IFF_TUN|IFF_NO_PI
    try:
        sh("ip", "addr", "add", "8.0.0.2/24", "dev", "tun0", ns=lab.victim)
        sh("ip", "link", "set", "tun0", "up", ns=lab.victim)
        probe = open_probe(lab.victim)
        try:
            assert "tun0" in str(probe.status()), probe.status()
            rx = spawn_in(lab.victim, "python3", "-c", TUN_RECEIVER)
            assert rx.stdout.readline().strip() == "ready"
            b = UdpBuilder("8.0.0.2", 7777, b"hello")
            for i in range(50):   # from the tunnel's far end, as the tunnel delivers them
                os.write(fd, b.datagram(socket.inet_aton("8.0.0.1"), 4000 + i))
            assert rx.stdout.readline().strip() == "50"
            rx.wait(timeout=5)
            assert not any(probe.unparsed().values()), probe.unparsed()
        finally:
            probe.close()
    finally:
        os.close(fd)


def test_unknown_threshold_is_rejected():
    with pytest.raises(ValueError):
        NetProbe(PROBES, [], {"synz": 1})


BULK = """
import socket, sys
fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
if len(sys.argv) > 4:   # every segment, the SYN included, behind a header: see wrap()
    level, opt, header = int(sys.argv[4]), int(sys.argv[5]), bytes.fromhex(sys.argv[6])
    s.setsockopt(level, opt, header)
    assert s.getsockopt(level, opt, 64) == header
s.settimeout(5)
s.connect((sys.argv[1], int(sys.argv[2])))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for _ in range(int(sys.argv[3])): s.sendall(b'x' * 1400)
s.close()
"""
# Answers the victim's datagram from the port it came to, then streams back from there;
# a second socket (another port, nothing sent to it) streams as a stranger.
EXCHANGE = """
import socket, sys
fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
peer = socket.socket(fam, socket.SOCK_DGRAM); peer.bind(('', int(sys.argv[2]))); peer.settimeout(5)
_, victim = peer.recvfrom(100)
for _ in range(int(sys.argv[3])): peer.sendto(b'y' * 200, victim)
"""


def wrap(v6: bool) -> tuple[int, int, bytes]:
    """(level, option, header bytes) that put a header on every packet a socket sends: the
    longest IPv4 options (NOPs), or an IPv6 destination-options header (PadN; the kernel
    fills in its next header). Real connections wrapped as an attacker or a tunnel might."""
    if v6:
        return socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, bytes([0, 0, 1, 4, 0, 0, 0, 0])
    return socket.IPPROTO_IP, socket.IP_OPTIONS, bytes([1] * 39 + [0])


def _drain(srv: socket.socket) -> None:
    conn, _ = srv.accept()
    with conn:
        while conn.recv(1 << 16):
            pass


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "wrapped"])
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_bulk_tcp_on_an_accepted_connection_is_not_counted(lab, v6, wrapped):
    """Wrapped: every segment carries IPv4 options or an IPv6 destination-options header;
    the socket lookup must see through them as the counters do."""
    # 100 packets/s is far below the 20k segments this sends within a few seconds.
    probe = open_probe(lab.victim, {**THRESHOLDS, "packets": 100})
    srv = listen(lab.victim, v6)
    try:
        att, port = canonical(lab.addr("attacker", v6)), srv.getsockname()[1]
        level, option, header = wrap(v6) if wrapped else (None, None, None)

        def trigger():
            import threading
            reader = threading.Thread(target=_drain, args=(srv,))
            reader.start()
            attack(lab, BULK, lab.addr("victim", v6), port, 20000,
                   *((level, option, header.hex()) if wrapped else ()))
            reader.join(10)

        events = run_until(probe, trigger, lambda ev: False, timeout_s=0.5)
        assert find(events, "net.source", att) == [], [(e.kind, dict(e.fields)) for e in events]
        v = probe.verdicts()
        # Some segments coalesce on the way (GRO); the few unsolicited are the SYN and the FIN.
        assert v["solicited"] >= 5000 and v["unsolicited"] < 20, v
    finally:
        srv.close()
        probe.close()


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "wrapped"])
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_udp_from_a_peer_the_host_sends_to_is_not_counted(lab, v6, wrapped):
    """Wrapped: what the host sends carries IPv4 options or an IPv6 destination-options
    header, which the egress program must see through to record the exchange."""
    probe = open_probe(lab.victim)
    try:
        att, vic = canonical(lab.addr("attacker", v6)), lab.addr("victim", v6)
        with netns(lab.victim):   # an unconnected socket, as wireguard-go uses
            mine = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
            mine.bind(("::" if v6 else "0.0.0.0", 0))
        if wrapped:
            mine.setsockopt(*wrap(v6))
        port = mine.getsockname()[1]
        mine.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)

        def trigger():
            import threading
            peer = threading.Thread(target=attack, args=(lab, EXCHANGE, vic, 7777, 3000))
            peer.start()
            wait_for(lambda: sh("ss", "-Huan", "sport", "=", ":7777", ns=lab.attacker).stdout, 5)
            mine.sendto(b"hello", (lab.addr("attacker", v6), 7777))
            peer.join(10)

        events = run_until(probe, trigger, lambda ev: False, timeout_s=0.5)
        assert find(events, "net.source", att) == [], [(e.kind, dict(e.fields)) for e in events]
        assert probe.verdicts()["solicited"] >= 3000
        # The control: the same datagrams from a port the host never sent to are counted.
        events = run_until(probe, lambda: attack(lab, UDP, vic, port, 30),
                           lambda ev: find(ev, "net.source", att, reason="udp"))
        assert find(events, "net.source", att, reason="udp")
        mine.close()
    finally:
        probe.close()


def test_forwarded_bulk_tcp_is_not_counted(lab):
    """A flow the host forwards (to a container or another namespace behind it) has no
    local socket: its segments are solicited through the egress table of established
    flows. The victim routes between the attacker (v0) and an inner namespace (v1)."""
    inner = lab.add_attacker(1)
    sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=lab.victim)
    probe = open_probe(lab.victim, {**THRESHOLDS, "packets": 100})
    srv = listen(inner, False)
    try:
        att, port = lab.addr("attacker"), srv.getsockname()[1]

        def trigger():
            import threading
            reader = threading.Thread(target=_drain, args=(srv,))
            reader.start()
            attack(lab, BULK, lab.addr("attacker", link=1), port, 20000)
            reader.join(10)

        events = run_until(probe, trigger, lambda ev: False, timeout_s=0.5)
        assert [e for e in events if e.kind == "net.source"] == [], \
            [(e.kind, e.subject, dict(e.fields)) for e in events]
        v = probe.verdicts()
        assert v["solicited"] >= 5000 and v["unsolicited"] < 20, v
        assert att in {s.address for s in probe.read_sources()}    # its SYN was counted
    finally:
        srv.close()
        probe.close()
