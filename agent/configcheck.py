"""What each config value may be, checked as the config is built (agent/config.py).

Numbers: every numeric key has a declared range in BOUNDS, from what nftables, BPF and
the code can take (an nft set's size is a u32, a BPF map's entries are preallocated
kernel memory, a limit's burst is a u32, an element's timeout tops out below ten years).
A key missing from BOUNDS still gets the generic range of a signed 64-bit integer or a
finite float, and tests/unit/test_config_bounds.py fails until it is declared: a key
added to a dataclass gets its bound here, in one line.

Text: printable characters only (no NUL, escapes, newlines, bidi overrides), at most
MAX_TEXT characters; lists and mappings at most MAX_ITEMS entries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_TEXT = 4096          # characters in one string (PATH_MAX)
MAX_ITEMS = 10_000       # entries in one list or mapping
YEAR_S = 365 * 86400     # nft refuses element timeouts of ten years; one year is taken


@dataclass(frozen=True)
class Bound:
    low: float
    high: float
    above: bool = False        # low itself excluded ("greater than 0")
    pow2: bool = False         # a power of two (ring buffer sizes)
    why: str = ""              # where the limit comes from, for the message


_RATE = Bound(1, 1_000_000_000, why="nftables limit rates and bursts are 32-bit")
_TTL = Bound(0, YEAR_S, above=True, why="one year; nftables refuses timeouts of ten")
_WAIT = Bound(0, 3600, above=True)

BOUNDS: dict[str, Bound] = {
    "enforce.set_size": Bound(1, 1 << 24, why="a full nftables set of more costs gigabytes of "
                              "kernel memory"),
    "enforce.rate_limit.packets_per_second": _RATE,
    "enforce.rate_limit.burst": _RATE,
    "enforce.service_rate_limit.packets_per_second": _RATE,
    "enforce.service_rate_limit.burst": _RATE,
    "enforce.challenge_rate_limit.packets_per_second": _RATE,
    "enforce.challenge_rate_limit.burst": _RATE,
    "enforce.reroute.mark": Bound(1, 2**32 - 1, why="a packet mark is 32 bits"),
    "mitigation.default_ttl_s": _TTL,
    "mitigation.max_ttl_s": _TTL,
    "mitigation.isolation_ttl_s": _TTL,
    "mitigation.repeat_factor": Bound(1, 1000),
    "mitigation.repeat_window_s": Bound(0, 10 * YEAR_S, above=True),
    "mitigation.max_sources_per_rule": Bound(1, 1_000_000),
    "probes.map_entries": Bound(
        1024, 1 << 20, why="three LRU maps preallocate about 600 bytes of kernel memory "
        "per entry"),
    "probes.window_ms": Bound(10, 60_000),
    "probes.queue_events": Bound(
        1024, 1 << 18, why="a queued event holds up to about 4.5 KiB of memory (an exec "
        "with a full argv, bench/queue_memory.py): the most is about 1.2 GiB with the "
        "urgent lane; fewer than 1024 drops under any exec burst"),
    "mesh.heartbeat_s": Bound(0, 86400, above=True),
    "mesh.batch_size": Bound(1, 1000, why="one call must fit gRPC's 4 MiB message limit"),
    "mesh.timeout_s": _WAIT,
    "mesh.backoff_initial_s": _WAIT,
    "mesh.backoff_max_s": Bound(0, 86400, above=True),
    "mesh.outbox_max": Bound(1, 10_000_000),
    "mesh.outbox_hard_max": Bound(1, 10_000_000),
    "alerts.resend_s": Bound(0, 86400, above=True),
    "alerts.timeout_s": _WAIT,
    "gpu.sample_s": Bound(0.1, 3600, why="NVML counters change no faster; an hour is the "
                          "longest a process may use a GPU unseen"),
    "policy.egress_poll_s": Bound(0.05, 60, why="the counters are read this often; past "
                                  "a minute an attempt waits too long to become an incident"),
    "policy.exec_hash_max_bytes": Bound(1, 1 << 32, why="executables larger than this are "
                                        "not hashed (read on the event loop: keep it small)"),
    "investigation.refresh_s": Bound(1, 86400),
    "investigation.timeout_s": Bound(0.1, 30, why="collection runs on a thread of its own; "
                                     "longer delays the evidence an analyst waits for"),
    "investigation.max_bytes": Bound(4096, 2 << 20, why="a bundle goes to the mesh in one "
                                     "report; gRPC's limit is 4 MiB a call"),
    "feedback.max_ttl_s": _TTL,
    "gpu.device_major": Bound(0, 4095, why="a character device major (NVIDIA's is 195; "
                              "0: the kernel reports no GPU device opens)"),
}
# The anomaly engine's keys (agent/detect/anomaly/config.py declares their ranges).
from agent.detect.anomaly.config import BOUNDS_HELP as _ANOMALY_BOUNDS  # noqa: E402

BOUNDS.update({k: Bound(lo, hi) for k, (lo, hi) in _ANOMALY_BOUNDS.items()})
from agent.fleet.config import BOUNDS_HELP as _FLEET_BOUNDS  # noqa: E402

BOUNDS.update({k: Bound(lo, hi) for k, (lo, hi) in _FLEET_BOUNDS.items()})
_GENERIC_INT = Bound(-(2**63), 2**63 - 1)
_GENERIC_FLOAT = Bound(-math.inf, math.inf)


def number(key: str, value: Any, integer: bool) -> int | float:
    """`value` as the int or float `key` takes; raises ValueError naming the key."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (integer and not isinstance(value, int)):
        hint = ""
        if isinstance(value, str) and value.strip() and _looks_numeric(value):
            hint = _text_hint(value, integer)
        raise ValueError(f"{key} must be {'an integer' if integer else 'a number'}{hint}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number (got {value})")
    b = BOUNDS.get(key, _GENERIC_INT if integer else _GENERIC_FLOAT)
    if not (value > b.low if b.above else value >= b.low) or value > b.high:
        low = f"greater than {_num(b.low)}" if b.above else \
            "greater than 0" if b.low == 1 and integer else f"at least {_num(b.low)}"
        why = f"; {b.why}" if b.why else ""
        raise ValueError(f"{key} must be {low} and at most {_num(b.high)} "
                         f"(got {_num(value)}{why})")
    if b.pow2 and value & (value - 1):
        raise ValueError(f"{key} must be a power of two (got {value})")
    return value if integer else float(value)


