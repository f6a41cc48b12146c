"""Red team round 7, area A (anomaly engine): evasions found by replay through the real
engine. Each test fails while the evasion works and passes once it is fixed."""
from __future__ import annotations

import random

import pytest

from agent.detect.anomaly import AnomalyEngine
from tests.unit.anomaly_stream import config, connect, replay

USER_APP = "/user.slice/user-1000.slice/user@1000.service/app.slice"
SERVICE = "/system.slice/cron.service"


def _beacon_over(cgroups, t0=300.0, t1=900.0):
    """A jittered 5 s beacon to one external address from one executable, each connection
    made from the next cgroup of `cgroups` (round robin)."""
    r = random.Random(3)
    evs, t, i = [], t0, 0
    while t < t1:
        evs += connect(t, "203.0.113.7", 443, cgroup=cgroups[i % len(cgroups)], container="",
                       exe="/tmp/.x", exe_id="8:1:777", size=int(r.gauss(600, 20)))
        t += 5 * r.uniform(0.7, 1.3)
        i += 1
    return evs


def _beacon_findings(cgroups):
    eng = AnomalyEngine(config(), "n")
    found = replay(eng, _beacon_over(cgroups), 0, 900)
    return [(t, f) for t, f in found if f.rule_id == "anomaly.beacon" and t - 300 <= 60]


def test_control_beacon_from_one_cgroup_is_found():
    assert _beacon_findings([SERVICE])


def test_beacon_rotated_over_three_child_cgroups_is_still_found():
    # Root in a service (or any delegated cgroup) makes x.service/a, /b, /c and connects
    # from each in turn: each child is its own workload, so the destination has 3 "users"
    # (prevalence_max) and is treated as shared; no pair is ever scored.
    assert _beacon_findings([f"{SERVICE}/{c}" for c in "abc"])


def test_beacon_from_a_fresh_transient_scope_per_connection_is_still_found():
    # Unprivileged: `systemd-run --user --scope curl ...` puts every connection in a new
    # run-r<id>.scope, a new workload key: no pair reaches min_conns, prevalence is full.
    scopes = [f"{USER_APP}/run-r{k:x}0a.scope" for k in range(400)]
    assert _beacon_findings(scopes)


def _rotating_beacon(n_ips, t0=300.0, t1=1200.0):
    """A jittered 5 s beacon from one container to the next of `n_ips` addresses of one
    /24 each time (a C2 behind several addresses of one provider's block)."""
    r = random.Random(3)
    evs, t, i = [], t0, 0
    while t < t1:
        evs += connect(t, f"203.0.113.{1 + i % n_ips}", 443, exe="/tmp/.x", exe_id="8:1:777",
                       size=int(r.gauss(600, 20)))
        t += 5 * r.uniform(0.7, 1.3)
        i += 1
    return evs


@pytest.mark.xfail(strict=True, reason="README limit: beacon pairs are per exact address; a beacon rotating over many addresses of one block is not scored as one (a warm node's window models see its first new /16)")
def test_beacon_rotating_over_its_slash24_is_found_during_warm_up():
    # The "low-and-slow one already running during warm-up": the beacon scorer
    # keys pairs by exact address, so 64 addresses give each pair one connection per
    # ~5 min; nothing in 15 min (the window models are in shadow during warm-up).
    eng = AnomalyEngine(config(), "n")
    found = replay(eng, _rotating_beacon(64), 0, 1200)
    assert [t for t, f in found if f.rule_id == "anomaly.beacon" and t - 300 <= 60]


@pytest.mark.xfail(strict=True, reason='README limit: a beacon over several addresses is one finding per address (they join one investigation per workload while it stays open)')
def test_one_beacon_over_eight_addresses_is_one_investigation():
    # Over 8 addresses it is found at ~250 s, but as 8 findings (one per address) inside
    # the dedup period: 8 investigations for one implant.
    eng = AnomalyEngine(config(), "n")
    found = [f for t, f in replay(eng, _rotating_beacon(8), 0, 900)
             if f.rule_id == "anomaly.beacon"]
    assert len(found) == 1, [f.evidence["scope"].get("dst") for f in found]


def test_failed_connect_flood_does_not_evict_the_beacon_pair():
    # A 2-min beacon plus, from the same container, non-blocking connect()+close() to
    # ever-new unroutable addresses (outcome "failed", 36/s: under the probe's per-cgroup
    # cap of 256 per 5 s). Every failed connect is a beacon pair; the global LRU of
    # max_pairs (4096) turns over every ~2 min, so the beacon's pair never holds min_conns.
    # Without the flood it is found at ~734 s.
    from tests.unit.anomaly_stream import WEB, WEB_ID, ev
    eng = AnomalyEngine(config(), "n")
    r = random.Random(3)
    evs, t = [], 300.0
    while t < 2400:
        evs += connect(t, "198.51.100.9", 443, exe="/tmp/.x", exe_id="8:1:777",
                       size=int(r.gauss(600, 20)))
        t += 120 * r.uniform(0.8, 1.2)
    for k in range((2400 - 300) * 36):
        ip = f"45.{(k >> 16) & 255}.{(k >> 8) & 255}.{k & 255}"
        evs.append(ev("flow.connect", 300 + k / 36, ip, daddr=ip, dport=80, outcome="failed",
                      cgroup=WEB, container=WEB_ID))
    found = replay(eng, evs, 0, 2400, step=1.0)
    assert [t for t, f in found if f.rule_id == "anomaly.beacon"]


