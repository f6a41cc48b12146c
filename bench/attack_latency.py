"""Time from an attack's first packet until the attacker is cut off, per pattern.

    sudo .venv/bin/python bench/attack_latency.py [--runs 10 | --quick] [--patterns a,b] [--json]

Each run builds a fresh attacker/victim namespace pair and a fresh agent
(swarmlab.scenario.Scenario), launches the attack beside a handshake probe (one attempt
every 20 ms, 50 ms timeout) and reads the timeline: detected and mitigated from the
agent's store (detected: the detector's decision, in user space; kernel event: the
probe's timestamp on the event the rule fired on), cut off from the probe (start of the
first run of 20 failed handshakes, i.e. about a second without one). All times are from the
attack's first packet, on CLOCK_MONOTONIC. A run is invalid (listed with its reason, left
out of the percentiles; swarmlab.figures) when the probe never connected before the
attack, nothing was detected or mitigated, the probe was cut off before the mitigation
could be in force, or a block never cut the attacker off; more than --max-invalid of a
pattern's runs invalid: exit 1. Also reported: the agent's peak RSS (VmHWM) and the CPU time it used
during the attack. `--spoofed N` adds a run of N packets from N distinct spoofed source
addresses (a /12) to show that memory and the block set stay bounded.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarmlab import attacks, figures  # noqa: E402
from swarmlab.scenario import PATTERNS, SERVICE_PORT, Scenario, proc_stat, active  # noqa: E402


def summarize(name: str, runs: list[dict]) -> dict:
    """Percentiles over the valid runs only; the invalid ones are listed with their reason."""
    valid, invalid = figures.split(runs)
    out: dict = {"pattern": name, "runs": len(runs), "valid": len(valid), "invalid": invalid}
    for key in ("kernel_event_ms", "detected_ms", "kernel_to_detected_ms", "mitigated_ms",
                "cut_off_ms"):
        out[key] = figures.spread([r[key] for r in valid if r[key] is not None])
    out["peak_rss_mb"] = max((r["agent_peak_rss_kb"] or 0) for r in runs) / 1024
    out["max_cpu_s"] = max((r["agent_cpu_s"] or 0) for r in runs)
    out["mitigations"] = sorted({m["kind"] for r in valid for m in active(r["mitigations"])})
    return out


def spoofed_run(n: int) -> dict:
    """n SYNs from n distinct spoofed sources: memory and set sizes must stay bounded."""
    from swarmlab.lab import sh

    with Scenario() as sc:
        t0 = time.monotonic()
        _, cpu_before = proc_stat(sc.agent.pid)
        res = attacks.run(sc.lab.attacker, "distributed_syn_flood", timeout_s=300,
                          target=sc.target(False), port=SERVICE_PORT, sources=n, count=n,
                          spoof_cidr="172.16.0.0/12", duration_s=120)
        elapsed = time.monotonic() - t0
        hwm_kb, cpu_after = proc_stat(sc.agent.pid)
        listing = json.loads(sh("nft", "-j", "list", "table", "inet", "swarm_agent", ns=sc.lab.victim).stdout)
        sizes = {i["set"]["name"]: len(i["set"].get("elem", [])) for i in listing["nftables"] if "set" in i}
        with sc.agent.store() as store:
            mitigations = [(str(m.kind), m.target) for m in store.mitigations()]
    return {"sources": n, "sent": res["sent"], "rate_pps": res["rate_pps"], "seconds": round(elapsed, 1),
            "agent_peak_rss_mb": round(hwm_kb / 1024, 1),
            "agent_cpu_s": round(cpu_after - cpu_before, 2),
            "set_elements": {k: v for k, v in sizes.items() if v}, "mitigations": mitigations}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="3 runs per pattern")
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--spoofed", type=int, default=0, help="also run a flood from N spoofed sources")
    ap.add_argument("--max-invalid", type=float, default=figures.MAX_INVALID_FRACTION,
                    help="fail (exit 1) when more than this fraction of a pattern's runs is invalid")
    ap.add_argument("--dry-run", action="store_true",
                    help="a check of the bench itself: the agent enforces nothing, so every "
                         "run must come out invalid and the bench exit 1")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    unknown = [n for n in args.patterns.split(",") if n not in PATTERNS]
    if unknown:
        print(f"unknown pattern {', '.join(unknown)}; one of {', '.join(PATTERNS)}", file=sys.stderr)
        return 2
    runs_per = 3 if args.quick else args.runs
    summaries, spoofed = [], None
    for name in args.patterns.split(","):
        runs = []
        for _ in range(runs_per):
            with Scenario("dry_run: true\n" if args.dry_run else "") as sc:
                runs.append(sc.run(PATTERNS[name]).as_dict())
        summaries.append(summarize(name, runs))
        print(json.dumps(summaries[-1]), file=sys.stderr, flush=True)
    if args.spoofed:
        spoofed = spoofed_run(args.spoofed)
        print(json.dumps(spoofed), file=sys.stderr)
    failed = [s["pattern"] for s in summaries
              if figures.too_many_invalid(s["runs"], len(s["invalid"]), args.max_invalid)]
    if args.json:
        print(json.dumps({"patterns": summaries, "spoofed": spoofed, "failed": failed}, indent=2))
        return 1 if failed else 0
    print("| pattern | mitigation | valid runs | kernel event median / p95 (ms) "
          "| detected median / p95 (ms) | mitigated median / p95 (ms) "
          "| cut off median / p95 (ms) | peak RSS (MB) | agent CPU during attack (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in summaries:
        def mp(key: str) -> str:
            v = s[key]
            return "-" if v["median"] is None else f"{v['median']:.1f} / {v['p95']:.1f}" + (
                f" ({v['n']}/{s['valid']})" if v["n"] != s["valid"] else "")
        print(f"| {s['pattern']} | {', '.join(s['mitigations'])} | {s['valid']}/{s['runs']} | "
              f"{mp('kernel_event_ms')} | {mp('detected_ms')} | {mp('mitigated_ms')} | "
              f"{mp('cut_off_ms')} | {s['peak_rss_mb']:.1f} | {s['max_cpu_s']:.2f} |")
    if spoofed:
        print(f"\nspoofed flood: {json.dumps(spoofed)}")
    return figures.print_invalid(((s["pattern"], s["invalid"]) for s in summaries), failed,
                                 args.max_invalid)


if __name__ == "__main__":
    sys.exit(main())
