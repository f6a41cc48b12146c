"""What of an attack still reaches the service: a packet counter behind the agent's table.

A lab-owned nftables table (`inet swarmlab_meter`, in the lab's victim namespace only) with
one input chain at priority 100, after every chain of the agent's table (input hooks at
-10 and -5; XDP runs before all of them): it counts the packets to the service's port
that nothing before it dropped or consumed (a SYN proxy consumes the SYNs it answers), from
any address but the legitimate client's. For TCP it counts SYNs (a handshake's first
packet, the flood's unit: an ACK or stray-segment flood is not what it measures); for UDP
every datagram; IPv4 and IPv6 each have their own counter and exclusions. nft counts
packets as the stack sees them: a GSO skb from a local sender (UDP_SEGMENT) counts once,
so the benches' generators send plain datagrams. A sampler thread reads the counters every
`interval_s` with its CLOCK_MONOTONIC time, so the count from any instant on (the
mitigation's) can be read off afterwards.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Iterable

from swarmlab.lab import sh

TABLE = "swarmlab_meter"


class ServiceMeter:
    """Count attack packets reaching `proto`/`port` in `ns`, except from `exclude`."""

    def __init__(self, ns: str, proto: str, port: int, exclude: Iterable[str] = (),
                 interval_s: float = 0.05):
        if proto not in ("tcp", "udp"):
            raise ValueError(f"proto must be tcp or udp, not {proto!r}")
        self.ns, self.proto, self.port = ns, proto, port
        self.exclude = list(exclude)
        self.interval_s = interval_s
        self.samples: list[tuple[int, int]] = []    # (mono ns, packets so far)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "ServiceMeter":
        match = "tcp flags & (syn | ack) == syn" if self.proto == "tcp" else ""
        rules = []
        for family, kw in (("ipv4", "ip"), ("ipv6", "ip6")):      # one counter each
            mine = [a for a in self.exclude if (":" in a) == (family == "ipv6")]
            skip = f"{kw} saddr != {{ {', '.join(mine)} }} " if mine else ""
            rules.append(f"  meta nfproto {family} {skip}{self.proto} dport {self.port} "
                         f"{match} counter\n")
        sh("nft", "-f", "-", ns=self.ns, input=(
            f"table inet {TABLE} {{\n chain input {{\n  type filter hook input priority 100; "
            f"policy accept;\n{''.join(rules)} }}\n}}\n"))
        self.samples.append((time.monotonic_ns(), self.read()))
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        sh("nft", "delete", "table", "inet", TABLE, ns=self.ns, check=False)

    def read(self) -> int:
        """Packets counted so far (both families)."""
        out = json.loads(sh("nft", "-j", "list", "chain", "inet", TABLE, "input",
                            ns=self.ns).stdout)
        counts = [int(expr["counter"]["packets"]) for item in out["nftables"]
                  for expr in item.get("rule", {}).get("expr", []) if "counter" in expr]
        if len(counts) != 2:
            raise RuntimeError(f"expected two counters in table inet {TABLE}, found {len(counts)}")
        return sum(counts)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.samples.append((time.monotonic_ns(), self.read()))
            except (OSError, RuntimeError, ValueError):
                continue

    def stop(self) -> None:
        """Take a last sample and stop sampling (the table stays until __exit__)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        self.samples.append((time.monotonic_ns(), self.read()))

    def since(self, at_ns: int) -> tuple[int, int] | None:
        """(time of the first sample at or after `at_ns`, packets counted from then to the
        last sample), or None when no sample follows `at_ns`."""
        after = [s for s in self.samples if s[0] >= at_ns]
        if not after:
            return None
        return after[0][0], self.samples[-1][1] - after[0][1]

    def before(self, at_ns: int) -> int:
        """Packets counted up to the last sample before `at_ns`."""
        prior = [s for s in self.samples if s[0] < at_ns]
        return (prior[-1][1] - self.samples[0][1]) if prior else 0