def _attack(cg, ct, t0):
    """A new binary, a new listener and 100 MB to a never-seen destination in 60 s."""
    from tests.unit.anomaly_stream import ev
    evs = [ev("proc.exec", t0, "pid:9", exe="/tmp/.m", exe_id="8:1:4242",
              exe_sha256="bb" * 32, cgroup=cg, container=ct),
           ev("flow.listen", t0 + 1, "tcp/31337", addr="0.0.0.0", port=31337, family=4,
              cgroup=cg, container=ct)]
    for k in range(20):
        evs += connect(t0 + 2 + k * 3, "198.51.100.77", 8443, cgroup=cg, container=ct,
                       exe="/tmp/.m", exe_id="8:1:4242", size=5_000_000)
    return evs


@pytest.mark.xfail(strict=True, reason='README limit: a never-seen kind of workload (profile) is learned for its first 30 windows before its models judge it')
def test_attack_from_a_never_seen_cgroup_profile_is_found_on_a_warm_node():
    # Shipped detectors, a node warm for 55 min. The same attack inside the known web
    # container is found at once; from a cgroup of a kind never seen (a new unit, a
    # `systemd-run` scope, a delegated child cgroup) it raises nothing: a profile's models
    # score only after PROFILE_MIN (30) windows, everything before is learned and its
    # never-seen items committed as known, and the node window leaves workload activity
    # to the workload's models (engine.py _close).
    from tests.unit.anomaly_stream import WEB, WEB_ID, benign
    for cg, ct in ((WEB, WEB_ID), ("/system.slice/backup-agent.service", "")):
        eng = AnomalyEngine(config(detectors=["mahalanobis", "beacon", "drift"]), "n")
        found = replay(eng, benign(1, 0, 3400) + _attack(cg, ct, 3300), 0, 3400)
        assert [t for t, f in found if 3300 <= t <= 3360], cg


@pytest.mark.xfail(strict=True, reason='README limit: destinations are new by /16 (cloud blocks rotate); volume alone to a known block is left to drift')
def test_exfiltration_to_a_new_host_in_a_known_cloud_slash16_is_found():
    # The web container talks to an object store (52.216.10.5, ~1 KB/s). The attacker rents
    # a host in the same provider /16 and sends 200 MB in 60 s with the container's own
    # binary. Novelty is by /16 and a window model needs novelty in the window
    # (require_novelty), so volume 10,000 times the normal raises nothing; the same burst
    # to 198.51.100.77 is found at once.
    from tests.unit.anomaly_stream import benign
    r = random.Random(5)
    s3, t = [], 0.0
    while t < 3400:
        t += r.expovariate(1 / 20)
        s3 += connect(t, "52.216.10.5", 443, size=int(r.expovariate(1 / 20000)))
    burst = [e for k in range(20) for e in connect(3300 + k * 3, "52.216.200.9", 443,
                                                      size=10_000_000)]
    eng = AnomalyEngine(config(detectors=["mahalanobis", "beacon", "drift"]), "n")
    found = replay(eng, benign(1, 0, 3400) + s3 + burst, 0, 3400)
    assert [t for t, f in found if 3300 <= t <= 3360]


def test_a_second_new_executable_within_the_dedup_hour_is_reported():
    # Decoy: the attacker runs a harmless never-seen binary (an investigation opens, its
    # evidence bundle shows nothing bad). Ten minutes later the real payload, another
    # never-seen binary, runs in the same container: dedup is per (workload, detector,
    # kind of driver) for dedup_s (1 h) unless 100 times less likely, so nothing is
    # reported about it (engine.py _emit); the bundle taken for the decoy predates it.
    from tests.unit.anomaly_stream import WEB, WEB_ID, benign, ev

    def exe(t, path, sha, ino):
        return ev("proc.exec", t, "pid:9", exe=path, exe_id=f"8:1:{ino}", exe_sha256=sha,
                  cgroup=WEB, container=WEB_ID)
    eng = AnomalyEngine(config(detectors=["mahalanobis", "beacon", "drift"]), "n")
    evs = benign(1, 0, 3700) + [exe(3000, "/tmp/decoy", "cc" * 32, 55),
                                exe(3600, "/tmp/.payload", "dd" * 32, 66)]
    found = [(t, f) for t, f in replay(eng, evs, 0, 3700) if t >= 3000]
    assert [t for t, f in found if t < 3100], "control: the decoy is found"
    payload = [t for t, f in found if t >= 3600
               and "dd" * 32 in f.evidence["scope"].get("exe_sha256", [])]
    assert payload
