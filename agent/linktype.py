"""The links of the calling thread's network namespace: their link layer (SIOCGIFHWADDR)
and what rtnetlink says of them (RTM_GETLINK: kind, master, lower link, MAC). The network
probe and the egress policy's uplink hook both need it."""
from __future__ import annotations

import fcntl
import socket
import struct
from dataclasses import dataclass

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


def uplinks(interfaces: list[str] | tuple[str, ...], workload_patterns: tuple[str, ...]
            ) -> list[tuple[str, str]]:
    """(name, MAC) of the links frames leave the host by: those of `interfaces` that
    exist, or every Ethernet link but lo, less the bridge, bond and team ports (their
    master is the link) and the links named by `workload_patterns` (the workloads' own
    side: docker0, cali*, lxc*...: never an uplink). A container's host-side veth is a
    bridge port or such a link, so a busy container host does not hook hundreds."""
    import fnmatch

    infos = dump()
    wanted = set(interfaces)
    out = []
    for i in infos:
        if i.name == "lo" or (wanted and i.name not in wanted):
            continue
        if not wanted and (i.master or any(fnmatch.fnmatchcase(i.name, p)
                                          for p in workload_patterns)):
            continue
        if link_type(i.name) not in (None, ARPHRD_ETHER):
            continue
        out.append((i.name, i.mac))
    return out


RTM_NEWLINK, RTM_GETLINK = 16, 18
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IFLA_ADDRESS, IFLA_IFNAME, IFLA_LINK, IFLA_MASTER, IFLA_LINKINFO, IFLA_LINK_NETNSID = \
    1, 3, 5, 10, 18, 37
IFLA_INFO_KIND = 1
# Devices whose IFLA_LINK is the link they receive through (their frames are that link's
# first). A veth's IFLA_LINK is its peer, a tunnel's its underlay: neither is stacked so.
STACKED_KINDS = {"vlan", "macvlan", "macvtap", "ipvlan", "ipvtap"}
_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_RTATTR = struct.Struct("=HH")


@dataclass(frozen=True)
class LinkInfo:
    index: int
    name: str
    kind: str          # IFLA_INFO_KIND ("bridge", "vlan", "veth"...), "" when none
    lower: int         # the ifindex it receives through (vlan, macvlan...), 0 when none
    master: int        # its bridge, bond or team, 0 when none
    mac: str = ""      # IFLA_ADDRESS ("aa:bb:cc:dd:ee:ff"), "" when none


def _attrs(buf: bytes, offset: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while offset + _RTATTR.size <= len(buf):
        length, kind = _RTATTR.unpack_from(buf, offset)
        if length < _RTATTR.size:
            break
        out[kind & 0x3FFF] = buf[offset + _RTATTR.size:offset + length]   # no NLA_F_NESTED
        offset += (length + 3) & ~3
    return out


def _parse(msg: bytes) -> LinkInfo:
    _, _, index, _, _ = _IFINFOMSG.unpack_from(msg)
    a = _attrs(msg, _IFINFOMSG.size)
    kind = _attrs(a.get(IFLA_LINKINFO, b""), 0).get(IFLA_INFO_KIND, b"").rstrip(b"\0").decode()
    lower = struct.unpack("=i", a[IFLA_LINK])[0] if IFLA_LINK in a else 0
    if kind not in STACKED_KINDS or IFLA_LINK_NETNSID in a:
        lower = 0   # not stacked, or stacked on a link of another namespace
    mac = a.get(IFLA_ADDRESS, b"")
    return LinkInfo(index, a.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(errors="replace"), kind,
                    lower, struct.unpack("=I", a[IFLA_MASTER])[0] if IFLA_MASTER in a else 0,
                    ":".join(f"{b:02x}" for b in mac) if len(mac) == 6 else "")


def dump() -> list[LinkInfo]:
    """Every link of the calling thread's network namespace."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as s:
        s.bind((0, 0))
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        s.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP,
                              1, 0) + body)
        found: list[LinkInfo] = []
        while True:
            data, offset = s.recv(1 << 16), 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, offset)
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, offset + _NLMSGHDR.size)
                    if err:
                        raise OSError(-err, "RTM_GETLINK failed")
                elif kind == RTM_NEWLINK:
                    found.append(_parse(data[offset + _NLMSGHDR.size:offset + length]))
                if length == 0:
                    break
                offset += (length + 3) & ~3
