"""Replays synthetic node-days (swarmlab.nodeday) through the REAL anomaly engine
(agent.detect.anomaly) at accelerated time and measures what the issue's "Done when" asks:

- false investigations per node-day on benign-only days (with a 95 % upper bound, so a
  0.2/day target is resolvable only with enough days: the bound says when it is not);
- per injected behaviour (beacon, exfil, miner, listener, low-and-slow): found or not and
  time-to-investigation (the finding's decision time - the attacker's first action);
- the same for each detector on its own, the trivial baselines (newexe: never-seen
  executable; zscore: per-feature EWMA/MAD) included, beside the shipped configuration;
- engine cost: CPU per 10 s window (this process's CPU time) and state bytes.

Clock: the events' CLOCK_MONOTONIC mono_ns, generated; the engine is ticked every
--tick-s (0.5 s) of simulated time, as the daemon's housekeeping would. The same seed gives
the same benign events with and without injections, so a finding of the injected run that
the benign run also raised (same detector and entity, within --same-s) is benign.
A finding is an injected behaviour's when it comes between the behaviour's start and its
end + --grace-s and names its workload (cgroup, container), its destination or its binary.
Investigations: findings grouped as the responder groups them (one per entity while the
incident stays open; a new one after --reopen-s without findings, a human having closed it).

Invalid runs (an engine that scored no window, a behaviour that started too late in the
run to be judged) are listed with their reason and left out; the exit status is 1 when
any run is invalid (figures that measure nothing are not averaged).

    .venv/bin/python bench/anomaly_eval.py --quick            # 2 node-days, 3 arms
    .venv/bin/python bench/anomaly_eval.py --jobs 8 --json    # 2 nodes x 8 days, every arm
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from swarmlab.nodeday import BASE_NS, BEHAVIOURS, DAY_S, NodeDay    # noqa: E402
from swarmlab.nodeday.node import MESH                              # noqa: E402

NS = 1_000_000_000
TARGET_TTI_S = 60.0
TARGET_FALSE_PER_DAY = 0.2


def load_engine():
    """(AnomalyEngine, AnomalyConfig, DETECTORS, shipped detectors) or a sentence."""
    try:
        from agent.detect.anomaly import AnomalyConfig, AnomalyEngine
        from agent.detect.anomaly.config import DEFAULT_DETECTORS, DETECTORS
    except ImportError as e:
        sys.exit(f"anomaly_eval: the anomaly engine is not importable here ({e}); merge "
                 "the model branch first")
    return AnomalyEngine, AnomalyConfig, tuple(DETECTORS), tuple(DEFAULT_DETECTORS)


def shipped_section(path: str) -> dict[str, Any]:
    """The `anomaly:` section of the shipped config (packaging/config.yaml), {} if none."""
    import yaml
    try:
        with open(path) as f:
            doc = yaml.safe_load(f) or {}
    except OSError as e:
        sys.exit(f"anomaly_eval: cannot read {path}: {e.strerror}")
    return dict(doc.get("anomaly") or {})


@dataclass
class Arm:
    """One engine configuration replayed: the shipped one, or one detector alone."""

    name: str
    detectors: tuple[str, ...]
    engine: Any = None
    cpu_s: float = 0.0
    findings: list = field(default_factory=list)


def make_arm(name: str, base: dict, node: str) -> Arm:
    eng_cls, cfg_cls, _, _ = load_engine()
    dets = tuple(base.get("detectors") or ()) if name == "shipped" else (name,)
    d = {**base, "state_path": None, "detectors": list(dets)}
    try:
        engine = eng_cls(cfg_cls.from_dict(d), node)
    except ValueError as e:
        sys.exit(f"anomaly_eval: arm {name}: {e}")
    return Arm(name, dets, engine)


def replay(day: NodeDay, arms: list[Arm], tick_s: float, batch: int = 4096) -> int:
    """Feed every event to every arm's engine, ticking every tick_s of event time; each
    arm's CPU time is its own (measured per batch, this process's CPU clock). Returns the
    number of events."""
    tick_ns, next_tick, items, events = int(tick_s * NS), day.base_ns + int(tick_s * NS), [], 0

    def run(items):
        for arm in arms:
            eng, found = arm.engine, arm.findings
            t = time.process_time()
            for is_tick, x in items:
                if is_tick:
                    found.extend(eng.tick(x))
                else:
                    eng.observe(x)
            arm.cpu_s += time.process_time() - t

    for ev in day.events():
        events += 1
        while ev.mono_ns >= next_tick:
            items.append((True, next_tick))
            next_tick += tick_ns
        items.append((False, ev))
        if len(items) >= batch:
            run(items)
            items = []
    while next_tick <= day.end_ns:
        items.append((True, next_tick))
        next_tick += tick_ns
    run(items)
    return events


def replay_task(seed: int, inject: bool, arm_names: tuple[str, ...], base: dict,
                opts: dict) -> dict:
    """One node (seed) over opts["days"] days, benign or injected, through the arms' engines
    (in this process: a task of a process pool)."""
    day = NodeDay(seed, opts["days"], opts["behaviours"] if inject else (), opts["warmup_s"],
                  node=opts["node"])
    arms = [make_arm(n, base, opts["node"]) for n in arm_names]
    events = replay(day, arms, opts["tick_s"])
    return {"seed": seed, "inject": inject, "events": events, "truth": day.truth,
            # an arm is judged on its own detectors' findings only
            "arms": {a.name: {"detectors": a.detectors, "cpu_s": a.cpu_s,
                              "findings": [f for f in a.findings if detector_of(f) in a.detectors],
                              "foreign": sum(detector_of(f) not in a.detectors for f in a.findings),
                              "state_bytes": len(json.dumps(a.engine.snapshot())),
                              "status": a.engine.status()} for a in arms}}


def detector_of(f) -> str:
    return f.rule_id.split(".", 1)[1] if f.rule_id.startswith("anomaly.") else f.rule_id


def investigations(findings: list, reopen_s: float) -> list:
    """The findings that open an incident: the first on an entity, or the first after
    reopen_s without one there."""
    last: dict[str, int] = {}
    opened = []
    for f in sorted(findings, key=lambda f: f.detected_mono_ns):
        prev = last.get(f.entity)
        if prev is None or f.detected_mono_ns - prev > reopen_s * NS:
            opened.append(f)
        last[f.entity] = f.detected_mono_ns
    return opened


def names_behaviour(f, b, args, injected_dsts=frozenset()) -> bool:
    """Whether finding f is behaviour b's: it names b's destination (a listener: its port, in
    its workload); or it names b's workload
    (or binary) within grace_s of b's start (or of the warm-up's end, for a behaviour that
    began during it: the engine is silent until then) and names no other injected
    behaviour's destination (a finding of the all-day low-and-slow export in the same
    container is not the beacon's). Benign findings are already left out: the same finding
    in the benign run of the seed is not the injection's."""
    scope = (f.evidence or {}).get("scope") or {}
    dsts = set(scope.get("dst") or ())
    if b.dst and b.dst in dsts:
        return True
    # a listener's finding names its port (its scope may list the window's destinations,
    # the all-day low-and-slow export's among them, when fan-out drove it too)
    listens = ((f.evidence or {}).get("new") or {}).get("listens") or ()
    if b.name == "listener" and b.dport and f.entity == f"cgroup:{b.cgroup}" and \
            any(str(x).endswith(f"/{b.dport}") for x in listens):
        return True
    if dsts & (set(injected_dsts) - {b.dst}):
        return False
    if b.exe_sha256 and b.exe_sha256 in (scope.get("exe_sha256") or ()) and b.name == "miner":
        return True
    same_workload = f.entity == f"cgroup:{b.cgroup}" or (
        bool(b.container) and scope.get("container") == b.container)
    since = max(b.start_s, args.warmup_s) * NS + args.base_ns
    return same_workload and f.detected_mono_ns <= since + args.grace_s * NS


