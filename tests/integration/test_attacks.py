"""The traffic generators do what they claim, seen from the victim's kernel counters
(/proc/net/snmp, snmp6, netstat and `ss` inside the VICTIM namespace), over IPv4 and IPv6;
the probe sees a test-local nft drop rule in the victim cut it off."""
from __future__ import annotations

import ipaddress
import struct
import time

import pytest

from swarmlab import attacks
from swarmlab.attacks import floods, packets
from swarmlab.attacks.common import in_named_netns
from swarmlab.attacks.__main__ import main as cli_main
from swarmlab.lab import netns, sh, wait_for

PORT = 8080
FAMILIES = pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])


def counters(ns: str) -> dict[str, int]:
    """The victim's SNMP counters, as `Tcp.InSegs`, `TcpExt.SyncookiesSent`, `Udp6InDatagrams`."""
    out: dict[str, int] = {}
    for path in ("/proc/net/snmp", "/proc/net/netstat"):
        lines = sh("cat", path, ns=ns).stdout.splitlines()
        for names, values in zip(lines[::2], lines[1::2]):
            proto, *keys = names.split()
            out.update({f"{proto[:-1]}.{k}": int(v) for k, v in zip(keys, values.split()[1:])})
    for line in sh("cat", "/proc/net/snmp6", ns=ns).stdout.splitlines():
        key, value = line.split()
        out[key] = int(value)
    return out


def delta(before: dict[str, int], after: dict[str, int], *keys: str) -> int:
    return sum(after[k] - before[k] for k in keys)


@pytest.fixture
def server(lab):
    """`serve` on PORT in the victim namespace, stopped after the test."""
    proc = attacks.start_server(lab.victim, PORT, duration_s=30)
    yield proc
    if proc.poll() is None:
        attacks.stop(proc)


# --- no privileges needed ---------------------------------------------------------------

def _reference_checksum_ok(packet: bytes, v6: bool) -> bool:
    # Independent of the builder's incremental sums: the whole pseudo-header and segment
    # must sum to 0xffff (RFC 1071), and so must the IPv4 header.
    if v6:
        src, dst, seg = packet[8:24], packet[24:40], packet[40:]
        pseudo = src + dst + struct.pack("!IxxxB", len(seg), 6)
        return packets.checksum(pseudo + seg) == 0
    src, dst, seg = packet[12:16], packet[16:20], packet[20:]
    pseudo = src + dst + struct.pack("!xBH", 6, len(seg))
    return packets.checksum(pseudo + seg) == 0 and packets.checksum(packet[:20]) == 0


@FAMILIES
def test_syn_checksums_match_a_reference(v6):
    dst = "fd00:1::2" if v6 else "10.1.0.2"
    builder = packets.SynBuilder(dst, 443)
    for src in (["fd00:1::1", "fd00:ffff::abcd"] if v6 else ["10.1.0.1", "10.1.255.254"]):
        raw = packets.packed(src)
        for sport, seq in ((1024, 0), (65535, 0xFFFFFFFF), (40000, 0x12345678)):
            pkt = builder.syn(raw, packets.word_sum(raw), sport, seq)
            assert _reference_checksum_ok(pkt, v6)
            assert struct.unpack("!HH", pkt[-20:-16]) == (sport, 443)


def test_spoofed_sources_are_distinct_and_in_range():
    for target, cidr in (("10.7.0.2", "10.7.200.0/21"), ("fd00:7::2", "fd00:7:c8::/64")):
        assert floods.default_spoof_cidr(target) == cidr
        sources = floods.spoofed_sources(cidr, 2000, seed=3)
        assert len(set(sources)) == 2000
        assert all(a in ipaddress.ip_network(cidr) for a in sources)
    assert len(floods.spoofed_sources("10.0.0.0/29", 100, seed=1)) == 6


def test_command_maps_keywords_to_flags():
    cmd = attacks.command("ns1", "probe", target="10.1.0.2", duration_s=2, stop_after_failures=5,
                          bind=None)
    assert cmd[:4] == ["ip", "netns", "exec", "ns1"]
    assert cmd[5:] == ["-m", "swarmlab.attacks", "probe", "--json", "--target", "10.1.0.2",
                       "--duration-s", "2", "--stop-after-failures", "5"]
    with pytest.raises(ValueError):
        attacks.command("ns1", "ping_of_death")


