"""Red team r10: the three changes of 27f0a3d, eb6a563 and f3ef3a3, probed as an attacker
who controls a container (a tenant's job) or a host user's processes:

1. a dynamic destination port (>= 32768) is a new port only to a never-seen /16;
2. bytes to an address first reached in a never-seen block count as new_dst_bytes for
   FRESH_S (Workload.fresh, engine keep_fresh);
3. what a flagged window saw never seen is held out of the known sets for the
   persistence horizon (Workload.pending, engine._remember(hold=True), engine._settle).

Every test but the two "test_holds_" ones fails on 93f4e1d (an attack, a benign
workload's finding flood, a config edge), its docstring saying what happens and what
should; the "test_holds_" ones pin a defence that held. (The file is r10: an earlier
round 8 already has test_redteam_r8.py.) Where a test clamps the calibrated tail
(_clamp_tails) no window passes the 1e-5 budget alone: a first contact scores
flagged-but-alone, as the 16 node-day eval saw (an export's connect window at 1e-3, a
miner's first window at 3e-4)."""
from __future__ import annotations

import json

import pytest

from agent.detect.anomaly import AnomalyEngine
from agent.detect.anomaly.profile import FRESH_MAX, PENDING_MAX
from tests.unit.anomaly_stream import S, WEB, WEB_ID, benign, config, connect, ev, replay

DROP = "203.0.113.9"          # the attacker's upload host, in a block the node never saw
SIBLING = "b" * 24            # another container of the web kind (same pod: a sidecar)
SIBLING_CG = WEB.replace(WEB_ID, SIBLING)


@pytest.fixture(scope="module")
def warmed():
    """50 benign minutes (warm-up 20): the web kind and cron are modelled; the web kind
    talks to 10.0.0.5:5432 only (10.0.0.0/16 is a known block, no dynamic port ever)."""
    eng = AnomalyEngine(config(), "node-1")
    replay(eng, benign(1, 0, 3000), 0, 3000)
    return eng.snapshot()


def fresh(snap, **over):
    return AnomalyEngine.restore(config(**over), "node-1", json.loads(json.dumps(snap)))


def _clamp_tails(monkeypatch, eng):
    """No window passes the 1e-5 budget alone: each flagged one needs a second."""
    from agent.detect.anomaly import calibrate
    real = calibrate.Calibrator.tail
    level = eng.p_window
    monkeypatch.setattr(calibrate.Calibrator, "tail",
                        lambda self, s: max(real(self, s), level / 10))


def _connect(t, dst, port=443, cgroup=WEB, container=WEB_ID):
    return ev("flow.connect", t, dst, daddr=dst, dport=port, outcome="established",
              cgroup=cgroup, container=container, exe="/usr/bin/web", exe_id="8:1:100")


def _upload(t0, dst=DROP, cgroup=WEB, container=WEB_ID, n=6, size=400_000_000):
    """2.4 GB in a minute to dst (the kernel's per-destination byte counts)."""
    return [ev("flow.bytes", t, dst, daddr=dst, dport=443, bytes_out=size, cgroup=cgroup,
               container=container) for t in range(t0, t0 + 10 * n, 10)]


def _naming(found, dst, after=0.0):
    return [(t, f) for t, f in found if t >= after and dst in f.evidence["scope"].get("dst", [])]


# -- 1. a dynamic port to a known block ----------------------------------------------------

def _relay(port):
    """C2 through a relay in the cluster network: another tenant's pod (or any host in the
    node's own /16, 10.0.0.0/16, where the web kind's database lives) listens on `port`.
    The web process (an RCE in it, its own binary) checks in every ~5 s with a few hundred
    bytes and pulls tasks. Internal destinations are not beacon-scored (beacon.internal:
    false), so only the window models can see it."""
    evs = []
    for k in range(60):
        evs += connect(3101 + 5 * k + (k % 3) * 0.4, "10.0.77.7", port, size=600 + 7 * (k % 5))
    return evs


def test_a_c2_relay_on_a_dynamic_port_in_a_known_block_is_found(warmed):
    """Attack (container, since 27f0a3d): the same C2 relay as on port 4444, but listening
    on 45700. The web kind never reached a dynamic port, and 10.0.77.7's /16 is known (its
    database is 10.0.0.5): "a dynamic port to a known destination is no news", so the
    windows hold nothing never seen and require_novelty keeps every model quiet; the
    beacon scorer skips internal destinations. Before 27f0a3d the first dynamic port of a
    kind that never used one was a new port ("ephemeral") and the relay was found as on
    4444. Since the rule is about the /16, the dynamic range is a free pass to every
    block the kind knows: the cluster's pod /16, a cloud region block it shares with the
    attacker's rented host. Observed: nothing. Expected: found as on 4444; e.g. let a
    dynamic port be no news only where the kind already reached dynamic ports (the
    "ephemeral" port key known, as before) or only to an address (/32) it already
    reached, not to any host of a known /16."""
    eng = fresh(warmed)
    control = replay(eng, benign(41, 3000, 3500) + _relay(4444), 3000, 3500)
    assert _naming(control, "10.0.77.7"), "control: the relay on 4444 is found"
    eng = fresh(warmed)
    found = replay(eng, benign(41, 3000, 3500) + _relay(45700), 3000, 3500)
    assert _naming(found, "10.0.77.7"), \
        [f.evidence["summary"] for _, f in found] or eng.status()["volume_only"]