def near_miss(b, found: list, benign: list, same, args) -> list[dict]:
    """For a behaviour not found: the injected run's findings in its time on its workload
    or destination, and why none counted (the benign run raised the same, or it names
    another behaviour), so a miss can be told from a judging artefact."""
    out = []
    for f in found:
        if not b.start_ns - NS <= f.detected_mono_ns <= b.end_ns + args.grace_s * NS:
            continue
        scope = (f.evidence or {}).get("scope") or {}
        if not (f.entity == f"cgroup:{b.cgroup}" or b.dst in (scope.get("dst") or ())
                or (b.container and scope.get("container") == b.container)):
            continue
        out.append({"rule": f.rule_id, "at_s": round((f.detected_mono_ns - b.start_ns) / NS, 1),
                    "in_benign_run": any(same(f, g) for g in benign),
                    "summary": (f.evidence or {}).get("summary")})
    return out[:10]


def poisson_upper(k: int, exposure: float, conf: float = 0.95) -> float:
    """Upper `conf` bound of a Poisson rate seen k times in `exposure` (bisection)."""
    def cdf(lam):
        term = total = math.exp(-lam)
        for i in range(1, k + 1):
            term *= lam / i
            total += term
        return total
    lo, hi = 0.0, k + 10.0 * math.sqrt(k + 1) + 10
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) > 1 - conf else (lo, mid)
    return hi / exposure


