"""anomaly.beacon: a jittered beacon is found within a minute of its start; benign
periodic traffic (heartbeats to the mesh, shared endpoints, 30-min checkpoint uploads,
a service's Poisson client traffic) is not; feedback marks a pair benign."""
from __future__ import annotations

import random

from agent.detect.anomaly import AnomalyEngine
from tests.unit.anomaly_stream import S, WEB, benign, beacon, config, connect, replay


def beacons(found):
    return [(t, f) for t, f in found if f.rule_id == "anomaly.beacon"]


def test_jittered_beacon_found_within_a_minute():
    for seed in range(8):      # 5 s +-30%, several draws of the jitter
        eng = AnomalyEngine(config(), "n")
        found = beacons(replay(eng, beacon(seed, 300, 900), 0, 900))
        assert found, seed
        t, f = found[0]
        assert t - 300 <= 60, (seed, t)
        b = f.evidence["beacon"]
        assert 3.5 <= b["interval_s"] <= 6.5
        assert f.evidence["scope"]["exe_id"] == ["8:1:777"]
        assert len(found) == 1      # deduplicated per pair


def test_a_beacon_repeats_after_the_dedup_period():
    eng = AnomalyEngine(config(dedup_s=600), "n")
    found = beacons(replay(eng, beacon(1, 0, 1500), 0, 1500))
    assert len(found) == 3


def test_heartbeats_to_the_mesh_and_known_destinations_are_not_beacons():
    eng = AnomalyEngine(config(known_destinations=["192.0.2.0/24"]), "n", known=("10.9.0.0/16",))
    evs = beacon(1, 0, 900, dst="192.0.2.10") + beacon(2, 0, 900, dst="10.9.0.1", period=2.0)
    assert beacons(replay(eng, evs, 0, 900)) == []


def test_checkpoint_uploads_every_30_minutes_are_not_beacons():
    r = random.Random(3)
    evs = []
    for i in range(12):        # 6 hours of 2 GB checkpoints, a few seconds' jitter
        evs += connect(600 + 1800 * i + r.uniform(-5, 5), "198.51.100.20", 443,
                       size=2_000_000_000 + r.randrange(10**6))
    eng = AnomalyEngine(config(), "n")
    assert beacons(replay(eng, evs, 0, 600 + 1800 * 12, step=5.0)) == []


def test_small_periodic_uploads_every_30_minutes_are_found_when_asked():
    # The same rhythm with small check-ins is a slow beacon: the size rule is what spares
    # checkpoints, not the period. Intervals over beacon.max_interval_s (15 min by
    # default: an hourly cron ping is as periodic) are looked at only when configured.
    r = random.Random(4)
    evs = []
    for i in range(8):
        evs += connect(600 + 1800 * i + r.uniform(-60, 60), "198.51.100.21", 443,
                       size=700 + r.randrange(50))
    assert beacons(replay(AnomalyEngine(config(), "n"), evs, 0, 600 + 1800 * 8, step=5.0)) == []
    eng = AnomalyEngine(config(beacon={"max_interval_s": 3600}), "n")
    assert beacons(replay(eng, evs, 0, 600 + 1800 * 8, step=5.0))


def test_poisson_client_traffic_is_not_a_beacon():
    eng = AnomalyEngine(config(), "n")
    assert beacons(replay(eng, benign(5, 0, 1800), 0, 1800)) == []


def test_a_destination_many_workloads_use_is_shared_not_a_beacon():
    evs = []
    for k in range(3):     # three workloads heartbeat the same endpoint (NTP-like, metrics)
        cg = f"/system.slice/svc{k}.service"
        evs += beacon(k, 0, 600, dst="198.51.100.30", port=4317, cgroup=cg, container="")
    eng = AnomalyEngine(config(), "n")
    assert beacons(replay(eng, evs, 0, 600)) == []


def test_learn_marks_the_pair_benign_and_another_beacon_still_alerts():
    eng = AnomalyEngine(config(dedup_s=60), "n")
    found = beacons(replay(eng, beacon(1, 0, 300), 0, 300))
    eng.learn(found[0][1].evidence)
    later = replay(eng, beacon(2, 300, 900) + beacon(3, 300, 900, dst="203.0.113.99"), 300, 900)
    dsts = {f.evidence["scope"]["dst"][0] for _, f in beacons(later)}
    assert dsts == {"203.0.113.99"}


