"""Where the network probe's ingress program runs on each link, and why.

The same verdicts (probes/net.bpf.c, judge()) run at one of three hooks:

- native XDP: in the driver, before the kernel builds an skb; the cheapest hook on a NIC
  whose driver has XDP, and the only one that sees every wire packet of a flood before
  the stack pays for it;
- tc ingress (a tcx link from Linux 6.6, a clsact filter before): on the skb as the stack
  has it, after GRO, at the cost of one program run per skb;
- generic XDP: also on the skb, but an skb that is paged, cloned or short of headroom is
  first copied into one linear buffer, which a bulk TCP stream pays on every skb
  (bench/traffic_tax.py): the last resort.

`probes.attach_mode` "auto" tries, per link, the hook its driver makes cheapest, then the
others in order; "native", "tc" or "generic" tries that one first and, where the link
cannot take it, falls back as "auto" would so the link stays watched, and the status says
that the configured mode was refused and why.
"""
from __future__ import annotations

import ctypes
import enum
import fcntl
import os
import socket
import struct
from dataclasses import dataclass

from agent.sources import libbpf

class Mode(enum.StrEnum):
    NATIVE = "native XDP"
    TC = "tc ingress"
    GENERIC = "generic XDP"


CONFIGURED = {"native": Mode.NATIVE, "tc": Mode.TC, "generic": Mode.GENERIC}

# Drivers whose native XDP costs more than tc ingress for what crosses them. veth's native
# XDP runs on a copy of every skb the peer sends (page-pool pages: a local TCP sender's
# skbs are cloned), and a program without multi-buffer support turns off GSO on the peer,
# so a bulk stream is cut into MTU-sized packets before it is copied (bench/RESULTS.md,
# "traffic tax"). Its native XDP needs nothing of the peer to receive: an XDP program or
# GRO on the peer only matters for frames redirected into a veth, which this probe never
# does.
TC_CHEAPER = {"veth": "veth: native XDP copies every packet and turns off the peer's GSO"}

SIOCETHTOOL = 0x8946
ETHTOOL_GDRVINFO = 3


def driver(name: str) -> str | None:
    """The driver of interface `name` in the calling thread's network namespace (ethtool's
    "driver" field), or None where it cannot be read."""
    info = ctypes.create_string_buffer(struct.pack("I", ETHTOOL_GDRVINFO), 196)
    ifr = bytearray(struct.pack("16sP16x", name.encode()[:15], ctypes.addressof(info)))  # ifreq
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifr)
    except OSError:
        return None
    return info.raw[4:36].split(b"\0", 1)[0].decode(errors="replace") or None


def order(configured: str, drv: str | None) -> list[Mode]:
    """The hooks to try on a link of driver `drv`, best first."""
    auto = [Mode.TC, Mode.NATIVE, Mode.GENERIC] if drv in TC_CHEAPER else \
        [Mode.NATIVE, Mode.TC, Mode.GENERIC]
    first = CONFIGURED.get(configured)
    return auto if first is None else [first] + [m for m in auto if m != first]


@dataclass(frozen=True)
class Attached:
    """What one link got: the hook (None: none would take it), why, and whether that is
    not what probes.attach_mode asked for."""

    link: str
    mode: Mode | None
    why: str
    missed: bool = False

    def text(self) -> str:
        return f"{self.link} ({self.why})" if self.why else self.link


def _attach_one(mode: Mode, xdp: libbpf.Program, tc: libbpf.Program, ifindex: int):
    if mode is Mode.NATIVE:
        return libbpf.native_xdp(xdp, ifindex)
    if mode is Mode.GENERIC:
        return libbpf.generic_xdp(xdp, ifindex)
    try:
        return libbpf.tcx_ingress(tc, ifindex)
    except OSError as e:
        if e.errno not in NO_TCX:
            raise
    return libbpf.TcLink(tc, ifindex, ingress=True)  # before Linux 6.6: a clsact filter


NO_TCX = {22, 95, 524}  # EINVAL, EOPNOTSUPP, ENOTSUPP: no tcx links in this kernel


def attach(name: str, configured: str, xdp: libbpf.Program | None,
           tc: libbpf.Program | None, ifindex: int | None = None
           ) -> tuple[object | None, Attached]:
    """Attach the ingress program to link `name` by the first hook it takes; returns the
    link (None when every hook refused) and what it got. Raises nothing for a refusal.
    A program that is None (the kernel refused to load it) is not tried."""
    drv = driver(name)
    try:
        ifindex = ifindex or socket.if_nametoindex(name)
    except OSError as e:          # gone since it was listed
        return None, Attached(name, None, os.strerror(e.errno) if e.errno else str(e))
    modes = [m for m in order(configured, drv) if (tc if m is Mode.TC else xdp) is not None]
    refused: list[str] = []
    for mode in modes:
        try:
            link = _attach_one(mode, xdp, tc, ifindex)
        except OSError as e:
            refused.append(f"{mode} refused: {os.strerror(e.errno) if e.errno else e}")
            continue
        wanted = CONFIGURED.get(configured)
        if wanted is not None:
            missed = mode != wanted
            why = f"probes.attach_mode is {configured}, which it refused: " \
                f"{'; '.join(refused)}" if missed else "probes.attach_mode"
            return link, Attached(name, mode, why, missed)
        why = TC_CHEAPER[drv] if mode is Mode.TC and drv in TC_CHEAPER and not refused \
            else f"driver {drv}" if mode is Mode.NATIVE and drv else ""
        return link, Attached(name, mode, "; ".join(refused + ([why] if why else [])))
    return None, Attached(name, None, "; ".join(refused), CONFIGURED.get(configured) is not None)


def summary(results: list[Attached], mode: Mode) -> str:
    """"native XDP on eth0 (driver ixgbe), eth1" for the links that got `mode`."""
    on = [r.text() for r in results if r.mode is mode]
    return f"{mode} on {', '.join(on)}" if on else ""
