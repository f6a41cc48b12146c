"""The link layer of a network interface, read with SIOCGIFHWADDR in the calling thread's
network namespace (the network probe and the egress policy's uplink hook both need it)."""
from __future__ import annotations

import fcntl
import socket
import struct

ARPHRD_ETHER = 1
SIOCGIFHWADDR = 0x8927


def link_type(name: str) -> int | None:
    """The ARPHRD_* type of interface `name` (None if it cannot be read)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            ifr = fcntl.ioctl(s.fileno(), SIOCGIFHWADDR, struct.pack("16s16x", name.encode()[:15]))
    except OSError:
        return None
    return struct.unpack_from("H", ifr, 16)[0]


def ethernet_links(interfaces: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The Ethernet links of the namespace now: those of `interfaces` that exist, or
    every one but lo when it is empty (an L3 device, tun or wireguard, is none)."""
    present = [n for _, n in socket.if_nameindex()]
    names = [n for n in interfaces if n in present] if interfaces else \
        [n for n in present if n != "lo"]
    return [n for n in names if link_type(n) in (None, ARPHRD_ETHER)]
