"""Findings of the anomaly engine, with the evidence CONTRACT11.md names: detector, model
version, score, threshold, false-alarm rate, window, drivers, scope (what feedback can be
scoped to), summary (one line a human reads)."""
from __future__ import annotations

from typing import Any

from agent.detect.anomaly.features import prefix
from agent.model import EventClass, Finding, Severity

EXE_FEATURES = {"execs", "new_exes", "new_exes_here"}
NET_FEATURES = {"conns", "fanout", "new_dsts", "new_ports", "failed", "egress_bytes",
                "new_dst_bytes"}
SCOPE_MAX = 8
GROUPS = {**{f: "exe" for f in EXE_FEATURES}, **{f: "net" for f in NET_FEATURES},
          "new_listens": "listen", "gpu_procs": "gpu", "gpu_util": "gpu",
          "gpu_unauth_bytes": "gpu"}


def group(drivers: list[dict[str, Any]]) -> str:
    """The kind of the top driver: a new kind of anomaly is not a duplicate of the last."""
    return GROUPS.get(drivers[0]["feature"], "") if drivers else ""


def finding(detector: str, version: int, entity: str, severity: Severity, first_ns: int,
            now_ns: int, evidence: dict[str, Any]) -> Finding:
    return Finding(rule_id=f"anomaly.{detector}", rule_version=version,
                   event_class=EventClass.SUSPICIOUS_ACTIVITY, severity=severity, entity=entity,
                   action="investigate", first_mono_ns=first_ns, detected_mono_ns=now_ns,
                   evidence=evidence)


def scope(w, node: str, drivers: list[dict[str, Any]], new: dict[str, list[str]],
          use_kernel_bytes: bool) -> dict[str, Any]:
    """What a feedback record may be scoped to: the workload, and the executables or
    destinations only where they drove the finding (the new ones first)."""
    out: dict[str, Any] = {"node": node}
    if w.key != "node":
        out["cgroup"] = w.cgroup
        if w.container:
            out["container"] = w.container
    feats = {d["feature"] for d in drivers}
    win = w.window
    if feats & EXE_FEATURES:
        keys = new.get("exes") or list(win.exes)
        info = [win.exes[k] for k in keys[:SCOPE_MAX] if k in win.exes]
        shas = [i["exe_sha256"] for i in info if i.get("exe_sha256")]
        ids = [i["exe_id"] for i in info if i.get("exe_id")]
        if shas:
            out["exe_sha256"] = shas
        if ids:
            out["exe_id"] = ids
    if feats & NET_FEATURES:
        traffic: dict[tuple[str, int], int] = dict(win.dsts)
        for k, b in win.egress(use_kernel_bytes).items():
            traffic[k] = traffic.get(k, 0) + b
        fresh = set(new.get("dsts", ()))
        ranked = sorted(traffic, key=lambda k: (prefix(k[0]) not in fresh, -traffic[k]))
        if fresh:
            ranked = [k for k in ranked if prefix(k[0]) in fresh] or ranked
        dsts = [k for k in ranked if k[0]][:SCOPE_MAX]
        if dsts:
            out["dst"] = sorted({a for a, _ in dsts})
            out["dport"] = sorted({p for _, p in dsts if p})
    return out


def name(w) -> str:
    if w.key == "node":
        return "the node"
    return f"container {w.container[:12]}" if w.container else w.cgroup


def window_summary(detector: str, w, p: float, drivers: list[dict[str, Any]],
                   sc: dict[str, Any], new: dict[str, list[str]]) -> str:
    parts = [f"{d['feature']} {_num(d['value'])} (usual {_num(d['baseline'])})"
             for d in drivers[:3]]
    extra = []
    if new.get("exes"):
        extra.append(f"{len(new['exes'])} executable(s) never seen")
    if sc.get("dst") and new.get("dsts"):
        extra.append("to never-seen " + ", ".join(sc["dst"][:3]))
    if new.get("listens"):
        extra.append("new listening " + ", ".join(new["listens"][:3]))
    tail = f"; {'; '.join(extra)}" if extra else ""
    return (f"{detector}: {name(w)} unusual (tail probability {p:.1e} per window): "
            f"{', '.join(parts) or 'several features together'}{tail}")


def beacon_summary(s: dict[str, Any], dst: str, port: int, exe: str | None, w_name: str,
                   new_dst: bool) -> str:
    return (f"beacon every {s['interval_s']:.1f} s +- {100 * s['interval_mad_ratio']:.0f}% to "
            f"{dst}:{port} from {exe or 'an unknown executable'} in {w_name}, "
            f"{s['connections']} connections, destination "
            f"{'never seen before' if new_dst else 'seen before'}")


def beacon_drivers(s: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [("interval_mad_ratio", s["interval_mad_ratio"], 0.7),
            ("interval_skew", s["interval_skew"], 0.26),
            ("connections", s["connections"], 0)]
    if s.get("size_mad_ratio") is not None:
        rows.append(("size_mad_ratio", s["size_mad_ratio"], 0.7))
    return [{"feature": f, "value": v, "baseline": b, "contribution": round(1 / len(rows), 3)}
            for f, v, b in rows]


def _num(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 10 or v == int(v) else f"{v:.2f}"
