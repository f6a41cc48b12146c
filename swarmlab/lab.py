"""Throw-away network namespaces for the demo, the tests and the benchmarks.

A Lab builds an attacker and a victim namespace joined by a veth pair, with IPv4 and IPv6
addresses, and removes everything it made on close (also on error). Nothing here touches
the root namespace's firewall or addresses: the veth pair is created inside the namespaces.
"""
from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def netns(name: str) -> Iterator[None]:
    """Run the calling thread inside network namespace `name`, then return to where it was.

    Only sockets opened inside the block belong to the namespace; create netlink/nft
    contexts inside it."""
    with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{name}") as target:
        _setns(target.fileno())
        try:
            yield
        finally:
            _setns(home.fileno())


def sh(*args: str, check: bool = True, ns: str | None = None, timeout: float = 30,
       input: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout, input=input)


def spawn_in(ns: str, *argv: str, cgroup: Path | str | None = None) -> subprocess.Popen[str]:
    """Start `argv` in namespace `ns`; with `cgroup` (a cgroup v2 directory) it is a member
    from its first instruction, so every socket it opens belongs to that cgroup."""
    pre = f'echo $$ > "{cgroup}/cgroup.procs" && ' if cgroup else ""
    return subprocess.Popen(["sh", "-c", pre + 'exec ip netns exec "$0" "$@"', ns, *argv],
                            stdout=subprocess.PIPE, text=True)


@contextlib.contextmanager
def serving(ns: str, *argv: str, cgroup: Path | str | None = None) -> Iterator[subprocess.Popen[str]]:
    """A server started with spawn_in that prints "ready" once it listens; killed after."""
    proc = spawn_in(ns, *argv, cgroup=cgroup)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=5)


def wait_for(predicate: Callable[[], object], timeout_s: float, interval_s: float = 0.02) -> object:
    """Poll `predicate` until it returns something truthy; raise TimeoutError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)


@dataclass
class Lab:
    """Two namespaces, `attacker` and `victim`, joined by veth `a0` <-> `v0`.

    attacker: 10.<n>.0.1/24 and fd00:<n>::1/64; victim: 10.<n>.0.2/24 and fd00:<n>::2/64.
    `extra_attackers` adds more namespaces on a bridge-free path: each gets its own veth
    pair to the victim (`v1`, `v2`, ...) with its own /24.
    """

    # SWARM_LAB_TAG_PREFIX marks a run's labs (tests check that exactly those are gone)
    tag: str = field(default_factory=lambda: os.environ.get("SWARM_LAB_TAG_PREFIX", "")
                     + secrets.token_hex(3))
    subnet: int = field(default_factory=lambda: 100 + secrets.randbelow(150))
    namespaces: list[str] = field(default_factory=list)

    @property
    def attacker(self) -> str:
        return f"swa-att-{self.tag}"

    @property
    def victim(self) -> str:
        return f"swa-vic-{self.tag}"

    def addr(self, side: str, v6: bool = False, link: int = 0) -> str:
        host = 1 if side == "attacker" else 2
        if v6:
            return str(ipaddress.ip_address(f"fd00:{self.subnet:x}:{link}::{host}"))
        return f"10.{self.subnet}.{link}.{host}"

    def __enter__(self) -> "Lab":
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(self) -> None:
        for ns in (self.attacker, self.victim):
            sh("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            self._prepare(ns)
        self._link(self.attacker, "a0", "v0", 0)
        # Replies to spoofed sources leave towards the attacker, as they would on the internet.
        sh("ip", "route", "add", "default", "via", self.addr("attacker"), ns=self.victim)
        sh("ip", "-6", "route", "add", "default", "via", self.addr("attacker", True), ns=self.victim)

    def add_attacker(self, index: int) -> str:
        """Another attacker namespace on its own link (victim side `v<index>`)."""
        ns = f"swa-at{index}-{self.tag}"
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        self._prepare(ns)
        self._link(ns, "a0", f"v{index}", index)
        return ns

    @staticmethod
    def _prepare(ns: str) -> None:
        sh("ip", "link", "set", "lo", "up", ns=ns)
        # No duplicate address detection: addresses (link-local ones too) are usable at
        # once, so spoofed IPv6 traffic does not wait ~2 s for neighbour discovery.
        for scope in ("all", "default"):
            sh("sysctl", "-qw", f"net.ipv6.conf.{scope}.accept_dad=0", ns=ns)

    def _link(self, ns: str, a_if: str, v_if: str, link: int) -> None:
        # Create the pair inside the attacker namespace so the root namespace never
        # holds it, then move one end to the victim.
        sh("ip", "link", "add", a_if, "type", "veth", "peer", "name", v_if, ns=ns)
        sh("ip", "link", "set", v_if, "netns", self.victim, ns=ns)
        for side, n, ifname in (("attacker", ns, a_if), ("victim", self.victim, v_if)):
            sh("ip", "addr", "add", f"{self.addr(side, link=link)}/24", "dev", ifname, ns=n)
            sh("ip", "-6", "addr", "add", f"{self.addr(side, True, link)}/64", "dev", ifname,
               "nodad", ns=n)
            sh("ip", "link", "set", ifname, "up", ns=n)
        # The attacker's default route lets it send from spoofed sources; the victim
        # answers them back over the same link.
        sh("ip", "route", "add", "default", "via", self.addr("victim", link=link), ns=ns)
        sh("ip", "-6", "route", "add", "default", "via", self.addr("victim", True, link), ns=ns)

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            # Processes left in the namespace would keep it (and its veth) alive.
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            sh("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()
