"""Traffic generators and the handshake probe for the demo, the end-to-end tests and the
benchmarks, run as subprocesses inside lab namespaces.

    srv = start_server(lab.victim, 8080, duration_s=30)
    proc = start(lab.attacker, "syn_flood", target=lab.addr("victim"), port=8080, count=5000)
    outcome = result(proc, timeout_s=30)   # {"sent": 5000, "first_packet_mono_ns": ..., ...}
    stop(srv)                              # {"accepted": ..., "echoed_bytes": ...}

Keyword options map to flags of `python -m swarmlab.attacks` (duration_s=2 -> --duration-s 2;
True -> a bare flag; None/False -> left out). Every pattern is bounded by count and
duration and prints one JSON line with at least: pattern, target, port, sent, errors,
error_kinds, first_packet_mono_ns, last_packet_mono_ns (time.monotonic_ns() just before
the first/last packet; CLOCK_MONOTONIC is shared across namespaces) and rate_pps. Extras:
syn_flood source; distributed_syn_flood, distributed_ack_flood, decoy_scan and spoofed_udp_flood spoof_cidr,
sources; udp_flood size; conn_flood,
lb_burst and port_scan open/refused/timeout/error (port_scan also ports, open_ports);
benign successes, failures; probe successes, failures, first_success_mono_ns,
last_success_mono_ns,
cut_off_mono_ns (start of the first failed handshake after which none succeeded; None if
the last one succeeded).
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

PATTERNS = ("syn_flood", "udp_flood", "conn_flood", "port_scan", "distributed_syn_flood",
            "benign", "lb_burst", "probe", "serve", "decoy_scan", "spoofed_udp_flood",
            "distributed_ack_flood")


class AttackError(RuntimeError):
    """A generator failed, timed out, or printed no result."""


def command(ns: str | None, pattern: str, **opts: object) -> list[str]:
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; one of {', '.join(PATTERNS)}")
    cmd = ["ip", "netns", "exec", ns] if ns else []
    cmd += [sys.executable, "-m", "swarmlab.attacks", pattern, "--json"]
    for key, value in opts.items():
        if value is None or value is False:
            continue
        cmd.append("--" + key.replace("_", "-"))
        if value is not True:
            cmd.append(str(value))
    return cmd


def start(ns: str | None, pattern: str, **opts: object) -> subprocess.Popen[str]:
    """Launch `pattern` inside namespace `ns` (None: this one) and return at once."""
    return subprocess.Popen(command(ns, pattern, **opts), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def result(proc: subprocess.Popen[str], timeout_s: float = 30.0) -> dict:
    """Wait for `proc` to finish and return its JSON result line. On timeout the process
    is killed and AttackError raised, so no generator outlives its caller's patience."""
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AttackError(f"{' '.join(proc.args[-8:])} still running after {timeout_s} s") from None
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise AttackError(err.strip() or f"exit status {proc.returncode}, no result")
    return json.loads(lines[-1])


def run(ns: str | None, pattern: str, timeout_s: float = 30.0, **opts: object) -> dict:
    return result(start(ns, pattern, **opts), timeout_s)


def start_server(ns: str | None, port: int, timeout_s: float = 5.0, **opts: object) -> subprocess.Popen[str]:
    """Launch `serve` in `ns` and return once it listens (AttackError if it doesn't)."""
    proc = start(ns, "serve", port=port, **opts)
    line = _read_line(proc, timeout_s)
    if not line.startswith("{"):
        proc.kill()
        _, err = proc.communicate()
        raise AttackError(f"serve did not start: {err.strip() or 'no ready line'}")
    return proc


def stop(proc: subprocess.Popen[str], timeout_s: float = 5.0) -> dict:
    """SIGTERM a running pattern (serve stops gracefully) and return its result."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return result(proc, timeout_s)


def _read_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    # Byte by byte from the raw fd, so nothing after the line sits in a Python buffer
    # that communicate() would not see.
    fd, line, deadline = proc.stdout.fileno(), b"", time.monotonic() + timeout_s
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 1)
        if not chunk:
            break
        line += chunk
    return line.decode(errors="replace")