def test_beacon_state_survives_a_snapshot():
    eng = AnomalyEngine(config(), "n")
    replay(eng, beacon(1, 0, 20), 0, 20)     # 4-5 connections: not yet scored
    back = AnomalyEngine.restore(config(), "n", eng.snapshot(), now_mono_ns=eng.now)
    rest = [e for e in beacon(1, 0, 120) if e.mono_ns > 19.5 * S]
    found = beacons(replay(back, rest, 20, 120))
    assert found and found[0][1].first_mono_ns == 0
    assert WEB in found[0][1].entity


def _reference_order(ops, max_pairs: int) -> list:
    """The pair table's eviction rule by a scan of the whole table (the rule's plain
    statement): a workload at a quarter of the table loses its oldest one-connection pair,
    else its oldest; then the table's oldest. An evicted one-connection pair is remembered
    (the last 2 x max_pairs): its next connection makes a pair of two."""
    from collections import OrderedDict
    table: OrderedDict = OrderedDict()
    ghosts: OrderedDict = OrderedDict()      # evicted one-connection pairs (their first)

    def evict(k):
        if table.pop(k) == 1:
            ghosts[k] = None
            if len(ghosts) > 2 * max_pairs:
                ghosts.popitem(last=False)

    for w, dst in ops:
        key = (w, dst, 443)
        if key not in table:
            own = [k for k in table if k[0] == w]
            if len(own) >= max(1, max_pairs // 4):
                evict(next((k for k in own if table[k] <= 1), own[0]))
            while len(table) >= max_pairs:
                evict(next(iter(table)))
            table[key] = 1 if ghosts.pop(key, 0) is None else 0
        table[key] += 1
        table.move_to_end(key)
    return list(table)


def test_the_pair_table_evicts_by_its_rule_without_scanning():
    """The tracker keeps an index per workload (a flood of ever-new addresses makes a new
    pair per connection: a scan of the table per connection would be the flood's cost to
    the agent); its table must end exactly as the plain rule's, flood or not."""
    cfg = config(beacon={"max_pairs": 32})
    rng = random.Random(5)
    for _ in range(20):
        ops = []
        for _ in range(600):
            w = rng.choice(["flood", "web", "job", "cron"])
            pool = 200 if w == "flood" else 12        # the flood: mostly ever-new addresses
            ops.append((w, f"198.51.{rng.randrange(pool) // 250}.{rng.randrange(pool) % 250}"))
        eng = AnomalyEngine(cfg, "n")
        tr = eng.beacon
        for i, (w, dst) in enumerate(ops):
            tr.connect(w, dst, 443, i * S, None, False)
        assert list(tr.pairs) == _reference_order(ops, 32)
        indexed = {k for side in (tr._singles, tr._multis) for own in side.values() for k in own}
        assert indexed == set(tr.pairs)
        back = AnomalyEngine.restore(cfg, "n", eng.snapshot(), now_mono_ns=eng.now).beacon
        assert list(back.pairs) == list(tr.pairs)
        tr.forget("flood")
        assert all(k[0] != "flood" for k in tr.pairs) and "flood" not in tr._singles


def test_a_reverted_learning_is_taken_back_and_nothing_else():
    """"Learn as normal" tagged with its feedback record; the record reverted (unlearn):
    the beacon is found again, even across a restart, and what the node knew before the
    verdict (a destination its windows had seen) stays known."""
    eng = AnomalyEngine(config(dedup_s=60), "n")
    found = beacons(replay(eng, beacon(1, 0, 300), 0, 300))
    evidence = found[0][1].evidence
    pkey = eng.workloads[evidence["scope"].get("container") or evidence["scope"]["cgroup"]].profile
    known = eng.profiles[pkey].known
    known.dsts.add("192.0.2.0/24")                       # known before the verdict
    eng.learn({**evidence, "new": {"dsts": ["192.0.2.1"], "exes": ["sha256:" + "ab" * 32]}},
              tag="rec-1")
    assert "sha256:" + "ab" * 32 in known.exes
    assert not beacons(replay(eng, beacon(1, 300, 600), 300, 600))   # learned: quiet
    back = AnomalyEngine.restore(config(dedup_s=60), "n", eng.snapshot(), now_mono_ns=eng.now)
    done = back.unlearn("rec-1")
    assert done.get("beacon") and done.get("known")
    known = back.profiles[pkey].known
    assert "192.0.2.0/24" in known.dsts                  # the node's own knowledge stays
    assert "sha256:" + "ab" * 32 not in known.exes       # the verdict's is news again
    assert beacons(replay(back, beacon(1, 600, 900), 600, 900))   # the beacon alerts again
    assert back.unlearn("rec-1") == {"unknown": 1}       # once
    assert back.status()["unlearned"] == 1
