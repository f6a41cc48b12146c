"""Red team round 8 (anomaly engine: package-replaced binaries, ports of reported windows,
the beacon pair index). Each test fails while the hole is open and passes once it is
closed; the attack is in each docstring."""
from __future__ import annotations

import random

from agent.detect.anomaly import AnomalyEngine
from tests.unit.anomaly_stream import S, WEB, WEB_ID, config, connect, ev, replay

C2 = "104.16.200.5"          # a C2 fronted by a CDN block the job may well use anyway


def _slow_beacon(t0: float, t1: float, period: float = 300.0, **kw):
    """A 5-min check-in (+-20%) to the C2 from the web container's own binary."""
    r = random.Random(4)
    evs, t = [], t0
    while t < t1:
        evs += connect(t, C2, 443, size=int(r.gauss(600, 20)), **kw)
        t += period * r.uniform(0.8, 1.2)
    return evs


def _beacons(found):
    return [(t, f) for t, f in found if f.rule_id == "anomaly.beacon"
            and C2 in f.evidence["scope"].get("dst", [])]


def test_control_slow_beacon_alone_is_found():
    eng = AnomalyEngine(config(), "n")
    assert _beacons(replay(eng, _slow_beacon(300, 3600), 0, 3600, step=5.0))


def test_an_established_single_connection_flood_does_not_evict_the_beacon_before_its_second_check_in():
    """Attack (container root, no infrastructure): from the beacon's own container, one
    established TLS connect per second or so to ever-new addresses of a CDN's anycast range
    (any address in it answers on 443; 5/s, a tenth of the probe's per-cgroup cap), started
    before the 5-min beacon. Each flood connection is a one-connection pair; the per-workload
    quota (max_pairs/4 = 1024) evicts the workload's OLDEST one-connection pair first, and a
    beacon's pair is a one-connection pair until its second check-in: 1024 flood pairs
    (205 s) later it is gone, so no pair ever reaches min_conns and the beacon is never
    scored (beacon.py _make_room; its docstring says such a flood "evicts its own noise, not
    its beacon"). The flood is known /16, known port: require_novelty keeps the window
    models quiet too. Expected: the beacon is found as without the flood (e.g. evict a
    random one-connection pair, or remember evicted first connections compactly so a
    second connection still makes a pair)."""
    eng = AnomalyEngine(config(), "n")
    flood = []
    for k in range(int(3600 * 5)):
        ip = f"104.17.{(k >> 8) & 255}.{k & 255}"
        flood += connect(k / 5, ip, 443)
    found = replay(eng, _slow_beacon(300, 3600) + flood, 0, 3600, step=5.0)
    assert _beacons(found), f"status: {eng.status()['beacon_pairs']} pairs, " \
                            f"evicted {eng.beacon.evicted}"


SESSION = "/user.slice/user-1000.slice/session-7.scope"
USER_MGR = "/user.slice/user-1000.slice/user@1000.service/app.slice/run-r1f.scope"
CRON = "/system.slice/cron.service"


def _user_beacon(t0=300.0, t1=900.0):
    r = random.Random(3)
    evs, t = [], t0
    while t < t1:
        evs += connect(t, "203.0.113.7", 443, cgroup=SESSION, container="", exe="/tmp/.x",
                       exe_id="8:1:777", size=int(r.gauss(600, 20)))
        t += 5 * r.uniform(0.7, 1.3)
    return evs


def test_control_user_session_beacon_is_found():
    eng = AnomalyEngine(config(), "n")
    found = replay(eng, _user_beacon(), 0, 900)
    assert [t for t, f in found if f.rule_id == "anomaly.beacon" and t - 300 <= 60]


def test_one_unprivileged_user_cannot_make_its_c2_a_shared_destination():
    """Attack (non-root host account, no privilege at all): the implant beacons from the
    user's ssh session (session-7.scope); the user also touches the C2 once from a
    `systemd-run --user` scope (user@1000.service) and once from a crontab line (cron runs
    users' jobs in cron.service on Debian/Ubuntu). Those are three beacon keys
    (beacon_key: each unit its own), so the C2 has prevalence_max (3) "users" and is
    treated as a shared NTP/DNS-like destination: due() skips every pair to it, for as long
    as the `users` entry lives. Expected: one account's own units (one uid; or anything
    that is not a distinct container/tenant) count as one user, and the session's beacon
    is found as in the control."""
    evs = _user_beacon()
    evs += connect(100, "203.0.113.7", 443, cgroup=USER_MGR, container="", exe="/usr/bin/curl",
                   exe_id="8:1:50")
    evs += connect(120, "203.0.113.7", 443, cgroup=CRON, container="", exe="/usr/bin/curl",
                   exe_id="8:1:50")
    eng = AnomalyEngine(config(), "n")
    found = replay(eng, evs, 0, 900)
    assert [t for t, f in found if f.rule_id == "anomaly.beacon" and t - 300 <= 60]