@pytest.mark.parametrize("argv", [["udp_flood", "--target", "10.1.0.2", "--duration-s", "0"],
                                  ["udp_flood", "--target", "10.1.0.2", "--count", "-1"],
                                  ["syn_flood"]])
def test_unbounded_or_incomplete_runs_are_refused_before_sending(argv, capsys):
    assert cli_main(argv) == 2
    assert capsys.readouterr().err.startswith("swarmlab.attacks: ")


# --- in the lab -------------------------------------------------------------------------

@pytest.mark.privileged
def test_generators_only_run_in_named_namespaces(lab):
    assert not in_named_netns()
    with netns(lab.attacker):
        assert in_named_netns()


@pytest.mark.privileged
@FAMILIES
def test_syn_flood_sends_valid_syns(lab, server, v6):
    target = lab.addr("victim", v6=v6)
    before = counters(lab.victim)
    out = attacks.run(lab.attacker, "syn_flood", target=target, port=PORT, count=2000)
    after = counters(lab.victim)
    assert (out["sent"], out["errors"]) == (2000, 0)
    assert ipaddress.ip_address(out["source"]) == ipaddress.ip_address(lab.addr("attacker", v6=v6))
    assert out["first_packet_mono_ns"] < out["last_packet_mono_ns"] <= time.monotonic_ns()
    # Every SYN reached the listener and was answered with a SYN-ACK; none failed its checksum.
    assert delta(before, after, "Tcp.InSegs") >= 2000
    assert delta(before, after, "Tcp.OutSegs") >= 1900
    assert delta(before, after, "Tcp.InCsumErrors") == 0
    if v6:
        assert delta(before, after, "Ip6InReceives") >= 2000
    # The control: the victim does check, so one corrupted SYN is counted as bad.
    with netns(lab.attacker), packets.open_raw(packets.family_of(target)) as sock:
        src = packets.packed(lab.addr("attacker", v6=v6))
        good = packets.SynBuilder(target, PORT).syn(src, packets.word_sum(src), 5555, 1)
        sock.sendto(good[:-4] + b"\xde\xad" + good[-2:], (target, 0))
    assert wait_for(lambda: delta(before, counters(lab.victim), "Tcp.InCsumErrors") == 1, 2)


@pytest.mark.privileged
@FAMILIES
def test_distributed_syn_flood_comes_from_many_spoofed_sources(lab, server, v6):
    target = lab.addr("victim", v6=v6)
    out = attacks.run(lab.attacker, "distributed_syn_flood", target=target, port=PORT,
                      count=300, sources=300)
    assert (out["sent"], out["sources"], out["errors"]) == (300, 300, 0)
    cidr = ipaddress.ip_network(out["spoof_cidr"])
    # The spoofed peers never answer the SYN-ACKs, so each SYN leaves a half-open request.
    lines = sh("ss", "-Htn", "state", "syn-recv", ns=lab.victim).stdout.splitlines()
    peers = {_peer(line.split()[-1]) for line in lines}
    assert len(peers) >= 290 and all(p in cidr for p in peers)


