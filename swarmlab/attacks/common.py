"""What every generator shares: its options, a tally of what it sent, and a pacer that
bounds it in rate, count and time."""
from __future__ import annotations

import errno
import os
import time
from collections import Counter
from dataclasses import dataclass, field

NS_PER_S = 1_000_000_000
MAX_DURATION_S = 3600.0
NETNS_DIR = "/run/netns"


@dataclass(frozen=True)
class Options:
    """The command-line options, shared by all patterns (each reads the ones it needs)."""
    pattern: str
    target: str = ""
    port: int = 8080
    count: int = 100_000
    duration_s: float = 10.0
    rate: float = 0.0            # packets (or requests) per second; 0 = as fast as possible
    concurrency: int = 64
    timeout_ms: float = 1000.0
    interval_ms: float = 10.0
    size: int = 64
    ports: str = "1-1024"
    sources: int = 2000
    spoof_cidr: str | None = None
    seed: int = 1
    bind: str | None = None
    stop_after_failures: int = 0


@dataclass
class Tally:
    """Packets (or attempts) sent, with the monotonic time just before the first and the
    last: CLOCK_MONOTONIC is shared by all namespaces of a machine, so these compare with
    the agent's own timestamps."""
    sent: int = 0
    first_ns: int | None = None
    last_ns: int | None = None
    errors: Counter = field(default_factory=Counter)

    def mark(self, now_ns: int) -> None:
        if self.first_ns is None:
            self.first_ns = now_ns
        self.last_ns = now_ns
        self.sent += 1

    def error(self, exc: OSError) -> None:
        name = errno.errorcode.get(exc.errno or 0) or type(exc).__name__
        self.errors[name] += 1

    def report(self, opts: Options, **extra: object) -> dict:
        span_ns = (self.last_ns - self.first_ns) if self.sent > 1 else 0
        return {
            "pattern": opts.pattern, "target": opts.target, "port": opts.port,
            "sent": self.sent, "errors": sum(self.errors.values()),
            "error_kinds": dict(self.errors),
            "first_packet_mono_ns": self.first_ns, "last_packet_mono_ns": self.last_ns,
            "rate_pps": round((self.sent - 1) * NS_PER_S / span_ns, 1) if span_ns else None,
            **extra,
        }


class Pacer:
    """Yields permission to send until the count or the duration runs out, sleeping to
    hold `rate` per second when one is set."""

    # After a stall (a slow connect, a full socket buffer) allow catching up for at most
    # this long, so a pause never turns into a burst far above the asked rate.
    MAX_DEBT_NS = NS_PER_S // 10

    def __init__(self, count: int, duration_s: float, rate: float = 0.0):
        self.left = count
        self.interval_ns = int(NS_PER_S / rate) if rate > 0 else 0
        now = time.monotonic_ns()
        self.deadline_ns = now + int(duration_s * NS_PER_S)
        self.next_ns = now

    def next(self) -> int | None:
        """The monotonic time to stamp the next packet with, or None when done."""
        if self.left <= 0:
            return None
        now = time.monotonic_ns()
        if self.interval_ns:
            if now < self.next_ns:
                time.sleep((self.next_ns - now) / NS_PER_S)
                now = time.monotonic_ns()
            self.next_ns = max(self.next_ns, now - self.MAX_DEBT_NS) + self.interval_ns
        if now >= self.deadline_ns:
            return None
        self.left -= 1
        return now


def in_named_netns() -> bool:
    """True when this process runs in a namespace made with `ip netns add` (as the lab's
    are). Traffic generators refuse to run anywhere else, so they never send from the
    machine's own namespace. (pid 1's namespace may be unreadable, even to root, in a
    container, so the check is positive rather than "not pid 1's".)"""
    try:
        here = os.stat("/proc/self/ns/net")
        names = os.listdir(NETNS_DIR)
    except OSError:
        return False
    for name in names:
        try:
            there = os.stat(os.path.join(NETNS_DIR, name))
        except OSError:
            continue
        if (there.st_dev, there.st_ino) == (here.st_dev, here.st_ino):
            return True
    return False


def check_options(opts: Options) -> None:
    """Raise ValueError, with one sentence, for options that would leave a run unbounded."""
    if not 0 < opts.duration_s <= MAX_DURATION_S:
        raise ValueError(f"--duration-s must be in (0, {MAX_DURATION_S:g}]")
    if opts.count <= 0:
        raise ValueError("--count must be positive")
    if opts.rate < 0 or opts.concurrency <= 0 or opts.timeout_ms <= 0 or opts.interval_ms <= 0:
        raise ValueError("--rate, --concurrency, --timeout-ms and --interval-ms must be positive")
    if not 0 <= opts.port <= 65535:
        raise ValueError("--port must be in 0..65535")
