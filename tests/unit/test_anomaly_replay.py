"""A compressed replay through the real anomaly engine (bench/anomaly_eval.py's loop on a
short span): after a 20-minute warm-up, a benign hour of the synthetic GPU node raises no
finding, and a jittered beacon started after it is found within 60 s of its first
connection. The clock is the events' (injected), ticked every 0.5 s as the daemon does."""
from __future__ import annotations

from agent.detect.anomaly import AnomalyConfig, AnomalyEngine
from swarmlab.nodeday import NodeDay
from swarmlab.nodeday.node import MESH

NS = 1_000_000_000
WARMUP_S = 1200.0
BEACON_AT_S = WARMUP_S + 3600.0
CONFIG = {"warmup_s": WARMUP_S, "warmup_windows": 100, "known_destinations": [f"{MESH}/32"]}


def replay(day: NodeDay, eng, hours: float) -> list:
    findings, tick = [], day.base_ns + NS // 2
    for ev in day.events(hours=hours):
        while ev.mono_ns >= tick:
            findings += eng.tick(tick)
            tick += NS // 2
        eng.observe(ev)
    findings += eng.tick(tick)
    return findings


def test_benign_hour_raises_none_and_a_beacon_is_found_within_60_s():
    day = NodeDay(seed=7, schedule=[(BEACON_AT_S, "beacon")], warmup_s=WARMUP_S)
    eng = AnomalyEngine(AnomalyConfig.from_dict(CONFIG), "gpu-node-07")
    findings = replay(day, eng, hours=(BEACON_AT_S + 90) / 3600)
    beacon = day.truth[0]
    status = eng.status()["detectors"]
    assert status and all(d["mode"] == "alerting" for d in status.values()), status
    assert any(d["windows"] for d in status.values()), "the engine scored windows"
    before = [(f.rule_id, f.entity, (f.evidence or {}).get("summary"))
              for f in findings if f.detected_mono_ns < beacon.start_ns]
    assert before == [], "a benign hour raised findings"
    hits = [f for f in findings if f.rule_id == "anomaly.beacon"
            and beacon.dst in f.evidence["scope"].get("dst", ())]
    assert hits, f"the beacon ({beacon.detail}) was not found"
    assert (hits[0].detected_mono_ns - beacon.start_ns) / NS <= 60.0
    assert hits[0].entity == f"cgroup:{beacon.cgroup}"
    assert hits[0].evidence["scope"].get("container") == beacon.container
