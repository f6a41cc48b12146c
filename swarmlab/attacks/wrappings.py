"""The same TCP SYN or UDP datagram under different wrappings, as whole Ethernet frames.

An attacker who knows the detector parses plain headers wraps a flood in what the stack
accepts but a naive parser stops at: IPv6 extension headers (hop-by-hop, destination
options, routing, fragment, AH, or a chain of them), IPv4 options, a first fragment,
802.1Q and 802.1ad (QinQ) VLAN tags. Every wrapping here carries the same segment, so a
parser that judges packets by what they carry gives every one the same verdict.

Frames are sent from an AF_PACKET socket (FrameSender), which puts the VLAN tags in the
frame itself, as a switch trunk would deliver them. Built with struct, like packets.py.
"""
from __future__ import annotations

import socket
import struct

from swarmlab.attacks.packets import fold, packed, word_sum

ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
TPID_8021Q, TPID_8021AD = 0x8100, 0x88A8
HOP, ROUTING, FRAGMENT, AUTH, DEST = 0, 43, 44, 51, 60
TTL = 64

# name -> IPv6 extension headers in wire order (RFC 8200's recommended order for "chain")
V6_CHAINS = {
    "plain": (),
    "hop-by-hop": (HOP,),
    "dest-opts": (DEST,),
    "routing": (ROUTING,),
    "fragment": (FRAGMENT,),
    "auth": (AUTH,),
    "chain": (HOP, DEST, ROUTING, FRAGMENT, AUTH, DEST),
}
V4_WRAPPINGS = ("plain", "options", "fragment", "auth")
# name -> VLAN tags (outer first), applied around any of the above
VLAN_TAGS = {"untagged": (), "vlan": ((TPID_8021Q, 10),),
             "qinq": ((TPID_8021AD, 100), (TPID_8021Q, 10))}


def _l4_checksum(src: bytes, dst: bytes, proto: int, segment: bytes) -> int:
    return fold(word_sum(src) + word_sum(dst) + proto + len(segment) + word_sum(segment))


def tcp_syn(src: str, dst: str, sport: int, dport: int, seq: int) -> bytes:
    """A 20-byte TCP SYN with its checksum (pseudo-header of src/dst)."""
    return tcp_segment(src, dst, sport, dport, seq, 0, 0x02)


def tcp_segment(src: str, dst: str, sport: int, dport: int, seq: int, ack: int, flags: int) -> bytes:
    """A 20-byte TCP segment with `flags` (0x10 ACK, 0x02 SYN, ...) and its checksum."""
    seg = struct.pack("!HHIIHHHH", sport, dport, seq, ack, (5 << 12) | flags, 64240, 0, 0)
    csum = _l4_checksum(packed(src), packed(dst), socket.IPPROTO_TCP, seg)
    return seg[:16] + struct.pack("!H", csum) + seg[18:]


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes = b"x") -> bytes:
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    csum = _l4_checksum(packed(src), packed(dst), socket.IPPROTO_UDP, seg) or 0xFFFF
    return seg[:6] + struct.pack("!H", csum) + seg[8:]


def _auth(next_header: int) -> bytes:
    """An AH with a 12-byte ICV: 24 bytes, its length field in 4-byte words less 2."""
    return struct.pack("!BBHII", next_header, 24 // 4 - 2, 0, 0x100, 1) + bytes(12)


def _pad8(payload: bytes) -> bytes:
    """A fragment that is not the last carries a multiple of 8 bytes."""
    return payload + bytes(-len(payload) % 8)


def ipv4(src: str, dst: str, proto: int, payload: bytes, wrapping: str = "plain",
         ident: int = 1) -> bytes:
    """IPv4 around `payload`: "plain", "options" (the longest header: 40 bytes of
    options), "fragment" (the first fragment of a larger datagram), "auth" (AH)."""
    options, frag = b"", 0
    if wrapping == "options":
        options = bytes([1] * 39 + [0])              # NOPs, end of list
    elif wrapping == "fragment":
        frag, payload = 0x2000, _pad8(payload)       # more fragments, offset 0
    elif wrapping == "auth":
        payload, proto = _auth(proto) + payload, AUTH
    elif wrapping != "plain":
        raise ValueError(f"unknown IPv4 wrapping {wrapping!r}")
    ihl = 5 + len(options) // 4
    header = struct.pack("!BBHHHBBH4s4s", (4 << 4) | ihl, 0, ihl * 4 + len(payload), ident,
                         frag, TTL, proto, 0, packed(src), packed(dst)) + options
    return header[:10] + struct.pack("!H", fold(word_sum(header))) + header[12:] + payload


def ipv6(src: str, dst: str, proto: int, payload: bytes, chain: tuple[int, ...] = (),
         ident: int = 1) -> bytes:
    """IPv6 around `payload` behind the extension headers `chain` (wire order)."""
    nxt = proto
    if FRAGMENT in chain:
        payload = _pad8(payload)
    for kind in reversed(chain):
        if kind in (HOP, DEST):
            ext = struct.pack("!BB", nxt, 0) + bytes([1, 4, 0, 0, 0, 0])   # PadN
        elif kind == ROUTING:   # unknown type, no segments left: the stack skips it
            ext = struct.pack("!BBBB", nxt, 0, 253, 0) + bytes(4)
        elif kind == FRAGMENT:  # first fragment of a larger datagram
            ext = struct.pack("!BBHI", nxt, 0, 0x0001, ident)
        elif kind == AUTH:
            ext = _auth(nxt)
        else:
            raise ValueError(f"unknown extension header {kind}")
        payload, nxt = ext + payload, kind
    return struct.pack("!IHBB", 6 << 28, len(payload), nxt, TTL) + packed(src) + packed(dst) + payload


def ethernet(dst_mac: bytes, src_mac: bytes, ethertype: int, payload: bytes,
             tags: tuple[tuple[int, int], ...] = ()) -> bytes:
    """An Ethernet frame with `tags` ((TPID, VLAN id), outer first) in the frame."""
    head = dst_mac + src_mac
    for tpid, vid in tags:
        head += struct.pack("!HH", tpid, vid)
    return head + struct.pack("!H", ethertype) + payload


def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


class FrameSender:
    """Sends whole frames on one interface of the calling thread's network namespace."""

    def __init__(self, ifname: str):
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        self.sock.bind((ifname, 0))

    def send(self, frames: list[bytes]) -> None:
        for frame in frames:
            self.sock.send(frame)

    def close(self) -> None:
        self.sock.close()
