"""The streaming detectors and the calibration on known distributions."""
from __future__ import annotations

import random

import pytest

from agent.detect.anomaly.calibrate import Calibrator
from agent.detect.anomaly.detectors import (HalfSpaceTrees, Loda, RobustMahalanobis, Stats,
                                            drivers)
from agent.detect.anomaly.features import (DIM, INDEX, Known, Novelty, Window,
                                            login_program, profile_of, prefix)


def normal_window(r: random.Random) -> list[float]:
    # Busy features that move together (connections and bytes), idle ones at 0.
    base = r.gauss(0.35, 0.03)
    x = [0.0] * DIM
    x[INDEX["conns"]] = base
    x[INDEX["fanout"]] = 0.1 + r.gauss(0, 0.01)
    x[INDEX["egress_bytes"]] = base * 1.2 + r.gauss(0, 0.01)
    x[INDEX["execs"]] = max(0.0, r.gauss(0.05, 0.02))
    return x


def make(name):
    return {"mahalanobis": lambda: RobustMahalanobis(),
            "hst": lambda: HalfSpaceTrees(16, 10, 500, 1),
            "loda": lambda: Loda(32, 500, 1),
            "zscore": lambda: Stats()}[name]()


@pytest.mark.parametrize("name", ["mahalanobis", "hst", "loda", "zscore"])
def test_detector_scores_an_outlier_above_normal_windows(name):
    r = random.Random(1)
    det = make(name)
    for _ in range(1500):
        det.learn(normal_window(r))
    normal = sorted(det.score(normal_window(r)) for _ in range(1000))
    odd = normal_window(r)
    odd[INDEX["new_exes"]] = 0.25           # one executable never seen
    odd[INDEX["new_dst_bytes"]] = 0.5       # bytes to a destination never seen
    assert det.score(odd) > normal[-1], name
    top = drivers(det.score, odd, [0.0] * DIM)[0]["feature"]
    assert top in ("new_exes", "new_dst_bytes"), (name, top)


def test_mahalanobis_sees_features_that_break_their_relation():
    r = random.Random(2)
    det = RobustMahalanobis()
    for _ in range(2000):
        det.learn(normal_window(r))
    normal = sorted(det.score(normal_window(r)) for _ in range(1000))
    odd = normal_window(r)
    odd[INDEX["egress_bytes"]] = odd[INDEX["conns"]] * 1.2 + 0.3    # bytes up, conns not
    assert det.score(odd) > normal[-1]


def test_mahalanobis_is_not_dragged_by_outliers_it_learns():
    r = random.Random(3)
    det = RobustMahalanobis()
    for i in range(2000):
        x = normal_window(r)
        if i % 50 == 0:
            x[INDEX["failed"]] = 1.0     # 2% wild windows
        det.learn(x)
    assert det.mean[INDEX["failed"]] < 0.02


@pytest.mark.parametrize("dist", ["exponential", "normal", "lognormal"])
@pytest.mark.parametrize("rate", [1e-3, 1e-4])
def test_calibrated_threshold_gives_the_asked_false_alarm_rate(dist, rate):
    r = random.Random(4)
    draw = {"exponential": lambda: r.expovariate(1.0), "normal": lambda: r.gauss(0, 1),
            "lognormal": lambda: r.lognormvariate(0, 0.5)}[dist]
    cal = Calibrator()
    for _ in range(20000):
        cal.add(draw())
    cal.refit()
    thr = cal.threshold(rate)
    n = 200_000
    observed = sum(draw() > thr for _ in range(n)) / n
    # Never far above the asked rate; below it by at most 15 times (the tail fit does not
    # fit shapes under 0: for light tails it is conservative).
    assert rate / 15 <= observed <= rate * 3, (dist, rate, observed, thr)
    assert cal.tail(thr) == pytest.approx(rate, rel=0.05)


