"""`swarm-agent demo`: attack a throw-away victim namespace and print the timeline.

Each pattern gets a fresh attacker/victim pair of network namespaces and a fresh agent
(its state in a temp dir); everything is removed afterwards, also on Ctrl-C. Nothing
touches the root namespace's network.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from swarmlab.scenario import PATTERNS, Scenario, Timeline, active


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def format_timeline(tl: Timeline) -> str:
    d = tl.as_dict()
    pattern = PATTERNS[tl.pattern]
    mits = active(d["mitigations"]) or d["mitigations"]
    what = ", ".join(f"{m['kind']} {m['target']} ({m['ttl_s']} s)" for m in mits) or "none"
    unit = "connection attempts" if pattern.attack in ("conn_flood", "port_scan") else "packets"
    if pattern.kind == "rate_limit":
        # A per-source rate limit lets a trickle through by design: no hard cut-off.
        last = "  attacker limited  " + f"{_fmt_ms(d['mitigated_ms']):<9}  (a trickle of handshakes still passes)"
    else:
        last = f"  attacker cut off  {_fmt_ms(d['cut_off_ms']):<9}  (no TCP handshake for ~1 s from here)"
    lines = [
        f"{tl.pattern}: {pattern.description}",
        f"  first packet      0.0 ms   ({d['packets_sent']} {unit} sent)",
        f"  kernel event      {_fmt_ms(d['kernel_event_ms']):<9}  (the probe's timestamp)",
        f"  detected          {_fmt_ms(d['detected_ms']):<9}  rule {d['rule'] or '-'} "
        "(the detector's decision)",
        f"  mitigated         {_fmt_ms(d['mitigated_ms']):<9}  {what}",
        last,
    ]
    if d["invalid"]:
        lines.append(f"  INVALID RUN: {d['invalid']}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.list:
        for p in PATTERNS.values():
            print(f"{p.name:<24} {p.description} -> {p.kind} ({p.rule})")
        return 0
    names = list(PATTERNS) if not args.patterns else [n.strip() for n in args.patterns.split(",")]
    unknown = [n for n in names if n not in PATTERNS]
    if unknown:
        print(f"swarm-agent: unknown pattern {', '.join(unknown)} (see demo --list)", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("swarm-agent: permission denied: demo needs root (it creates network namespaces "
              "and runs the agent)", file=sys.stderr)
        return 5
    results = []
    for name in names:
        if not args.json:
            print(f"running {name} ...", flush=True)
        with Scenario() as scenario:
            tl = scenario.run(PATTERNS[name])
        results.append(tl)
        if not args.json:
            print(format_timeline(tl) + "\n", flush=True)
    if args.json:
        print(json.dumps([t.as_dict() for t in results], indent=2))
    return 0 if all(t.mitigated_mono_ns for t in results) else 1
