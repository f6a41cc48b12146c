"""Where the network probe's ingress program runs (agent/sources/ingress.py), read back
from the kernel: each probes.attach_mode on a veth in a lab namespace is the hook the
kernel shows, "auto" gives a veth tc ingress and says why, a link that cannot take the
configured hook falls back to one it can and the status says so, each hook counts the
same unsolicited traffic and no solicited traffic, and nothing is left attached after
close() or after the process holding the probe is killed."""
from __future__ import annotations

import json
import re
import signal
import socket
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from agent.sources.abi import NetProg
from swarmlab.lab import Lab, netns, sh, wait_for
from tests.integration.test_net_probe import (PROBES, REPO, THRESHOLDS, UDP, attack,  # noqa: F401
                                              built, open_probe)
from tests.integration.test_net_wrappings import (FLOOD, MAX_EXT_HEADERS, Frames, _tcp_in_segs,
                                                  send, w)

pytestmark = pytest.mark.privileged
HOOKS = {"tc": "tc ingress", "native": "native XDP", "generic": "generic XDP"}
COUNT = 25   # datagrams per check (the counters are compared, not the alerts)
SOL_PACKET, PACKET_VNET_HDR = 263, 15


def xdp_on(ns: str, ifname: str) -> tuple[str | None, str | None]:
    """(driver | generic | None, program name) of the XDP program on `ifname`."""
    link = json.loads(sh("ip", "-j", "-d", "link", "show", ifname, ns=ns).stdout)[0]
    xdp = link.get("xdp", {})
    for att in xdp.get("attached", []) or [xdp]:
        if att.get("prog"):
            return {1: "driver", 2: "generic"}.get(att.get("mode")), att["prog"].get("name")
    return None, None


def tcx_links(ifindex: int, pid: str = "self", attach_type: int = 46) -> list[int]:
    """Program ids of the tcx links process `pid` holds on `ifindex` at ingress (46; the
    egress program's are 47)."""
    ids = []
    for fd in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            info = fd.read_text()
        except OSError:
            continue
        if "link_type:\ttcx" in info and f"ifindex:\t{ifindex}\n" in info and \
                f"attach_type:\t{attach_type} " in info:
            ids.append(int(re.search(r"prog_id:\t(\d+)", info).group(1)))
    return ids


def ifindex(ns: str, ifname: str) -> int:
    return json.loads(sh("ip", "-j", "link", "show", ifname, ns=ns).stdout)[0]["ifindex"]


def test_each_mode_is_the_hook_the_kernel_shows_and_is_gone_after_close(lab):
    v0 = ifindex(lab.victim, "v0")
    for mode, want in HOOKS.items():
        probe = open_probe(lab.victim, THRESHOLDS, replace(PROBES, attach_mode=mode))
        try:
            assert probe.attach_modes() == {"v0": want}
            xdp, tcx = xdp_on(lab.victim, "v0"), tcx_links(v0)
            if mode == "tc":
                assert xdp == (None, None) and len(tcx) == 1, (xdp, tcx)
            else:
                assert xdp == ({"native": "driver", "generic": "generic"}[mode],
                               NetProg.XDP.value) and tcx == [], (xdp, tcx)
            assert probe.status()[NetProg.XDP if mode != "tc" else NetProg.TC_INGRESS] == {
                "state": "loaded", "reason": f"{want} on v0 (probes.attach_mode)"}
        finally:
            probe.close()
        assert xdp_on(lab.victim, "v0") == (None, None) and tcx_links(v0) == []
        assert tcx_links(v0, attach_type=47) == []


def test_auto_gives_a_veth_tc_ingress_and_says_why(lab):
    probe = open_probe(lab.victim, THRESHOLDS)
    try:
        assert PROBES.attach_mode == "auto" and probe.attach_modes() == {"v0": "tc ingress"}
        status = probe.status()
        assert status[NetProg.TC_INGRESS]["state"] == "loaded"
        assert status[NetProg.TC_INGRESS]["reason"].startswith("tc ingress on v0 (veth: ")
        assert status[NetProg.XDP] == {"state": "loaded", "reason": "on no link"}
        assert xdp_on(lab.victim, "v0") == (None, None)
    finally:
        probe.close()


