"""Which links the network probe watches, and what each got, kept in line with the
namespace as links come and go (a CNI's veth for a new container, a re-created interface).

LinkSet.sync() lists the links, chooses those to watch (every non-lo Ethernet link, or
those of probes.interfaces that exist; less each upper device all of whose lower links
are watched), attaches the ingress program (by ingress.attach's choice of hook) and the
egress program to each new one, and lets go of those that went (deleted, or now judged
below). The probe calls it at open and again when rtnetlink says a link changed
(LinkChanges below), at most every RESYNC_MIN_S: a root user creating and deleting links
in a loop costs the agent one re-listing per interval, however fast the loop.
"""
from __future__ import annotations

import errno
import socket
from dataclasses import dataclass, field
from typing import Callable

from agent.linktype import ARPHRD_ETHER, link_type
from agent.sources import ingress, libbpf, links

RESYNC_MIN_S = 0.5         # the least time between two re-listings of the links
RTMGRP_LINK = 1            # rtnetlink multicast group of RTM_NEWLINK / RTM_DELLINK
DRAIN_MAX = 64             # messages read per wake-up (the rest wake the loop again)


def choose(interfaces: list[str]) -> tuple[dict[int, str], list[str], str]:
    """ifindex -> name of the links to watch now, the listed ones that do not exist, and
    the status note on those left out. Reads the calling thread's namespace."""
    present = {n: i for i, n in socket.if_nameindex()}
    names = [n for n in interfaces if n in present] if interfaces else \
        [n for n in present if n != "lo"]
    missing = [n for n in interfaces if n not in present]
    # Every program reads an Ethernet header first. On an L3 device (tun: wireguard-go;
    # wireguard, ipip, gre) the frame starts at the IP header, which would be misread:
    # its address bytes taken for an EtherType, legitimate tunnel traffic dropped as
    # unparsable. Such devices are left unwatched, and the status says so.
    skipped = [n for n in names if link_type(n) not in (None, ARPHRD_ETHER)]
    unwatched = f"; not on {', '.join(skipped)} (no Ethernet header)" if skipped else ""
    # A frame through a bridge or bond port (or the link under a vlan) meets that
    # link's hook, then its upper device's: only the lowest watched link judges it, so
    # every packet is counted once (forwarded between ports or delivered to the
    # bridge's own address). An upper with an unwatched lower stays watched.
    names, uppers = links.without_uppers([n for n in names if n not in skipped])
    unwatched += "".join(f"; not on {u} (judged on {', '.join(low)} below it)"
                         for u, low in uppers.items())
    return {present[n]: n for n in names}, missing, unwatched


@dataclass
class Watched:
    """One watched link: its name, what its ingress program got (None: not loaded), our
    BPF links and clsact filters on it, and why the egress program is not on it ("")."""

    name: str
    got: ingress.Attached | None = None
    ours: list = field(default_factory=list)
    egress_error: str = ""


