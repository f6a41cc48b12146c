"""The node-day generator (swarmlab.nodeday): deterministic for a seed, events in the
shapes of CONTRACT11.md in time order, injections that leave the benign events as they
were, and ground truth that the events bear out."""
from __future__ import annotations

import re
import statistics
from collections import Counter

import pytest

from agent.sources.gpuproc import container_of
from swarmlab.nodeday import BEHAVIOURS, DAY_S, NodeDay

COMMON = {"pid", "uid", "comm", "cgroup_id", "cgroup", "container", "exe_id", "exe"}
FLOW = COMMON | {"daddr", "dport", "saddr", "sport", "family", "proto", "outcome"}
SHAPES = {   # kind -> (source, subject pattern, required fields)
    "flow.connect": ("activity", r"[0-9a-f.:]+", FLOW),
    "flow.close": ("activity", r"[0-9a-f.:]+", FLOW | {"bytes_out", "bytes_in", "duration_ns"}),
    "flow.listen": ("activity", r"tcp/\d+", COMMON | {"addr", "port", "family"}),
    "flow.bytes": ("activity", r"[0-9a-f.:]*", {"cgroup_id", "cgroup", "container", "daddr", "dport",
                                                 "proto", "bytes_out", "sends", "window_ns"}),
    "activity.exec_new": ("activity", r"pid:\d+", COMMON | {"exe_sha256"}),
    "activity.counts": ("activity", r"cgroup:/.*", {"cgroup_id", "cgroup", "container", "execs",
                                                     "window_ns"}),
    "proc.exec": ("bpf.proc", r"pid:\d+", COMMON | {"exe_sha256", "filename", "argv", "args"}),
    "gpu.process": ("gpu", r"pid:\d+", {"pid", "gpu_index", "used_memory_bytes", "cgroup", "container_id",
                                        "resolved", "uid", "exe", "comm"}),
    "gpu.usage": ("gpu", r"cgroup:/.*", {"cgroup", "container", "gpu_util", "gpu_memory_bytes",
                                         "authorized"}),
}
EXE_ID = re.compile(r"\d+:\d+:\d+")


@pytest.fixture(scope="module")
def benign():
    return list(NodeDay(seed=5, days=1, warmup_s=1800).events())


@pytest.fixture(scope="module")
def injected():
    day = NodeDay(seed=5, days=1, inject=BEHAVIOURS, warmup_s=1800)
    return list(day.events()), day.truth


def test_same_seed_same_events_other_seed_other_events():
    a = list(NodeDay(seed=11).events(hours=2))
    assert a == list(NodeDay(seed=11).events(hours=2))
    assert a != list(NodeDay(seed=12).events(hours=2))


def test_shapes_and_order(benign):
    last = 0
    kinds = Counter()
    for ev in benign:
        source, subject, fields = SHAPES[ev.kind]
        kinds[ev.kind] += 1
        assert ev.source == source and re.fullmatch(subject, ev.subject), ev
        assert fields <= set(ev.fields), (ev.kind, fields - set(ev.fields))
        assert ev.mono_ns >= last and ev.first_mono_ns <= ev.mono_ns, ev
        last = ev.mono_ns
        f = ev.fields
        if "exe_id" in f:
            assert EXE_ID.fullmatch(f["exe_id"]), f
        if "container" in f:     # the contract's "" outside a container
            assert f["container"] == (container_of(f["cgroup"]) or ""), f
        if ev.kind.startswith("flow.") and ev.kind != "flow.listen":
            assert f["daddr"] == ev.subject
        if ev.kind == "flow.connect":
            assert f["outcome"] in ("established", "refused", "failed")
        if ev.kind == "flow.close":
            assert f["duration_ns"] == ev.mono_ns - ev.first_mono_ns >= 0
    assert set(kinds) == set(SHAPES), kinds
    assert last <= NodeDay(seed=5).end_ns


def test_the_day_has_what_a_gpu_node_does(benign):
    training = {e.fields["container"] for e in benign if e.kind == "gpu.usage"}
    assert len(training) >= 2, "jobs end and new ones start in new containers"
    checkpoint = [e for e in benign if e.kind == "flow.bytes" and e.fields["bytes_out"] > 2**30]
    assert checkpoint and all(e.fields["container"] in training for e in checkpoint)
    udp = {(e.fields["dport"], e.fields["proto"]) for e in benign if e.kind == "flow.bytes"}
    assert {(123, "udp"), (53, "udp")} <= udp, "NTP and DNS"
    probes = [e.mono_ns for e in benign if e.kind == "flow.connect" and
              e.fields["cgroup"] == "/system.slice/kubelet.service" and e.fields["dport"] == 8000]
    gaps = [(b - a) / 1e9 for a, b in zip(probes, probes[1:])]
    assert len(probes) > 8000 and 9.9 < statistics.median(gaps) < 10.1, "liveness every 10 s"
    listens = [e for e in benign if e.kind == "flow.listen" and e.fields["port"] >= 32768]
    assert len(listens) >= 8, "NCCL listeners on ephemeral ports"
    cron = [e for e in benign if e.kind == "proc.exec" and e.fields["cgroup"] == "/system.slice/cron.service"]
    assert len(cron) > 24 * 6 * 3
    refused = [e for e in benign if e.kind == "flow.connect" and e.fields["outcome"] != "established"]
    assert len(refused) < 0.01 * len(probes) * 10