def summarise(name: str, arm: dict, benign: dict, truth: list, args, windows: int) -> dict:
    """One arm's figures: false alarms (benign run) and detections (injected run)."""
    days, found = args.days, arm["findings"]
    benign_arm, benign = benign, benign["findings"]
    opened = investigations(benign, args.reopen_s)
    same = lambda f, g: (f.rule_id == g.rule_id and f.entity == g.entity  # noqa: E731
                         and abs(f.detected_mono_ns - g.detected_mono_ns) <= args.same_s * NS)
    extra = [f for f in found if not any(same(f, g) for g in benign)]
    per_behaviour, invalid, claimed = [], [], set()
    dsts = frozenset(b.dst for b in truth if b.dst)
    for b in truth:
        if b.start_s > days * DAY_S - args.grace_s:
            invalid.append({"behaviour": b.name, "reason": "started too late in the run to judge"})
            continue
        hits = [f for f in extra if b.start_ns - NS <= f.detected_mono_ns <= b.end_ns + args.grace_s * NS
                and names_behaviour(f, b, args, dsts)]
        claimed.update(id(f) for f in hits)
        first = min(hits, key=lambda f: f.detected_mono_ns) if hits else None
        tti = (first.detected_mono_ns - b.start_ns) / NS if first else None
        since_warm = None
        if first and b.start_s < args.warmup_s:
            since_warm = (first.detected_mono_ns - (args.base_ns + int(args.warmup_s * NS))) / NS
        per_behaviour.append({
            "behaviour": b.name, "start_s": round(b.start_s, 1), "workload": b.container[:12] or b.cgroup,
            "dst": b.dst, "detail": b.detail, "found": first is not None,
            "tti_s": None if tti is None else round(tti, 1),
            "tti_after_warmup_s": None if since_warm is None else round(since_warm, 1),
            "by": None if first is None else first.rule_id,
            "summary": None if first is None else (first.evidence or {}).get("summary"),
            "near": [] if first else near_miss(b, found, benign, same, args)})
    unclaimed = [f for f in extra if id(f) not in claimed]
    k = len(opened)
    return {"arm": name, "detectors": list(arm["detectors"]),
            "benign_findings": len(benign), "false_investigations": k,
            "false_per_day": round(k / days, 3), "false_per_day_upper95": round(poisson_upper(k, days), 3),
            "false_by_detector": _count(detector_of(f) for f in opened),
            # day 0 is a fresh install: its daily jobs, updates and images are all new
            "false_by_day": [sum(int((f.detected_mono_ns - args.base_ns) // (DAY_S * NS)) == d
                                 for f in opened) for d in range(days)],
            "false_examples": [{"rule": f.rule_id, "entity": f.entity,
                                "at_s": round((f.detected_mono_ns - args.base_ns) / NS),
                                "summary": (f.evidence or {}).get("summary")} for f in opened[:200]],
            "injected_run_extra_false": len(investigations(unclaimed, args.reopen_s)),
            "behaviours": per_behaviour, "invalid": invalid,
            # CPU and state of the benign run (the steady state, no attack in it)
            "cpu_ms_per_window": round(1000 * benign_arm["cpu_s"] / max(1, windows), 3),
            "cpu_s": round(benign_arm["cpu_s"], 2), "state_bytes": benign_arm["state_bytes"],
            "status": _status_brief(benign_arm["status"])}


def _count(items) -> dict:
    out: dict = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return out


def _status_brief(st: dict) -> dict:
    return {name: {k: d.get(k) for k in ("mode", "windows", "threshold", "hits", "shadow_hits")}
            for name, d in (st.get("detectors") or {}).items() if isinstance(d, dict)}


def run_all(args, base: dict, arm_names: list[str]) -> list[list[dict]]:
    """Every (seed, benign|injected) replay, split per arm over --jobs processes (each
    task generates its own events: cheap beside the engine), then each arm's summary per
    seed."""
    opts = {k: getattr(args, k) for k in ("days", "behaviours", "warmup_s", "node", "tick_s")}
    groups = [tuple(arm_names)] if args.jobs == 1 else [(n,) for n in arm_names]
    tasks = [(s, inj, g) for s in args.seeds for inj in (False, True) for g in groups]
    if args.jobs == 1:
        done = [replay_task(s, inj, g, base, opts) for s, inj, g in tasks]
    else:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(replay_task, s, inj, g, base, opts) for s, inj, g in tasks]
            done = [f.result() for f in futures]
    windows = int(args.days * DAY_S / float(base.get("window_s", 10.0)))
    per_seed = []
    for seed in args.seeds:
        benign = {n: a for r in done if r["seed"] == seed and not r["inject"] for n, a in r["arms"].items()}
        inj = [r for r in done if r["seed"] == seed and r["inject"]]
        injected = {n: a for r in inj for n, a in r["arms"].items()}
        events = next(r["events"] for r in done if r["seed"] == seed and not r["inject"])
        out = []
        for name in arm_names:
            s = summarise(name, injected[name], benign[name], inj[0]["truth"], args, windows)
            s["seed"], s["events"] = seed, events
            if not benign[name]["status"].get("workloads") and not benign[name]["status"].get("profiles"):
                s["invalid"].append({"behaviour": "*", "reason": "the engine modelled no workload"})
            if benign[name]["foreign"] or injected[name]["foreign"]:
                s["foreign_findings"] = benign[name]["foreign"] + injected[name]["foreign"]
            out.append(s)
        per_seed.append(out)
    return per_seed


