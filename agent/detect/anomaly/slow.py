"""The two detectors that watch longer than a window: anomaly.drift (a profile's slow mean
against the reference frozen at the end of its warm-up) and anomaly.beacon (periodic
outbound connections, beacon.py). Functions of the engine (`self`), kept apart to keep
engine.py readable."""
from __future__ import annotations

from agent.detect.anomaly import findings as fx
from agent.detect.anomaly.features import DIM, FLOORS, NAMES, unscale
from agent.detect.anomaly.profile import DRIFT_FLOOR_DIV, PROFILE_MIN, Workload
from agent.model import Finding, Severity


def drift_finding(self, w, p, x, start, end, now, warm):
    """anomaly.drift: the profile's slow mean against its frozen reference."""
    if warm and p.frozen is None and p.windows >= PROFILE_MIN:
        p.freeze()
    halflife_windows = max(1.0, self.cfg.drift.halflife_s / self.cfg.window_s)
    z = p.drift(x, 1.0 - 0.5 ** (1.0 / halflife_windows))
    if z is None or z < self.cfg.drift.z:
        p.drift_since = None
        return None
    if p.drift_since is None:
        p.drift_since = start
    if now - p.drift_since < self.cfg.drift.min_s * 1e9:
        return None
    zs = [abs(s - m) / max(1.4826 * d, f / DRIFT_FLOOR_DIV)
          for s, m, d, f in zip(p.slow, p.frozen.mean, p.frozen.dev, FLOORS)]
    order = sorted(range(DIM), key=lambda i: -zs[i])[:5]
    total = sum(zs[i] for i in order) or 1.0
    drv = [{"feature": NAMES[i], "value": round(unscale(i, p.slow[i]), 3),
            "baseline": round(unscale(i, p.frozen.mean[i]), 3),
            "contribution": round(zs[i] / total, 3)} for i in order if zs[i] > 0]
    sc = fx.scope(w, self.node_name, [], {}, self.kernel_bytes)
    ev = self._evidence("drift", round(z, 3), self.cfg.drift.z, None, p.drift_since, end,
                        drv, sc, {})
    ev["summary"] = (f"drift: {fx.name(w)} has moved away from its reference for "
                     f"{(now - p.drift_since) / 3.6e12:.1f} h: " +
                     ", ".join(f"{d['feature']} {d['value']:.3g} (reference "
                               f"{d['baseline']:.3g})" for d in drv[:3]))
    return self._emit("drift", "workload", w, None, Severity.MEDIUM, p.drift_since, now, ev)

def beacon_findings(self, now: int) -> list[Finding]:
    """anomaly.beacon: the pairs that score, deduplicated per pair."""
    out = []
    for (wkey, dst, port), pair, s in self.beacon.due():
        if pair.last_alert_ns is not None and now - pair.last_alert_ns < self.cfg.dedup_s * 1e9:
            self.counters["dedup.beacon"] += 1
            continue
        pair.last_alert_ns = now
        wkey = pair.workload or wkey          # the workload that last connected
        w = self.node if wkey == "node" else self.workloads.get(wkey)
        w = w or Workload(wkey, wkey if wkey.startswith("/") else "",
                          "" if wkey.startswith("/") else wkey, "", 1, 0)
        sc = {"node": self.node_name, "dst": [dst], "dport": [port]}
        if w.key != "node":
            sc["cgroup"] = w.cgroup
            if w.container:
                sc["container"] = w.container
        shas = [k[7:] for k in pair.exes if k.startswith("sha256:")]
        ids = [k[3:] for k in pair.exes if k.startswith("id:")]
        if shas:
            sc["exe_sha256"] = shas
        if ids:
            sc["exe_id"] = ids
        times = list(pair.times)
        ev = self._evidence("beacon", s["score"], self.cfg.beacon.threshold, None,
                            times[0], now, fx.beacon_drivers(s), sc, {})
        ev["beacon"] = s
        exe = self.exe_paths.get(pair.exes[0]) if pair.exes else None
        ev["summary"] = fx.beacon_summary(s, dst, port, exe, fx.name(w), pair.new_dst)
        sev = Severity.HIGH if pair.new_dst else Severity.MEDIUM
        self._count("beacon", True)
        out.append(fx.finding("beacon", self.version, w.entity, sev, times[0], now, ev))
    return out