def test_injection_leaves_the_benign_events(benign, injected):
    events, truth = injected
    keep = ("flow.connect", "flow.close", "flow.listen", "proc.exec")
    a = [e for e in benign if e.kind in keep]
    b = [e for e in events if e.kind in keep and e.fields["pid"] < 700_000]
    assert a == b
    assert len(events) > len(benign)


def test_ground_truth(injected):
    events, truth = injected
    by = {b.name: b for b in truth}
    assert set(by) == set(BEHAVIOURS) and all(b.start_ns < b.end_ns for b in truth)
    assert by["low_and_slow"].start_s < 1800 and by["low_and_slow"].end_s > 3 * 3600
    assert all(b.start_s >= 1800 for b in truth if b.name != "low_and_slow")
    for name in ("beacon", "low_and_slow"):
        b = by[name]
        conns = [e for e in events if e.kind == "flow.connect" and e.subject == b.dst]
        assert conns and all(e.fields["cgroup"] == b.cgroup for e in conns)
        assert conns[0].first_mono_ns == b.start_ns
        gaps = [(y.first_mono_ns - x.first_mono_ns) / 1e9 for x, y in zip(conns, conns[1:])]
        assert statistics.pstdev(gaps) > 0.1 * statistics.mean(gaps), "jittered"
    b = by["exfil"]
    sent = sum(e.fields["bytes_out"] for e in events if e.kind == "flow.bytes" and e.subject == b.dst)
    assert 0.9 * 2**30 < sent < 4.4 * 2**30
    b = by["miner"]
    new = [e for e in events if e.kind == "activity.exec_new" and e.fields["exe_sha256"] == b.exe_sha256]
    assert len(new) == 1 and new[0].mono_ns == b.start_ns and new[0].fields["cgroup"] == b.cgroup
    assert any(e.kind == "gpu.process" and e.fields["pid"] == new[0].fields["pid"] for e in events)
    assert any(e.kind == "flow.connect" and e.subject == b.dst and e.fields["dport"] == b.dport
               for e in events)
    b = by["listener"]
    assert [e.mono_ns for e in events if e.kind == "flow.listen" and e.fields["pid"] >= 700_000] \
        == [b.start_ns]


def test_explicit_schedule_and_bad_names():
    day = NodeDay(seed=2, schedule=[(600.0, "beacon")])
    list(day.events(hours=0.5))
    assert [(b.name, b.start_s) for b in day.truth] == [("beacon", 600.0)]
    with pytest.raises(ValueError, match="unknown behaviour"):
        NodeDay(seed=2, inject=("worm",))
    with pytest.raises(ValueError):
        NodeDay(days=0)
    assert DAY_S == 86400.0


def test_a_redeployed_web_container_has_no_traffic_before_it_starts():
    """The load balancers and the workers reach the new container from its deploy on, the
    old one until then (a stream from the hour's start made it "first seen" before its own
    start, and the anomaly engine's image grace, rightly, did not apply)."""
    day = next(d for d in (NodeDay(s, 3) for s in range(1, 40)) if d.web.redeploys)
    deployed = day.web.redeploys[min(day.web.redeploys)]
    evs = list(day.events(hours=deployed // 3600 + 2))
    new = day.web.at(deployed + 1).container
    first = min(e.mono_ns for e in evs if (e.fields.get("container") or "") == new)
    assert first >= day.base_ns + int(deployed * 1e9)


def test_a_host_program_runs_the_file_it_was_at_that_time():
    """After an upgrade, every run of the path is of the new file, also a run in the
    same hour (a cron run generated before the upgrade's hour ran the replaced file after
    its replacement: the anomaly engine rightly took that for a new program)."""
    for seed in range(3, 40):     # (seed 3 is the first with one: each try is 3 node-days)
        day = NodeDay(seed, 3)
        evs = list(day.events())          # (one pass: the activities keep state)
        node = day.node
        upgraded = {p for p, versions in node.host_exes.items() if len(versions) > 1}
        if upgraded:
            break
    assert upgraded
    runs = 0
    for ev in evs:
        path = ev.fields.get("exe")
        if ev.kind == "proc.exec" and path in upgraded and not ev.fields.get("container"):
            t = (ev.mono_ns - day.base_ns) / 1e9
            assert ev.fields["exe_id"] == node.host_exe(path, t).exe_id, (path, t)
            runs += 1
    assert runs