def merge(per_seed: list[list[dict]], days: int) -> list[dict]:
    """Per arm, the seeds together."""
    merged = []
    for runs in zip(*per_seed):
        k = sum(r["false_investigations"] for r in runs)
        exposure = days * len(runs)
        by_det: dict = {}
        for r in runs:
            for d, n in r["false_by_detector"].items():
                by_det[d] = by_det.get(d, 0) + n
        later = sum(sum(r["false_by_day"][1:]) for r in runs)
        later_days = (days - 1) * len(runs)
        merged.append({
            "false_per_day_after_day0": round(later / later_days, 3) if later_days else None,
            "false_by_day": [r["false_by_day"] for r in runs],
            "arm": runs[0]["arm"], "detectors": runs[0]["detectors"], "node_days": exposure,
            "false_investigations": k, "false_per_day": round(k / exposure, 3),
            "false_per_day_upper95": round(poisson_upper(k, exposure), 3),
            "false_by_detector": by_det,
            "benign_findings": sum(r["benign_findings"] for r in runs),
            "injected_run_extra_false": sum(r["injected_run_extra_false"] for r in runs),
            "behaviours": [dict(b, seed=r["seed"]) for r in runs for b in r["behaviours"]],
            "false_examples": [dict(e, seed=r["seed"]) for r in runs for e in r["false_examples"]],
            "invalid": [dict(i, seed=r["seed"]) for r in runs for i in r["invalid"]],
            "cpu_ms_per_window": round(sum(r["cpu_ms_per_window"] for r in runs) / len(runs), 3),
            "state_bytes": max(r["state_bytes"] for r in runs),
            "events": sum(r["events"] for r in runs), "status": runs[-1]["status"],
            "foreign_findings": sum(r.get("foreign_findings", 0) for r in runs)})
    return merged