class LinkSet:
    """The watched links of one namespace (sync() must run in it) and their attachments.

    Every attachment it makes is also appended to `owned` (the probe's list of links, which
    it destroys at close), and removed from it when the link goes. An attach the kernel
    refuses degrades that link only; nothing here raises for one link's failure."""

    def __init__(self, interfaces: list[str], attach_mode: str, xdp: libbpf.Program | None,
                 tc: libbpf.Program | None, egress: libbpf.Program | None,
                 egress_link: Callable, owned: list):
        self.interfaces, self.attach_mode = list(interfaces), attach_mode
        self.xdp, self.tc, self.egress, self._egress_link = xdp, tc, egress, egress_link
        self.owned = owned
        self.links: dict[int, Watched] = {}
        self.missing: list[str] = []
        self.unwatched = ""
        self.syncs = 0

    def sync(self) -> bool:
        """Bring the attachments in line with the links now; True if anything changed."""
        self.syncs += 1
        want, self.missing, self.unwatched = choose(self.interfaces)
        changed = False
        for index in [i for i in self.links if i not in want]:
            self._drop(index)
            changed = True
        for index, name in want.items():
            if index in self.links:
                # Renamed: same device, same attachments. (An ifindex is not handed out
                # again soon: the kernel allocates them cyclically.)
                self.links[index].name = name
            else:
                self.links[index] = self._attach(index, name)
                changed = True
        return changed

    def _attach(self, index: int, name: str) -> Watched:
        w = Watched(name)
        if self.xdp is not None or self.tc is not None:
            link, w.got = ingress.attach(name, self.attach_mode, self.xdp, self.tc, index)
            if link is not None:
                w.ours.append(link)
        if self.egress is not None:
            try:
                w.ours.append(self._egress_link(self.egress, index))
            except OSError as e:
                w.egress_error = e.strerror or str(e)
        self.owned.extend(w.ours)
        return w

    def _drop(self, index: int) -> None:
        w = self.links.pop(index)
        for link in w.ours:
            # A deleted device took its BPF links and filters with it; destroy() then only
            # closes our fd (a clsact filter's detach fails quietly).
            link.destroy()
            if link in self.owned:
                self.owned.remove(link)

    def close(self) -> None:
        for index in list(self.links):
            self._drop(index)

    # --- what the status says ------------------------------------------------------------

    def results(self) -> list[ingress.Attached]:
        """What each watched link's ingress program got, then the listed links that are
        missing (as refused: the operator asked for them)."""
        return [w.got for w in self.links.values() if w.got is not None] + \
            [ingress.Attached(n, None, "no such link", False) for n in self.missing]

    def ingress_status(self, loaded: set) -> dict[str, tuple[str, str]]:
        """Hook mode group ("xdp" / "tc") -> (state, reason) for the ingress programs."""
        results = self.results()
        names = [r.link for r in results]
        failed = [r for r in results if r.mode is None]
        lost = "; ".join(f"not on {r.link}: {r.why}" for r in failed)
        out = {}
        for key, modes in (("xdp", (ingress.Mode.NATIVE, ingress.Mode.GENERIC)),
                           ("tc", (ingress.Mode.TC,))):
            if key not in loaded:
                continue
            mine = [r for r in results if r.mode in modes]
            parts = [ingress.summary(results, m) for m in modes]
            text = "; ".join([p for p in parts if p] + ([lost] if lost else [])) or \
                "on no link" + ("" if names else " (no interface to watch)")
            state = "failed" if names and len(failed) == len(names) else \
                "degraded" if failed or any(r.missed for r in mine) or not names else "loaded"
            out[key] = (state, text + self.unwatched)
        return out

    def egress_status(self, what: str) -> tuple[str, str]:
        errors = [f"{w.name}: {w.egress_error}" for w in self.links.values() if w.egress_error]
        errors += [f"{n}: no such link" for n in self.missing]
        total = len(self.links) + len(self.missing)
        if not total:
            return "degraded", "no interface to watch" + self.unwatched
        if errors:
            attached = total - len(errors)
            return ("degraded" if attached else "failed",
                    f"attached to {attached}/{total}: " + "; ".join(errors) + self.unwatched)
        return "loaded", f"{what} on {', '.join(w.name for w in self.links.values())}" + \
            self.unwatched


class LinkChanges:
    """An rtnetlink socket subscribed to link changes (RTM_NEWLINK, RTM_DELLINK) of the
    namespace it is opened in; its fd goes on the loop, drain() says whether anything came
    (a receive buffer overrun, ENOBUFS, counts as a change: events were lost)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK
                                  | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        try:
            self.sock.bind((0, RTMGRP_LINK))
        except OSError:
            self.sock.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self) -> bool:
        changed = False
        for _ in range(DRAIN_MAX):
            try:
                changed |= bool(self.sock.recv(1 << 16))
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                changed = True
        return changed

    def close(self) -> None:
        self.sock.close()

