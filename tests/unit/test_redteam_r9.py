"""Red team r9: the three exemptions of 458ba6c (what a finding reported is no news where
it was reported; rotating host services; a new container's image grace) probed as an
attacker who controls a container, a tenant who can start containers, or a non-root host
account. Each test fails on 458ba6c and states what should happen instead."""
from __future__ import annotations

import json

import pytest

from agent.detect.anomaly import AnomalyEngine
from tests.unit.anomaly_stream import (CRON, WEB, WEB_ID, beacon, benign, config, connect, ev,
                                       replay)


@pytest.fixture(scope="module")
def warmed():
    """50 benign minutes (warm-up 20): WEB's kind and CRON are modelled."""
    eng = AnomalyEngine(config(), "node-1")
    replay(eng, benign(1, 0, 3000), 0, 3000)
    return eng.snapshot()


def fresh(snap, **over):
    return AnomalyEngine.restore(config(**over), "node-1", json.loads(json.dumps(snap)))


def _shas(found, entity=None):
    return {s for _, f in found if entity is None or f.entity == entity
            for s in f.evidence["scope"].get("exe_sha256", [])}


def _exec(t, sha, cgroup, container, exe="/tmp/xmrig", exe_id="8:1:4242", pid=66):
    return ev("proc.exec", t, f"pid:{pid}", exe=exe, exe_id=exe_id, exe_sha256=sha,
              cgroup=cgroup, container=container)


def _web_only(events, keep_web=True):
    return [e for e in events if (e.fields.get("container") == WEB_ID) is keep_web]


MINER = "d1" * 32


def test_any_tenants_new_container_gets_the_grace_and_its_miner_is_no_news(warmed):
    """Attack: a tenant who can start containers starts a container of its own image (a
    different pod, nothing to do with the modelled job) whose entrypoint runs /tmp/xmrig.
    profile_of replaces pod uids and container ids, so every pod of the QoS class (every
    docker-*.scope on a docker host) is one "kind": once any container has been modelled
    for 30 windows, *every* new container is "a new container of a kind already
    modelled" and its first 120 s of programs -- here a binary never seen on this node,
    from /tmp -- are no news. Controls: the image and the start time.
    Instead: a program never seen on this node (at least one from a writable path such as
    /tmp, /dev/shm, memfd, a volume) run by a new container is news (anomaly.newexe);
    grace at most for programs of the container's own job (same image / same workload
    name), not for any pod that shares the cgroup pattern."""
    eng = fresh(warmed)
    other = "c" * 24
    cg = WEB.replace("pod1", "pod7").replace(WEB_ID, other)     # another tenant's pod
    evs = benign(2, 3000, 3400) + [
        e for t in range(3200, 3260, 5) for e in connect(t, "10.0.0.5", 5432, cgroup=cg,
                                                         container=other, size=500)]
    evs.append(_exec(3205, MINER, cg, other))
    found = replay(eng, evs, 3000, 3400)
    assert MINER in _shas(found), [f.evidence["summary"] for _, f in found]


def test_a_programme_learned_in_a_siblings_grace_is_no_news_to_a_running_container(warmed):
    """Attack: the attacker holds a long-running job container (WEB, running since t=0)
    and can start one more container (a tenant, or a CronJob/Job in its namespace). The
    new container runs the dropped /tmp/xmrig inside its 120 s grace: the grace makes it
    known to the whole profile. Then the long-running container runs the same binary --
    exactly "a program first run later (dropped into a running job)", which the README
    says is news -- and nothing is reported anywhere.
    Instead: what the grace accepted is known at most to container *starts* of the kind
    (or to that container alone), never to a container already running past its grace; the
    running container's first run of it is news."""
    eng = fresh(warmed)
    sib = "b" * 24
    cg = WEB.replace("pod1", "pod2").replace(WEB_ID, sib)
    evs = benign(3, 3000, 3600) + [
        e for t in range(3200, 3260, 5) for e in connect(t, "10.0.0.5", 5432, cgroup=cg,
                                                         container=sib, size=500)]
    evs.append(_exec(3205, MINER, cg, sib))             # in the sibling's grace
    evs.append(_exec(3450, MINER, WEB, WEB_ID, pid=67))  # the running job, much later
    found = replay(eng, evs, 3000, 3600)
    # The sibling's run of it is reported (a dropped /tmp binary gets no grace); the
    # running container's later run is then no news to the kind (its investigation names
    # the binary), and the grace taught the kind nothing.
    sib_cg = f"cgroup:{cg}"
    assert MINER in _shas(found, sib_cg), [f.evidence["summary"] for _, f in found]
    assert "sha256:" + MINER not in eng.profiles[eng.workloads[WEB_ID].profile].known.exes


def test_restarting_ones_own_container_buys_a_fresh_grace(warmed):
    """Attack: the attacker in the running WEB container drops /data/.k on the pod's
    volume, then kills its PID 1. The kubelet restarts the container in the same pod with a
    new container id: a new workload, first seen long after the agent started, of a
    modelled kind, so the dropped binary run at start is taken for the image's and is no
    news (and is known to the kind from then on). Controls: the container's process tree
    (crash it) and a writable volume.
    Instead: a restart in the same pod (the same pod cgroup already modelled) is not a new
    job version and gets no grace: its never-seen program is news."""
    eng = fresh(warmed)
    new_id = "9" * 24                      # same pod1, a new container id
    cg = WEB.replace(WEB_ID, new_id)
    evs = benign(4, 3000, 3200) + [       # WEB runs until 3200, then is restarted
        e for e in _web_only(benign(5, 3200, 3600), keep_web=True)
        for e in [_reattach(e, cg, new_id)]] + _web_only(benign(5, 3200, 3600), False)
    evs.append(_exec(3210, MINER, cg, new_id, exe="/data/.k"))
    found = replay(eng, evs, 3000, 3600)
    assert MINER in _shas(found), [f.evidence["summary"] for _, f in found]


