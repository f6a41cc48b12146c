"""Red team round 8 (anomaly engine: package-replaced binaries, ports of reported windows,
the beacon pair index). Each test fails while the hole is open and passes once it is
closed; the attack is in each docstring."""
from __future__ import annotations

import random

from agent.detect.anomaly import AnomalyEngine
from tests.unit.anomaly_stream import WEB, WEB_ID, config, connect, ev, replay

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
                       exe_id="8:1:777", size=int(r.gauss(600, 20)), uid=1000)
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
                   exe_id="8:1:50", uid=1000)
    evs += connect(120, "203.0.113.7", 443, cgroup=CRON, container="", exe="/usr/bin/curl",
                   exe_id="8:1:50", uid=1000)
    eng = AnomalyEngine(config(), "n")
    found = replay(eng, evs, 0, 900)
    assert [t for t, f in found if f.rule_id == "anomaly.beacon" and t - 300 <= 60]


ACME = "/system.slice/acme-agent.service"
APT = "/system.slice/apt-daily.service"
USER_SESSION = "/user.slice/user-1000.slice/session-4.scope"
OLD, NEW, DPKG = "ab" * 32, "ee" * 32, "dd" * 32


def _in_place_overwrite(user_dpkg: bool):
    from tests.unit.anomaly_stream import benign
    evs = benign(1, 0, 3600)
    evs.append(ev("proc.exec", 50, "pid:2", exe="/usr/bin/dpkg", exe_id="259:2:7",
                  exe_sha256=DPKG, cgroup=APT, uid=0))
    for t in range(100, 3000, 60):     # a vendor collector a root service runs each minute
        evs.append(ev("proc.exec", t, "pid:3", exe="/usr/lib/acme/collect", exe_id="259:2:100",
                      exe_sha256=OLD, cgroup=ACME, uid=0))
    if user_dpkg:                       # `dpkg -l` as the unprivileged user
        evs.append(ev("proc.exec", 3010, "pid:4", exe="/usr/bin/dpkg", exe_id="259:2:7",
                      exe_sha256=DPKG, cgroup=USER_SESSION, uid=1000))
    # the same inode (259:2:100), new content: written in place, not installed by a package
    evs.append(ev("proc.exec", 3100, "pid:3", exe="/usr/lib/acme/collect", exe_id="259:2:100",
                  exe_sha256=NEW, cgroup=ACME, uid=0))
    eng = AnomalyEngine(config(detectors=["mahalanobis", "beacon", "drift"]), "n")
    return eng, [(t, f) for t, f in replay(eng, evs, 0, 3600) if t >= 3100]


def test_control_in_place_overwrite_without_a_package_manager_run_is_found():
    _, found = _in_place_overwrite(False)
    assert found


def test_an_unprivileged_dpkg_query_does_not_launder_an_in_place_overwrite():
    """Attack (non-root host account, careless operator): a vendor tool under /usr/lib that a
    root service runs every minute is writable by the user (a vendor installer's 0777, a
    group-writable tree). The user overwrites it IN PLACE with a payload (same inode: it
    cannot rename into the root-owned directory), runs `dpkg -l` (any uid may; it is the
    node's known dpkg on the host), and waits for the service's next run. replaced.py takes
    the new content as the package manager's replacement (same path, same device, known old
    file, package manager since its last run) and makes its hash known node-wide: the
    payload, now running as root, is no new executable; the same overwrite without the
    `dpkg -l` is found at once (control). A package manager never writes a binary in place
    (dpkg/rpm write a new file and rename it: a new inode), and a dpkg run by uid 1000
    installs nothing. Expected: reported; e.g. require a new inode (exe_id differs from the
    old file's) and count only package-manager runs with uid/euid 0."""
    eng, found = _in_place_overwrite(True)
    assert found, f"replaced_exes={eng.status()['replaced_exes']}"


def _scan_then_pool(scan: bool):
    from tests.unit.anomaly_stream import benign
    evs = benign(1, 0, 3600)
    if scan:      # refused connects to ports 1..4000 of an internal host, in 4 s
        for p in range(1, 4001):
            evs.append(ev("flow.connect", 3100 + p / 1000, "10.0.0.9", daddr="10.0.0.9",
                          dport=p, outcome="refused", cgroup=WEB, container=WEB_ID,
                          exe="/usr/bin/web", exe_id="8:1:100"))
    # later: 4 MB to a stratum/exfil service on port 3333 of a host in a known block
    for k in range(20):
        evs += connect(3400 + k * 3, "10.0.3.3", 3333, size=200_000)
    eng = AnomalyEngine(config(detectors=["mahalanobis", "beacon", "drift"]), "n")
    return [(t, f) for t, f in replay(eng, evs, 0, 3600) if t >= 3400]


def test_control_a_new_service_port_is_found():
    assert _scan_then_pool(False)


def test_one_reported_port_scan_does_not_make_every_scanned_port_known():
    """Attack (container root): a port scan (4000 refused connects in 4 s) from the job's
    container. It is reported (new_ports), and since cfd4880 a reported window's ports all
    become known, to the profile (every container of the job's kind) and node-wide: one
    finding -- whose summary says "new_ports 50" -- silently turns off port novelty for
    4000 ports (and, past novelty_max, evicts the profile's real ports). Five minutes later
    the same container (or any sibling of its profile) sends 4 MB to port 3333 of a host
    in a block it already talks to: nothing (before cfd4880, and without the scan, it is
    found at once: the port stayed news). Expected: found; e.g. make a reported window's
    ports known only when few (a scan or fan-out keeps them news), only from established
    connections, or keyed with their destination block."""
    assert _scan_then_pool(True)