def _peer(addr_port: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    # The dual-stack listener shows IPv4 peers as v4-mapped IPv6 ([::ffff:a.b.c.d]:port).
    addr = ipaddress.ip_address(addr_port.rsplit(":", 1)[0].strip("[]"))
    return getattr(addr, "ipv4_mapped", None) or addr


@pytest.mark.privileged
@FAMILIES
def test_udp_flood_reaches_the_victim(lab, v6):
    before = counters(lab.victim)
    out = attacks.run(lab.attacker, "udp_flood", target=lab.addr("victim", v6=v6), port=9999,
                      count=3000, size=100)
    after = counters(lab.victim)
    assert (out["sent"], out["errors"]) == (3000, 0)
    keys = ("Udp6InDatagrams", "Udp6NoPorts") if v6 else ("Udp.InDatagrams", "Udp.NoPorts")
    assert delta(before, after, *keys) >= 2850


@pytest.mark.privileged
@FAMILIES
@pytest.mark.parametrize("pattern, count", [("conn_flood", 1000), ("lb_burst", 300)])
def test_connection_patterns_complete_handshakes(lab, server, v6, pattern, count):
    before = counters(lab.victim)
    out = attacks.run(lab.attacker, pattern, target=lab.addr("victim", v6=v6), port=PORT, count=count)
    assert (out["sent"], out["open"], out["errors"]) == (count, count, 0)
    assert delta(before, counters(lab.victim), "Tcp.PassiveOpens") == count
    assert attacks.stop(server)["accepted"] == count


@pytest.mark.privileged
@FAMILIES
def test_port_scan_finds_the_open_port(lab, server, v6):
    before = counters(lab.victim)
    out = attacks.run(lab.attacker, "port_scan", target=lab.addr("victim", v6=v6), ports="8070-8089")
    after = counters(lab.victim)
    assert (out["sent"], out["open_ports"], out["refused"]) == (20, [PORT], 19)
    assert delta(before, after, "Tcp.OutRsts") >= 19
    assert delta(before, after, "Tcp.PassiveOpens") == 1


@pytest.mark.privileged
@FAMILIES
def test_benign_client_is_answered(lab, server, v6):
    out = attacks.run(lab.attacker, "benign", target=lab.addr("victim", v6=v6), port=PORT,
                      rate=20, duration_s=1)
    assert 18 <= out["successes"] <= 21 and out["failures"] == 0
    assert attacks.stop(server)["echoed_bytes"] == out["successes"] * len(b"hello\n")


@pytest.mark.privileged
@FAMILIES
def test_probe_reports_the_cut_off(lab, server, v6):
    before = counters(lab.victim)
    proc = attacks.start(lab.attacker, "probe", target=lab.addr("victim", v6=v6), port=PORT,
                         duration_s=10, stop_after_failures=10)
    wait_for(lambda: delta(before, counters(lab.victim), "Tcp.PassiveOpens") >= 10, 5)
    family = "ip6" if v6 else "ip"
    blocked_from_ns = time.monotonic_ns()
    sh("nft", "-f", "-", ns=lab.victim, input=(
        "add table inet t\n"
        "add chain inet t input { type filter hook input priority 0; }\n"
        f"add rule inet t input {family} saddr {lab.addr('attacker', v6=v6)} tcp dport {PORT} drop\n"))
    blocked_by_ns = time.monotonic_ns()
    out = attacks.result(proc, timeout_s=5)
    assert out["successes"] >= 10 and out["failures"] == 10
    assert out["last_success_mono_ns"] < out["cut_off_mono_ns"]
    # An attempt begun just before the rule may still have its SYN dropped, so allow one
    # attempt's slack (10 ms interval) before; after, the next attempt must fail.
    assert blocked_from_ns - 20_000_000 <= out["cut_off_mono_ns"] <= blocked_by_ns + 100_000_000


@FAMILIES
def test_udp_builder_checksums_match_a_reference(v6):
    dst, src = ("fd00:1::2", "fd00:1::9") if v6 else ("10.1.0.2", "10.1.1.9")
    pkt = packets.UdpBuilder(dst, 53, b"abc").datagram(packets.packed(src), 4242)
    ip_len = 40 if v6 else 20
    seg = pkt[ip_len:]
    pseudo = packets.packed(src) + packets.packed(dst) + struct.pack("!HH", 17, len(seg))
    assert packets.checksum(pseudo + seg) == 0 and struct.unpack("!HH", seg[:4]) == (4242, 53)
    assert v6 or packets.checksum(pkt[:20]) == 0


@pytest.mark.privileged
@FAMILIES
def test_spoofed_udp_flood_and_decoy_scan_carry_the_decoys_address(lab, v6):
    target, decoy = lab.addr("victim", v6=v6), lab.addr("attacker", v6=v6, link=7)
    cidr = f"{decoy}/{128 if v6 else 32}"
    before = counters(lab.victim)
    out = attacks.run(lab.attacker, "spoofed_udp_flood", target=target, port=9999, count=500,
                      spoof_cidr=cidr, sources=1)
    assert (out["sent"], out["errors"], out["sources"]) == (500, 0, 1)
    keys = ("Udp6InDatagrams", "Udp6NoPorts") if v6 else ("Udp.InDatagrams", "Udp.NoPorts")
    assert wait_for(lambda: delta(before, counters(lab.victim), *keys) >= 475, 2)
    out = attacks.run(lab.attacker, "decoy_scan", target=target, ports="7000-7099", count=100,
                      spoof_cidr=cidr, sources=1)
    assert (out["sent"], out["errors"]) == (100, 0)
    # Every SYN hit a closed port and drew a reset addressed to the decoy.
    assert wait_for(lambda: delta(before, counters(lab.victim), "Tcp.OutRsts") >= 95, 2)
