"""Honest figures: what a bench run measured, whether it measured anything, and the summary.

The clocks (all CLOCK_MONOTONIC, shared by every namespace of the host):

- *first packet*: the attack generator's clock just before its first send;
- *kernel event*: the probe's timestamp on the event the rule fired on;
- *detected*: when the agent's detector decided (user space; the incident's detected_at),
  so kernel event -> detected is the ring buffer, the queue and the rules;
- *mitigated*: the agent's clock after the enforcer's transaction returned (the incident's
  mitigated_at); the change is in force at some moment in [applying, mitigated], where
  *applying* is when the responder created the mitigation (its created_at);
- *cut off*: the independent prober's clock at the start of its first failed handshake
  after which none succeeded.

A run is *invalid* when it did not measure what the figure claims: the prober never
connected before the attack (a cut-off then proves nothing), the agent never detected or
never mitigated, the prober was cut off before the mitigation could have been in force (the
flood, not the agent, cut it off), an expected cut-off never came, or the clocks contradict
each other. Invalid runs are listed with their reason and left out of the percentiles; a
bench exits non-zero when more than its allowed fraction of runs is invalid.
"""
from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

# Tolerated clock disagreement between the agent's wall->monotonic conversion and the
# bench's (both read CLOCK_REALTIME and CLOCK_MONOTONIC a few microseconds apart).
SKEW_NS = 2_000_000
MAX_INVALID_FRACTION = 0.2


@dataclass(frozen=True)
class Marks:
    """One run's instants (monotonic ns; None: it did not happen)."""

    first_packet: int | None
    probe_first_ok: int | None
    detected: int | None
    applying: int | None
    mitigated: int | None
    cut_off: int | None
    expect_cut_off: bool = False
    kernel_event: int | None = None


def invalid_reason(m: Marks) -> str | None:
    """Why this run measured nothing (one sentence), or None when it is valid."""
    if m.first_packet is None:
        return "the attack sent no packet"
    if m.probe_first_ok is None:
        return "the prober never connected"
    if m.probe_first_ok >= m.first_packet:
        return "the prober's first connection came after the attack began"
    if m.detected is None:
        return "the agent never detected the attack (no incident)"
    if m.detected < m.first_packet - SKEW_NS:
        return "detected before the first packet: the clocks disagree"
    if m.kernel_event is not None and m.kernel_event > m.detected + SKEW_NS:
        return "the kernel event is later than the decision: the clocks disagree"
    if m.kernel_event is not None and m.kernel_event < m.first_packet - SKEW_NS:
        return ("the kernel event came before the attack's first packet: the incident "
                "answers something else, or the clocks disagree")
    if m.mitigated is None:
        return "the mitigation never came"
    if m.mitigated < m.detected - SKEW_NS:
        return "mitigated before detected: the clocks disagree"
    in_force_from = m.applying if m.applying is not None else m.mitigated
    if m.cut_off is not None and m.cut_off < in_force_from - SKEW_NS:
        return (f"cut off {(in_force_from - m.cut_off) / 1e6:.1f} ms before the mitigation "
                "could be in force: the flood, not the agent, cut the prober off")
    if m.expect_cut_off and m.cut_off is None:
        return "the attacker was never cut off"
    return None


def pct(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 1]) of the values, None when there are none."""
    ordered = sorted(values)
    if not ordered:
        return None
    k = max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))
    return ordered[k]


def spread(values: list[float]) -> dict[str, Any]:
    """median / p95 / max / n of the values (None when empty)."""
    return {"median": round(statistics.median(values), 3) if values else None, "p95": pct(values, 0.95),
            "max": max(values) if values else None, "n": len(values)}


Run = Mapping[str, Any]


def split(runs: list[Run]) -> tuple[list[Run], list[dict[str, Any]]]:
    """(valid runs, [{"run": index, "reason": ...}] of the invalid ones); a run is a dict
    whose "invalid" key holds its reason or None."""
    valid = [r for r in runs if not r.get("invalid")]
    invalid = [{"run": i, "reason": r["invalid"]} for i, r in enumerate(runs) if r.get("invalid")]
    return valid, invalid


def too_many_invalid(total: int, invalid: int, max_fraction: float = MAX_INVALID_FRACTION) -> bool:
    """True when more than `max_fraction` of the runs (or all of them) are invalid."""
    return total == 0 or invalid == total or invalid > max_fraction * total


def containment(reached_after: int, sent_after: float) -> float | None:
    """Attacker containment: the fraction of the attack traffic sent after the mitigation
    that did NOT reach the service (1.0: nothing got through). None without traffic."""
    if sent_after <= 0:
        return None
    return max(0.0, 1.0 - reached_after / sent_after)


def sent_after(sent: int, first_ns: int, last_ns: int, at_ns: int) -> float:
    """Packets a paced generator sent after `at_ns`, assuming an even pace between its first
    and last packet (the generators pace themselves: swarmlab.attacks.common.Pacer)."""
    if at_ns <= first_ns:
        return float(sent)
    if at_ns >= last_ns or last_ns <= first_ns:
        return 0.0
    return sent * (last_ns - at_ns) / (last_ns - first_ns)


def print_invalid(named: Iterable[tuple[str, list[Mapping[str, Any]]]], failed: list[str],
                  max_invalid: float) -> int:
    """Every bench's tail: each invalid run with its reason, the cases with too many of
    them, and the exit status (1 when any case failed)."""
    for name, invalid in named:
        for bad in invalid:
            print(f"invalid: {name} run {bad['run']}: {bad['reason']}")
    if failed:
        print(f"FAILED: more than {max_invalid:.0%} of the runs invalid for "
              f"{', '.join(failed)}: these figures measure nothing", file=sys.stderr)
    return 1 if failed else 0