def test_calibrator_state_is_bounded_and_round_trips():
    r = random.Random(5)
    cal = Calibrator()
    for _ in range(25000):          # the peaks reach their cap of 600 by ~20,000
        cal.add(r.expovariate(1.0))
    d = cal.dump()
    assert len(d["sample"]) <= 2000 and len(d["peaks"]) <= 600
    back = Calibrator(d)
    assert back.threshold(1e-4) == pytest.approx(cal.threshold(1e-4), rel=1e-3)


def test_novelty_set_is_bounded():
    s = Novelty(4)
    for k in "abcdef":
        s.add(k)
    assert len(s) == 4 and "a" not in s and "f" in s and s.evicted == 2


def test_profiles_and_prefixes():
    assert profile_of("/kubepods.slice/kubepods-besteffort-pod3f2a1b4c_5d6e_4f70_8a9b_"
                      "0c1d2e3f4a5b.slice/cri-containerd-" + "ab" * 32 + ".scope") == \
        "/kubepods.slice/kubepods-besteffort-pod*.slice/cri-containerd-*.scope"
    assert profile_of("/system.slice/cron.service") == "/system.slice/cron.service"
    assert prefix("203.0.113.7") == "203.0.0.0/16"
    assert prefix("2001:db8:1:2::1") == "2001:db8::/32"


def _ports(known_dsts: list[str], known_ports: list[str], connects,
           listens: tuple[str, ...] = ("4/ephemeral",)) -> tuple[float, list]:
    known = Known(64, {"dsts": known_dsts, "ports": known_ports, "listens": list(listens)})
    w = Window()
    for dst, port in connects:
        w.add("flow.connect", {"daddr": dst, "dport": port, "outcome": "established"}, dst)
    raw, new = w.vector(known, Known(64), False)
    return raw[INDEX["new_ports"]], new["ports"]


def test_a_dynamic_port_is_news_only_to_a_never_seen_destination_of_a_peer_to_peer_kind():
    # a known peer's NCCL port, from a kind that listens on dynamic ports itself (a job's
    # first peers, a crashed job's ranks reconnecting)
    assert _ports(["10.8.0.0/16"], ["443"], [("10.8.3.4", 45123)]) == (0, [])
    # a kind that never listened on one: a relay in its known block on 45700 is news
    assert _ports(["10.8.0.0/16"], ["443"], [("10.8.3.4", 45123)], listens=("4/8080",)) == \
        (1, ["ephemeral"])
    # the same port number to a never-seen destination: news, besides new_dsts
    assert _ports(["10.8.0.0/16"], ["443"], [("203.0.113.9", 45123)]) == (1, ["ephemeral"])
    # a service port is news to a known destination too (ssh to a known peer)
    assert _ports(["10.8.0.0/16"], ["443"], [("10.8.3.4", 22)]) == (1, ["22"])


def _here(cgroup: str, exe: str, container: str = "") -> float:
    key = {"exe": exe, "exe_id": "259:2:77", "exe_sha256": "c3" * 32, "uid": 1000,
           "cgroup": cgroup, "container": container}
    node = Known(64, {"exes": ["sha256:" + "c3" * 32]})      # the node ran it (cron, a unit)
    w = Window()
    w.add("proc.exec", key, "pid:9", login=login_program(key))    # as the engine does
    raw, _ = w.vector(Known(64), node, False)
    return raw[INDEX["new_exes_here"]]


def test_a_login_sessions_package_program_the_node_knows_is_no_news_to_it():
    session = "/user.slice/user-1000.slice/session-7.scope"
    assert _here(session, "/usr/bin/crictl") == 0          # a person's choice at a shell
    assert _here(session, "/home/op/bin/crictl") == 1       # not a package's file
    assert _here("/user.slice/user-1000.slice/user@1000.service/app.slice/x.service",
                 "/usr/bin/crictl") == 1                      # a user's unit, no login shell
    web = "/kubepods.slice/kubepods-pod1.slice/cri-containerd-" + "a" * 24 + ".scope"
    assert _here(web, "/usr/bin/crictl", container="a" * 24) == 1   # a container: news