# -- 2. fresh destinations -------------------------------------------------------------------

def test_an_export_sent_by_a_sibling_container_of_the_same_kind_is_found(warmed, monkeypatch):
    """Attack (a tenant's pod with two containers, or two jobs of one kind; a host user's
    two session scopes alike): container A connects to DROP (its window is flagged, alone),
    and a minute later its sidecar B, of the same kind, sends 2.4 GB there. The block is
    known to the kind after A's persistence horizon (Workload.pending settles into the
    profile's known sets), but the "fresh" address that should keep those bytes new
    (eb6a563) is A's alone (Workload.fresh is per workload): B's upload is volume to a
    known block, require_novelty drops it. The same upload from A itself is found.
    Observed: nothing. Expected: found; e.g. keep fresh addresses per profile, where the
    known sets they shadow live."""
    setup = [_connect(3101, DROP)]
    sibling = [e for t in range(3000, 3300, 3) for e in connect(
        t, "10.0.0.5", 5432, cgroup=SIBLING_CG, container=SIBLING, size=1500)]
    eng = fresh(warmed)
    _clamp_tails(monkeypatch, eng)
    control = replay(eng, benign(42, 3000, 3300) + sibling + setup + _upload(3161), 3000, 3300)
    assert _naming(control, DROP, after=3161), "control: the upload from A is found"
    eng = fresh(warmed)
    found = replay(eng, benign(42, 3000, 3300) + sibling + setup + [
        _connect(3160, DROP, cgroup=SIBLING_CG, container=SIBLING)] + _upload(
        3161, cgroup=SIBLING_CG, container=SIBLING), 3000, 3300)
    assert _naming(found, DROP, after=3161), [f.evidence["summary"] for _, f in found]


def test_an_export_behind_64_addresses_of_its_own_block_is_found(warmed, monkeypatch):
    """Attack (container): in the window it first reaches DROP, the attacker also connects
    to 64 other addresses of DROP's /16 (its own block: one new block, the same novelty as
    DROP alone, a fan-out of 65 for one window). keep_fresh keeps the 64 latest fresh
    addresses (FRESH_MAX) and DROP, reached first, is dropped; a minute later (past the
    persistence horizon, the block known) its 2.4 GB are volume to a known block. With 63
    others it is found. Observed: nothing. Expected: found; e.g. keep fresh blocks, not
    addresses (one entry per never-seen block), or never evict an entry for an address of
    a block already fresh."""
    def setup(others):
        evs = [_connect(3101, DROP)]
        evs += [_connect(3101.2 + i * 0.01, f"203.0.{114 + i // 250}.{i % 250 + 1}", 443)
                for i in range(others)]
        return evs
    eng = fresh(warmed)
    _clamp_tails(monkeypatch, eng)
    control = replay(eng, benign(43, 3000, 3300) + setup(FRESH_MAX - 1) + _upload(3161),
                     3000, 3300)
    assert _naming(control, DROP, after=3161), "control: 63 others, the upload is found"
    eng = fresh(warmed)
    found = replay(eng, benign(43, 3000, 3300) + setup(FRESH_MAX) + _upload(3161), 3000, 3300)
    assert _naming(found, DROP, after=3161), [f.evidence["summary"] for _, f in found]


@pytest.mark.xfail(strict=True, reason="README limit: bytes to a block first reached count as "
                   "new for 10 min (anomaly FRESH_S) from the first contact; an export that "
                   "waits longer is volume to a known block, left to drift")
def test_an_export_that_waits_out_fresh_s_is_found(warmed, monkeypatch):
    """Attack (container): connect to DROP (flagged, alone), keep the connection idle for
    11 minutes, then send 2.4 GB over it. FRESH_S (600 s) is counted from the first
    contact and "not extended by traffic", so the first byte after it is volume to a known
    block: nothing, where the same upload 5 minutes after the connect is found. The
    attacker needs no skill, only patience (a staged miner alike: a probe of its pool,
    then the miner 11 minutes later). Observed: nothing. Expected: found; e.g. a fresh
    address stays fresh until the first window that carried bytes to it has been scored
    (bounded by FRESH_MAX and a longer age, say a day), so a start-up service's first
    upload still ends it."""
    eng = fresh(warmed)
    _clamp_tails(monkeypatch, eng)
    control = replay(eng, benign(44, 3000, 3900) + [_connect(3101, DROP)] + _upload(3401),
                     3000, 3900)
    assert _naming(control, DROP, after=3401), "control: 5 minutes later it is found"
    eng = fresh(warmed)
    found = replay(eng, benign(44, 3000, 3900) + [_connect(3101, DROP)] + _upload(3761),
                   3000, 3900)
    assert _naming(found, DROP, after=3761), [f.evidence["summary"] for _, f in found]