def cell(bs: list[dict]) -> str:
    if not bs:
        return "-"
    found = [b for b in bs if b["found"]]
    worst = max((b["tti_s"] for b in found), default=None)
    return f"{len(found)}/{len(bs)}" + (f" <={worst:.0f}s" if worst is not None else "")


def print_table(results: list[dict], args) -> None:
    names = [n for n in BEHAVIOURS if n in args.behaviours]
    print(f"anomaly_eval: {args.days} node-day(s) x {len(args.seeds)} seed(s) "
          f"{args.seeds}, tick {args.tick_s} s, warm-up {args.warmup_s:.0f} s, "
          f"{results[0]['events'] if results else 0} benign events")
    print("false/day: benign-only runs, investigations (95% upper bound); per behaviour: "
          "found/trials <=worst time-to-investigation")
    head = f"{'arm':<12} {'false/day':>14} " + " ".join(f"{n:>13}" for n in names) + \
        f" {'ms/window':>9} {'state KB':>8}"
    print(head)
    for r in results:
        by = {n: [b for b in r["behaviours"] if b["behaviour"] == n] for n in names}
        print(f"{r['arm']:<12} {r['false_per_day']:>6.2f} ({r['false_per_day_upper95']:>5.2f}) "
              + " ".join(f"{cell(by[n]):>13}" for n in names)
              + f" {r['cpu_ms_per_window']:>9.2f} {r['state_bytes'] / 1024:>8.1f}")
    for r in results:
        if r["foreign_findings"]:
            print(f"note: arm {r['arm']}'s engine also raised {r['foreign_findings']} findings of "
                  "detectors it was not configured with (not counted)")
    shipped = next((r for r in results if r["arm"] == "shipped"), None)
    if shipped is None:
        return
    print(f"\nshipped configuration ({', '.join(shipped['detectors'])}):")
    for b in shipped["behaviours"]:
        late = b["tti_s"] is None or b["tti_s"] > TARGET_TTI_S
        w = b["tti_after_warmup_s"]
        warm = "" if w is None else f" ({w:.0f} s after warm-up)" if w >= 0 else " (during the warm-up)"
        print(f"  {'MISS' if late else 'ok  '} seed {b['seed']} {b['behaviour']:<13} "
              f"at {b['start_s']:>8.0f} s in {b['workload']}: "
              + (f"{b['tti_s']:.1f} s{warm} by {b['by']}: {b['summary']}" if b["found"] else "not found")
              + f" [{b['detail']}]")
        for n in b.get("near") or ():
            print(f"       near: {n['at_s']:+.0f} s {n['rule']}"
                  f"{' (the benign run raised it too)' if n['in_benign_run'] else ''}: {n['summary']}")
    ok = shipped["false_per_day"] <= TARGET_FALSE_PER_DAY
    print(f"  {'ok  ' if ok else 'MISS'} {shipped['false_per_day']:.2f} false investigations per "
          f"node-day (target <= {TARGET_FALSE_PER_DAY}; 95% upper bound "
          f"{shipped['false_per_day_upper95']:.2f}) over {shipped['node_days']} node-days; "
          f"by detector {shipped['false_by_detector']}; per day (each seed) {shipped['false_by_day']}, "
          f"{shipped['false_per_day_after_day0']} a day after the install day")
    for e in shipped["false_examples"]:
        print(f"    false: seed {e['seed']} t={e['at_s']} s {e['rule']} {e['entity'][:70]}: {e['summary']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    # 16 node-days: with no false investigation, the 95% upper bound is 3.0/16 = 0.19 a day,
    # the least that shows the 0.2/day target met.
    ap.add_argument("--days", type=int, default=8, help="consecutive node-days per seed (8)")
    ap.add_argument("--seed", type=int, default=1, help="first seed (1)")
    ap.add_argument("--seeds", type=int, default=2, help="how many nodes (seeds) (2)")
    ap.add_argument("--quick", action="store_true",
                    help="2 node-days of one node, the shipped arm and the two baselines only")
    ap.add_argument("--json", action="store_true", help="the figures as JSON")
    ap.add_argument("--arms", default="shipped,each",
                    help="comma list: shipped, each (every detector alone) or detector names")
    ap.add_argument("--config", default="packaging/config.yaml", help="its anomaly: section")
    ap.add_argument("--behaviours", default=",".join(BEHAVIOURS))
    ap.add_argument("--tick-s", type=float, default=0.5)
    ap.add_argument("--grace-s", type=float, default=600.0,
                    help="a finding this long after a behaviour's end still counts as its")
    ap.add_argument("--same-s", type=float, default=120.0)
    ap.add_argument("--reopen-s", type=float, default=3600.0)
    ap.add_argument("--node", default="gpu-node-07")
    ap.add_argument("--jobs", type=int, default=1,
                    help="processes (1: one pass feeds every arm; N: one task per seed and arm)")
    args = ap.parse_args(argv)
    _, cfg_cls, detectors, default = load_engine()
    base = shipped_section(args.config)
    base.setdefault("detectors", list(default))
    # The daemon knows its own mesh endpoint: the agent's channel to it is never a beacon.
    base["known_destinations"] = list(base.get("known_destinations") or ()) + [f"{MESH}/32"]
    args.warmup_s = float(base.get("warmup_s", cfg_cls().warmup_s))
    args.base_ns = BASE_NS
    if args.quick:
        args.days, args.seeds = min(args.days, 2), 1
        if args.arms == "shipped,each":
            args.arms = "shipped,newexe,zscore"
    args.behaviours = tuple(b for b in args.behaviours.split(",") if b)
    bad = set(args.behaviours) - set(BEHAVIOURS)
    if bad or args.days < 1 or args.seeds < 1:
        print(f"anomaly_eval: unknown behaviour(s) {sorted(bad)} (known: {', '.join(BEHAVIOURS)})"
              if bad else "anomaly_eval: --days and --seeds must be at least 1", file=sys.stderr)
        return 2
    arm_names: list[str] = []
    for a in args.arms.split(","):
        arm_names += list(detectors) if a == "each" else [a]
    unknown = [a for a in arm_names if a != "shipped" and a not in detectors]
    if unknown:
        print(f"anomaly_eval: unknown arm(s) {unknown} (shipped, each, {', '.join(detectors)})",
              file=sys.stderr)
        return 2
    args.seeds = list(range(args.seed, args.seed + args.seeds))
    wall = time.monotonic()
    per_seed = run_all(args, base, arm_names)
    results = merge(per_seed, args.days)
    if args.json:
        print(json.dumps({"days": args.days, "seeds": args.seeds, "tick_s": args.tick_s,
                          "warmup_s": args.warmup_s, "wall_s": round(time.monotonic() - wall, 1),
                          "arms": results}, indent=1, default=str))
    else:
        print_table(results, args)
    invalid = [(r["arm"], i) for r in results for i in r["invalid"]]
    for arm, i in invalid:
        print(f"invalid: {arm} seed {i['seed']} {i['behaviour']}: {i['reason']}", file=sys.stderr)
    return 1 if invalid else 0


if __name__ == "__main__":
    sys.exit(main())
