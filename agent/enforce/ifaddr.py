"""This network namespace's own addresses, read over rtnetlink (RTM_GETADDR dump).

The socket is opened at construction, so it keeps answering for the namespace it was
opened in even when later calls come from a thread elsewhere.
"""
from __future__ import annotations

import ipaddress
import socket
import struct

RTM_NEWADDR, RTM_GETADDR = 20, 22
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IFA_ADDRESS, IFA_LOCAL = 1, 2
_NLMSGHDR = struct.Struct("=IHHII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTATTR = struct.Struct("=HH")


class AddressReader:
    """Lists the namespace's addresses; close() when done."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self._sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def addresses(self) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        return [i.ip for i in self.interfaces()]

    def interfaces(self) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
        """Each address with its prefix length (10.0.0.1/24): the on-link networks."""
        self._seq += 1
        body = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        self._sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETADDR,
                                       NLM_F_REQUEST | NLM_F_DUMP, self._seq, 0) + body)
        found: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = []
        while True:
            data = self._sock.recv(65536)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _, seq, _ = _NLMSGHDR.unpack_from(data, offset)
                if kind == NLMSG_DONE and seq == self._seq:
                    return found
                if kind == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, offset + _NLMSGHDR.size)
                    if err:
                        raise OSError(-err, "RTM_GETADDR failed")
                elif kind == RTM_NEWADDR and seq == self._seq:
                    found.extend(_parse_addr(data[offset + _NLMSGHDR.size:offset + length]))
                offset += (length + 3) & ~3
                if length == 0:
                    break


def _parse_addr(msg: bytes) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    family, prefixlen = msg[0], msg[1]
    attrs: dict[int, bytes] = {}
    offset = _IFADDRMSG.size
    while offset + _RTATTR.size <= len(msg):
        length, kind = _RTATTR.unpack_from(msg, offset)
        if length < _RTATTR.size:
            break
        attrs[kind] = msg[offset + _RTATTR.size:offset + length]
        offset += (length + 3) & ~3
    # On point-to-point links IFA_ADDRESS is the peer; IFA_LOCAL is ours when present.
    raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
    if raw is None or family not in (socket.AF_INET, socket.AF_INET6):
        return []
    return [ipaddress.ip_interface((ipaddress.ip_address(raw), prefixlen))]