def test_an_export_after_a_decoy_network_finding_is_not_deduplicated(warmed, monkeypatch):
    """Attack (container): first a decoy: a couple of connections to a harmless block the
    kind never reached (a new package mirror) over two windows: a network finding whose
    investigation finds nothing. Two minutes later the export: connect to DROP (flagged,
    alone), and past the persistence horizon (its block known by then) 2.4 GB. Those
    windows are flagged for new_dst_bytes, but a fresh address is named nowhere in the
    window's "new" (exes, dsts, ports, listens), so the finding brings no news and the
    decoy's dedup entry (same workload, detector, "net" group, within dedup_s, no 100
    times lower tail) swallows it: dedup_s of silence bought with one harmless finding,
    what r7's "news" rule was meant to stop. Without the decoy the upload is found.
    Observed: deduplicated. Expected: found; e.g. the blocks of fresh addresses that
    carried bytes count as news in the window's "new" (and in the scope)."""
    decoy = [_connect(3101 + 4 * i, "151.101.9.9") for i in range(5)]
    export = [_connect(3221, DROP)] + _upload(3281)
    eng = fresh(warmed)
    _clamp_tails(monkeypatch, eng)
    control = replay(eng, benign(49, 3000, 3400) + export, 3000, 3400)
    assert _naming(control, DROP, after=3281), "control: without the decoy it is found"
    eng = fresh(warmed)
    found = replay(eng, benign(49, 3000, 3400) + decoy + export, 3000, 3400)
    assert _naming(found, "151.101.9.9"), "the decoy is a finding"
    assert _naming(found, DROP, after=3281), eng.counters["dedup.mahalanobis"]


def test_a_fast_upload_to_a_newly_reached_block_is_not_a_finding_every_window(warmed):
    """Benign (d: the same novelty reported again and again): a job sends its checkpoint to
    an object-store block it never reached, 200 MB/s for 5 minutes. The first window is a
    finding (new block, rightly); its block is then reported (no news to the kind), but
    the address is fresh, so every upload window has new_dst_bytes and is scored again,
    with a tail probability that underflows to 0.0. The dedup rule ("unless 100 times less
    likely": tail > last / 100) is false for 0.0 against 0.0, so mahalanobis raises a
    new finding every window: 30 for one upload (at 5 MB/s the tails stay above 0 and
    dedup holds; before eb6a563 the upload windows were volume alone). An attacker gets the
    same flood from its own container for free (alert fatigue). Expected: one finding per
    detector within dedup_s; e.g. a tail of 0.0 is no less likely than a last of 0.0
    (compare with <=, or in log space with a floor), and a reported block's fresh
    addresses add no news."""
    y = "52.95.110.1"
    up = [ev("flow.bytes", t, y, daddr=y, dport=443, bytes_out=1_000_000_000, cgroup=WEB,
             container=WEB_ID) for t in range(3102, 3400, 5)]
    eng = fresh(warmed)
    found = replay(eng, benign(45, 3000, 3500) + connect(3101, y, 443) + up, 3000, 3500)
    mine = [f for _, f in found
            if f.rule_id == "anomaly.mahalanobis" and f.entity == f"cgroup:{WEB}"]
    assert len(mine) == 1, (len(mine), eng.counters["dedup.mahalanobis"])


def test_held_windows_past_pending_max_still_settle(warmed, monkeypatch):
    """Config edge (low): persistence_k up to 32 is allowed (anomaly.persistence_k/m). With
    k=10 of m=12, a workload may have 9 flagged windows without a finding in one horizon,
    but Workload.pending keeps PENDING_MAX (8): the oldest held window is dropped, not
    settled, so what it saw is neither known nor held any more: never learned (news again
    whenever it comes back, a flagged window each time), against "known only if no
    finding came". Here 9 windows each reach one new block (a crawler's first minute): 8
    blocks become known after the horizon, the first does not. Expected: all 9; e.g. size
    the list by persistence_k (or merge the oldest entry into the next instead of dropping
    it)."""
    eng = fresh(warmed, persistence_k=10, persistence_m=12)
    _clamp_tails(monkeypatch, eng)
    evs = [e for i in range(9) for e in connect(3101 + 10 * i, f"{60 + i}.1.2.3", 443, size=900)]
    found = replay(eng, benign(50, 3000, 3600) + evs, 3000, 3600)
    assert not found, "no finding: 9 flagged windows, k=10"
    known = eng.profiles[eng.workloads[WEB_ID].profile].known.dsts
    assert not eng.workloads[WEB_ID].pending
    assert [b for b in (f"{60 + i}.1.0.0/16" for i in range(9)) if b not in known] == []