@pytest.fixture
def bridge(lab: Lab) -> str:
    """An Ethernet link whose driver has no native XDP (a bridge), up in the victim."""
    sh("ip", "link", "add", "b0", "type", "bridge", ns=lab.victim)
    sh("ip", "link", "set", "b0", "up", ns=lab.victim)
    return "b0"


def test_a_hook_the_link_cannot_take_is_reported_and_the_link_still_watched(lab, bridge):
    from agent.sources.net import NetProbe
    for mode, state in (("native", "degraded"), ("auto", "loaded")):
        with netns(lab.victim):
            probe = NetProbe(replace(PROBES, attach_mode=mode), ["v0", bridge], THRESHOLDS)
            probe.open()
        try:
            got = probe.attach_modes()
            assert got == {"v0": "tc ingress" if mode == "auto" else "native XDP",
                           bridge: "tc ingress"}, probe.status()
            tc = probe.status()[NetProg.TC_INGRESS]
            assert tc["state"] == state, tc
            refused = f"{bridge} (native XDP refused: Operation not supported"
            if mode == "native":
                refused = f"{bridge} (probes.attach_mode is native, which it refused: native " \
                          "XDP refused: Operation not supported"
            assert refused in tc["reason"], tc
        finally:
            probe.close()


def _counts(lab: Lab, mode: str) -> tuple:
    """What one hook makes of COUNT datagrams to a closed port (unsolicited) and a bulk
    TCP transfer on an accepted connection (solicited): the IPv4 sender's counters
    (packets, datagrams, SYNs, ports, bytes) and whether the solicited verdict grew."""
    probe = open_probe(lab.victim, THRESHOLDS, replace(PROBES, attach_mode=mode, window_ms=60_000))
    server = subprocess.Popen(["ip", "netns", "exec", lab.victim, sys.executable, "-c",
                               "import socket; s=socket.create_server(('', 7100)); c,_=s.accept()\n"
                               "while c.recv(1<<16): pass"])
    try:
        wait_for(lambda: ":7100" in sh("ss", "-Htln", ns=lab.victim).stdout, 5)
        attack(lab, UDP, lab.addr("victim"), 9, COUNT)
        before = probe.verdicts()["solicited"]
        sh("python3", "-c", "import socket,sys; c=socket.create_connection((sys.argv[1], 7100));"
           "c.sendall(bytes(8 << 20)); c.close()", lab.addr("victim"), ns=lab.attacker, timeout=20)
        server.wait(10)
        s = wait_for(lambda: next((s for s in probe.read_sources()
                                   if s.address == lab.addr("attacker") and s.syns), None), 3)
        return (s.packets, s.udp, s.syns, s.ports, s.bytes), probe.verdicts()["solicited"] > before
    finally:
        server.kill()
        server.wait()
        probe.close()


def test_every_hook_counts_the_same(lab):
    """COUNT datagrams and one SYN (the connection's own) are unsolicited, counted to the
    sender, byte for byte the same at every hook; the 8 MiB that follow on the accepted
    connection are solicited, counted to no one. (tc sees the transfer as GSO skbs, XDP
    as whatever its hook gets: only the solicited verdict is compared, not how many.)"""
    got = {mode: _counts(lab, mode) for mode in HOOKS}
    first = got["tc"]
    assert first[0][:4] == (COUNT + 1, COUNT, 1, 2) and first[1], got
    assert got == dict.fromkeys(HOOKS, first), got