def _text_hint(value: str, integer: bool) -> str:
    """Why YAML read a number as text, and how to write it: quoted ("16384"), or an
    exponent without a dot (YAML 1.1 reads 1e9 as text)."""
    plain = value.strip().replace("_", "")
    if plain.lstrip("+-").isdigit():
        return f" (got the text {value!r}: write {plain} without quotes)"
    if integer:
        return f" (YAML reads {value!r} as text: write it in full, without an exponent)"
    return f" (YAML reads {value!r} as text: write it with a dot and a signed exponent, " \
           "1.0e+9, or in full)"


def _looks_numeric(value: str) -> bool:
    try:
        return math.isfinite(float(value))
    except ValueError:
        return False


def text(key: str, value: Any) -> str:
    """`value` as a string fit for a path, a name or a label; raises ValueError."""
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string")
    if len(value) > MAX_TEXT:
        raise ValueError(f"{key} is longer than {MAX_TEXT} characters")
    if not value.isprintable():   # controls, NUL, newlines, bidi overrides, surrogates
        c = next(c for c in value if not c.isprintable())
        raise ValueError(f"{key} holds a character that is not printable ({ascii(c)})")
    return value


def name(key: Any) -> str:
    """A key as it can be printed in a message: itself when printable text, else quoted."""
    return key if isinstance(key, str) and key.isprintable() and len(key) <= 80 else \
        ascii(key)[:80]


def items(key: str, value: list | dict) -> None:
    if len(value) > MAX_ITEMS:
        raise ValueError(f"{key} has {len(value)} entries (at most {MAX_ITEMS})")


def exists(path: str, kind: str = "any") -> bool:
    """Whether `path` is there ("file", "dir" or "any"); an unusable path is not."""
    try:
        p = Path(path)
        return p.is_file() if kind == "file" else p.is_dir() if kind == "dir" else p.exists()
    except (OSError, ValueError):
        return False


def port(text_: str, low: int = 1) -> bool:
    """Whether `text_` is a port number from `low` to 65535 (ASCII digits only)."""
    return text_.isascii() and text_.isdigit() and len(text_) <= 5 and low <= int(text_) < 65536


def _num(v: float) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        v = int(v)
    return str(v) if isinstance(v, int) else f"{v:g}"