# -- state: snapshot / restore, bounds --------------------------------------------------------

def _restarted(snap, monkeypatch, first, t_restart, t_new=None):
    """A warmed engine that saw `first`, restarted at t_restart (snapshot, JSON, restore,
    times rebased onto the new clock, at t_new: the same clock by default; half a second
    of downtime)."""
    eng = fresh(snap)
    _clamp_tails(monkeypatch, eng)
    replay(eng, benign(46, 3000, t_restart) + first, 3000, t_restart)
    w = eng.workloads[WEB_ID]
    p = eng.profiles[w.profile]
    assert p.fresh and w.pending, "the first window was flagged and held"
    state = json.loads(json.dumps(eng.snapshot(wall_s=5000.0)))
    now = int((t_new or t_restart + 0.5) * S)
    back = AnomalyEngine.restore(config(), "node-1", state, now_mono_ns=now, now_wall_s=5000.5)
    assert set(back.profiles[w.profile].fresh) == set(p.fresh)
    assert [n for _, n in back.workloads[WEB_ID].pending] == [n for _, n in w.pending]
    return back


def test_holds_fresh_and_pending_survive_a_restart_mid_horizon(warmed, monkeypatch):
    """Holds: the agent restarts (snapshot, JSON, restore, times rebased) right after the
    flagged window of a first contact. The fresh address comes back: the export sent 50 s
    later (the block known by then) is found. The held block comes back: a miner whose
    stream goes on after the restart is found (the persistence flags, not in the
    snapshot, cost it at most a window)."""
    back = _restarted(warmed, monkeypatch, [_connect(3101, DROP)], 3111)
    found = replay(back, benign(47, 3111, 3300) + _upload(3161), 3111.5, 3300)
    assert _naming(found, DROP, after=3161)
    pool = "198.18.7.7"
    first = [ev("flow.connect", 3101.5, pool, daddr=pool, dport=3333, outcome="established",
                cgroup=WEB, container=WEB_ID, exe="/usr/bin/web", exe_id="8:1:100"),
             ev("flow.bytes", 3102, pool, daddr=pool, dport=3333, bytes_out=400, cgroup=WEB,
                container=WEB_ID)]
    back = _restarted(warmed, monkeypatch, first, 3111)
    stream = [ev("flow.bytes", t, pool, daddr=pool, dport=3333, bytes_out=400, cgroup=WEB,
                 container=WEB_ID) for t in range(3112, 3300, 5)]
    found = replay(back, benign(47, 3111, 3300) + stream, 3111.5, 3300)
    assert _naming(found, pool) and min(t for t, _ in _naming(found, pool)) - 3101 <= 40
    # a reboot: the new monotonic clock is at 200 s; the held block settles after the
    # horizon on the new clock and the fresh address still counts
    back = _restarted(warmed, monkeypatch, [_connect(3101, DROP)], 3111, t_new=200)
    found = replay(back, benign(48, 200, 400) + _upload(250), 200, 400)
    assert "203.0.0.0/16" in back.profiles[back.workloads[WEB_ID].profile].known.dsts
    assert not back.workloads[WEB_ID].pending
    assert _naming(found, DROP, after=250)


def test_holds_fresh_and_pending_stay_bounded_under_a_flood_of_new_blocks(warmed):
    """Holds (c): a container reaches 20 never-seen /16s every second for 5 minutes (6000
    blocks, ~30,000 addresses): fresh keeps FRESH_MAX blocks, pending at most
    max(PENDING_MAX, m + 1) windows (in practice the horizon's few), in memory and in the snapshot;
    once the flood stops the held windows settle."""
    eng = fresh(warmed)
    flood = [_connect(3100 + k / 20, f"{11 + (k // 250) % 200}.{k % 250}.{k % 7}.1", 443)
             for k in range(6000)]
    replay(eng, benign(48, 3000, 3500) + flood, 3000, 3500)
    w = eng.workloads[WEB_ID]
    p = eng.profiles[w.profile]
    assert len(p.fresh) <= FRESH_MAX and len(w.pending) <= max(PENDING_MAX, eng.persist_m + 1)
    snap = eng.snapshot()
    assert len(snap["profiles"][w.profile]["fresh"]) <= FRESH_MAX
    assert not w.pending, "settled after the horizon"