KEEPER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from dataclasses import replace
from agent.config import Probes
from agent.sources.net import NetProbe
probe = NetProbe(Probes(map_entries=4096, attach_mode=sys.argv[2]), ["v0"], {"syns": 10})
probe.open()
print(probe.attach_modes()["v0"], flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("mode", list(HOOKS))
def test_a_killed_holder_leaves_nothing_attached(lab, mode):
    """Every hook is a BPF link (XDP in either mode, tcx): the kernel detaches it with the
    last fd, so an agent killed with SIGKILL (no close()) leaves neither a program nor a
    cost behind."""
    v0 = ifindex(lab.victim, "v0")
    proc = subprocess.Popen(["ip", "netns", "exec", lab.victim, sys.executable, "-c", KEEPER,
                             str(REPO), mode], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == HOOKS[mode]
        if mode != "tc":
            assert xdp_on(lab.victim, "v0")[0] == {"native": "driver", "generic": "generic"}[mode]
        else:
            assert len(tcx_links(v0, str(proc.pid))) == 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    wait_for(lambda: xdp_on(lab.victim, "v0") == (None, None), 3)
    # Nothing runs at ingress any more: a SYN flood behind a chain of extension headers
    # longer than the parser follows, which the program drops (probes.drop_unparsable),
    # now reaches the victim's TCP whole.
    frames, v6 = Frames(lab), lab.addr("victim", True)
    src = frames.source(6, 181)
    packet = w.ipv6(src, v6, 6, w.tcp_syn(src, v6, 40000, 9000, 1), (w.DEST,) * (MAX_EXT_HEADERS + 1))
    before = _tcp_in_segs(lab.victim)
    send(lab, [frames.frame(6, packet)] * FLOOD)
    wait_for(lambda: _tcp_in_segs(lab.victim) >= before + FLOOD, 3.0)


def _send_paged(lab: Lab, frames: list[bytes]) -> None:
    """Frames from a0 whose skb holds only the Ethernet header in its linear part, the rest
    in pages (a packet socket with a virtio-net header: hdr_len 14), as a NIC that splits
    headers, or a driver that builds paged skbs, may hand over."""
    with netns(lab.attacker):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        try:
            s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            s.bind(("a0", 0))
            for frame in frames:
                s.send(struct.pack("=BBHHHH", 0, 0, 14, 0, 0, 0) + frame)
        finally:
            s.close()


@pytest.mark.parametrize("mode", ["tc", "generic"])
def test_headers_in_the_skb_pages_parse_as_in_a_linear_frame(lab, mode):
    """tc sees only an skb's linear part; a header past it is pulled in and parsed, never
    taken for a truncated packet (which probes.drop_unparsable would drop): 30 SYNs whose
    IP and TCP headers sit in the skb's pages are counted to their source and reach the
    victim's TCP, as generic XDP (which copies the skb whole) sees them. Frames over a page
    are needed for a paged skb: both ends get MTU 9000 (native XDP on a veth refuses that)."""
    for ns, ifname in ((lab.attacker, "a0"), (lab.victim, "v0")):
        sh("ip", "link", "set", ifname, "mtu", "9000", ns=ns)
    probe = open_probe(lab.victim, THRESHOLDS, replace(PROBES, attach_mode=mode))
    try:
        assert probe.attach_modes() == {"v0": HOOKS[mode]}
        frames, dst = Frames(lab), lab.addr("victim")
        src = frames.source(4, 150)
        packet = frames.ip(4, src, socket.IPPROTO_TCP, w.tcp_syn(src, dst, 40000, 9000, 1) + bytes(5000),
                           "plain", 1)
        before = _tcp_in_segs(lab.victim)
        _send_paged(lab, [frames.frame(4, packet)] * FLOOD)
        s = wait_for(lambda: next((s for s in probe.read_sources()
                                   if s.address == src and s.packets >= FLOOD), None), 3)
        assert (s.packets, s.syns, s.bytes) == (FLOOD, FLOOD, FLOOD * (14 + len(packet)))
        assert probe.unparsed()["truncated"] == 0
        wait_for(lambda: _tcp_in_segs(lab.victim) >= before + FLOOD, 3)
    finally:
        probe.close()