def _reattach(e, cgroup, container):
    f = dict(e.fields, cgroup=cgroup, container=container)
    return type(e)(kind=e.kind, subject=e.subject, mono_ns=e.mono_ns,
                   first_mono_ns=e.first_mono_ns, fields=f, source=e.source)


def test_an_evicted_idle_container_comes_back_with_a_fresh_grace(warmed):
    """Attack: the attacker's long-running container goes quiet; a tenant (or a host user
    spawning scopes) starts short-lived workloads until max_workloads evicts the idle one.
    When the attacker's container speaks again it is re-created as a *new* workload
    (first_ns = now), "first seen" long after the agent started: the binary it drops and
    runs within 120 s is taken for its image's. Controls: its own idleness and the number
    of workloads.
    Instead: the grace belongs to a container that is new, not to one the engine forgot
    (keep first-seen times of evicted containers, e.g. a bounded id -> first_ns memory, or
    give no grace to a workload recreated after eviction)."""
    eng = fresh(warmed, max_workloads=3)
    quiet = _web_only(benign(6, 3000, 3600), keep_web=False)       # WEB silent 3000-3300
    tenants = []
    for i, t0 in enumerate((3010, 3030, 3050)):
        cid = f"{i + 1}" * 24
        cg = WEB.replace("pod1", f"pod{i + 3}").replace(WEB_ID, cid)
        tenants += [e for t in range(t0, t0 + 10, 2)
                    for e in connect(t, "10.0.0.5", 5432, cgroup=cg, container=cid, size=300)]
    back = _web_only(benign(7, 3300, 3600), keep_web=True)
    evs = quiet + tenants + back + [_exec(3310, MINER, WEB, WEB_ID, exe="/tmp/.k")]
    found = replay(eng, evs, 3000, 3600)
    assert eng.counters["workloads_evicted"] >= 1
    assert MINER in _shas(found), [f.evidence["summary"] for _, f in found]


def test_a_failed_connect_flood_evicts_reported_news_and_the_node_learns_the_miner(warmed):
    """Attack: the attacker in WEB runs its miner once (reported: anomaly.newexe; the
    binary becomes known to WEB's profile and is kept news node-wide by
    engine.reported_news, a Novelty of novelty_max=4096). It then sends failed connects to
    6000 never-seen /16s over two windows (a scan: more findings) -- every one of them is
    added to reported_news, evicting the miner. The next quiet window in which WEB runs the
    miner commits it to the *node's* known executables; from then on the miner in any
    other kind is only "new here", never "never seen on this node": anomaly.newexe is
    silent. Controls: its own container's connects.
    Instead: a finding's many destinations must not evict what earlier findings reported
    (cap what one window adds, as for ports, or keep executables in their own reported
    set); the miner stays unknown to the node and anomaly.newexe fires for CRON."""
    eng = fresh(warmed, detectors=["newexe", "mahalanobis", "drift"])
    sha = "e7" * 32
    first = replay(eng, benign(8, 3000, 3300) + [_exec(3105, sha, WEB, WEB_ID)], 3000, 3300)
    assert sha in _shas(first)
    flood = [ev("flow.connect", 3401 + 20 * (i // 3000) + i % 3000 * 0.001,
                f"{11 + i // 256}.{i % 256}.1.1", daddr=f"{11 + i // 256}.{i % 256}.1.1",
                dport=443, outcome="failed", cgroup=WEB, container=WEB_ID, exe="/tmp/xmrig",
                exe_id="8:1:4242", exe_sha256=sha) for i in range(6000)]   # two windows
    again = [_exec(3505, sha, WEB, WEB_ID, pid=68)]
    replay(eng, benign(9, 3300, 3600) + flood + again, 3300, 3600)
    assert f"sha256:{sha}" not in eng.profiles["node"].known.exes
    cron = [_exec(3705, sha, CRON, "", pid=69)]
    later = replay(eng, benign(10, 3600, 3900) + cron, 3600, 3900)
    assert any(f.rule_id == "anomaly.newexe" and f.entity == f"cgroup:{CRON}"
               for _, f in later), [f.evidence["summary"] for _, f in later]


def test_a_user_unit_named_like_resolved_is_no_rotating_service():
    """Attack: a non-root host account runs its implant as a user unit named like the
    resolver: `systemd-run --user --unit=systemd-resolved ./c2`. Its cgroup is
    /user.slice/user-1000.slice/user@1000.service/app.slice/systemd-resolved.service,
    whose last component is what config.rotating_ports matches, so its C2 on port 53 to a
    never-seen server is neither news nor beacon-scored. Controls: a user unit's name.
    Instead: only the system's units are rotating services (cgroup
    /system.slice/UNIT, not under user.slice or a user manager; uid 0 or the service's
    own), so the beacon is found."""
    unit = "/user.slice/user-1000.slice/user@1000.service/app.slice/systemd-resolved.service"
    eng = AnomalyEngine(config(detectors=["mahalanobis", "beacon", "drift"]), "n")
    evs = benign(11, 0, 2400) + beacon(12, 1200, 2400, port=53, dst="203.0.113.53",
                                       cgroup=unit, container="", uid=1000)
    found = replay(eng, evs, 0, 2400)
    assert [f for _, f in found if f.entity == f"cgroup:{unit}"], \
        "a user's unit named systemd-resolved.service beacons on 53 unseen"
