"""The engine's state as JSON (format FORMAT) and back, and the times in it rebased
across a restart. Writing the file (atomic: tmp + fsync + rename) is the daemon's: detect
does no I/O."""
from __future__ import annotations

from collections import Counter
from typing import Any

from agent.detect.anomaly.beacon import BeaconTracker
from agent.detect.anomaly.calibrate import Calibrator
from agent.detect.anomaly.features import NAMES, PREFIX_V4, PREFIX_V6, Novelty
from agent.detect.anomaly.profile import Profile, Workload
from agent.detect.anomaly.replaced import Replacements
from agent.detect.anomaly.teach import Taught

FORMAT = 1


def signature(eng) -> dict[str, Any]:
    """What the state depends on: a snapshot of other features or model shapes is not
    loaded (its models would score vectors they never saw)."""
    c = eng.cfg
    return {"features": list(NAMES), "hst": [c.hst.trees, c.hst.depth], "seed": c.seed,
            "loda": c.loda_projections, "window_s": c.window_s,
            "prefix": [PREFIX_V4, PREFIX_V6]}


def snapshot(eng, wall_s: float | None) -> dict[str, Any]:
    return {
        "format": FORMAT, "model_version": eng.__class__.__module__ and _version(),
        "node": eng.node_name, "signature": signature(eng),
        "taken_mono_ns": eng.now, "taken_wall": wall_s,
        "started_ns": eng.started_ns, "kernel_bytes": eng.kernel_bytes,
        "profiles": {k: p.dump() for k, p in eng.profiles.items()},
        "calibrators": {k: c.dump() for k, c in eng.cal.items()},
        "workloads": {k: w.dump() for k, w in eng.workloads.items()},
        "node_workload": eng.node.dump(),
        "beacon": eng.beacon.dump(),
        "counters": dict(eng.counters),
        "exe_paths": eng.exe_paths,
        "taught": eng.taught.dump(),
        "reported_news": eng.reported_news.dump(),
        "reported_exes": eng.reported_exes.dump(),
        "pods": eng.pods.dump(),
        "replaced": eng.replaced.dump(),
    }


def _version() -> int:
    from agent.detect.anomaly.engine import MODEL_VERSION
    return MODEL_VERSION


def restore(eng, snap: Any, now_mono_ns: int | None, now_wall_s: float | None):
    if not isinstance(snap, dict):
        raise ValueError("the anomaly state is not a JSON object")
    if snap.get("format") != FORMAT:
        raise ValueError(f"the anomaly state has format {snap.get('format')!r}, this agent "
                         f"reads format {FORMAT}")
    if snap.get("signature") != signature(eng):
        raise ValueError("the anomaly state was made with other features or model settings")
    try:
        _load(eng, snap)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise ValueError(f"the anomaly state is damaged ({type(e).__name__}: {e})") from None
    taken = int(snap.get("taken_mono_ns") or 0)
    eng.now = taken
    if now_mono_ns is not None:
        down = 0.0
        if now_wall_s is not None and snap.get("taken_wall") is not None:
            down = max(0.0, now_wall_s - float(snap["taken_wall"]))
        rebase(eng, now_mono_ns - int(down * 1e9) - taken)
    else:
        eng._rebase_from = taken
    eng.restored = f"restored (format {FORMAT}, {len(eng.profiles)} profiles)"
    return eng


def _load(eng, snap: dict[str, Any]) -> None:
    cfg = eng.cfg
    eng.started_ns = snap.get("started_ns")
    eng.kernel_bytes = bool(snap.get("kernel_bytes"))
    eng.profiles = {k: Profile(cfg, eng.models, d) for k, d in snap["profiles"].items()}
    eng._profile("node")
    eng.cal = {k: Calibrator(d) for k, d in snap["calibrators"].items()}
    eng.workloads = {}
    for k, d in list(snap["workloads"].items())[-cfg.max_workloads:]:
        eng.workloads[k] = Workload(k, d["cgroup"], d["container"], d["profile"],
                                    eng.persist_m, cfg.recent_events, d)
        eng._profile(d["profile"])
    eng.node = Workload("node", "", "", "node", eng.persist_m, cfg.recent_events,
                        snap.get("node_workload"))
    eng.beacon = BeaconTracker(cfg, eng.known_nets, snap.get("beacon"))
    eng.counters = Counter({k: int(v) for k, v in snap.get("counters", {}).items()})
    eng.exe_paths = {str(k): str(v) for k, v in snap.get("exe_paths", {}).items()}
    eng.taught = Taught(snap.get("taught"))
    eng.reported_news = Novelty(cfg.novelty_max, map(str, snap.get("reported_news", ())))
    eng.reported_exes = Novelty(cfg.novelty_max, map(str, snap.get("reported_exes", ())))
    eng.pods = Novelty(cfg.novelty_max, map(str, snap.get("pods", ())))
    eng.replaced = Replacements(cfg.novelty_max, snap.get("replaced"))


def rebase(eng, delta: int) -> None:
    """Shift every stored monotonic time by delta (the new boot's clock)."""
    if eng.started_ns is not None:
        eng.started_ns += delta
    eng.now += delta
    eng.window_start = None
    for p in eng.profiles.values():
        p.rebase(delta)
    for w in [eng.node, *eng.workloads.values()]:
        w.rebase(delta)
    eng.beacon.rebase(delta)
    eng.replaced.rebase(delta)
