"""The anomaly path end to end: a real agent (`swarm-agent run` in the lab's victim
namespace) with the real activity probe and the real anomaly engine, the CLI, and beacons
made by real processes in their own cgroup in the lab's namespaces.

No pre-training and no shortened warm-up: the engine runs with the shipped anomaly
settings. The window models (mahalanobis, drift) stay in shadow during their one-hour
warm-up; the beacon scorer learns nothing, so it alerts from the start -- that is what
this test drives. The beacon destinations are documentation addresses (198.51.100.7 and
.8, TEST-NET-2) put on the attacker namespace's loopback, so they count as external (the
scorer leaves RFC 1918 destinations alone by default) and nothing outside the lab is ever
contacted.

- a beacon with jitter (a connection every 1.2 s +-10%, 200 bytes each, the last one held
  open) to dst1:7001 opens an escalated suspicious_activity investigation whose evidence
  holds the beacon's process and its open connection;
- resolving it as a false positive (default scope: that destination, /32) stops the same
  pattern (the same workload beaconing to dst1 on another port) from alerting -- counted
  as suppressed -- while a beacon to dst2 from the same workload still alerts;
- a restart keeps the model (status says "restored", the beacon pairs are there) and the
  feedback (listed, and it still suppresses a beacon to dst1);
- reverting the feedback brings the alert back.

The probe is host-global: every assertion is about incidents and counters of the test's
own cgroup (swa-anb-<random>) and destinations. Each beacon is 8 connections; the servers
are killed and the cgroup emptied at the end.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swarmlab.breachlab import cgroup_path, throwaway_cgroup
from swarmlab.lab import sh, spawn_in, wait_for
from swarmlab.scenario import AgentProcess
from swarmlab.sink import SINK
from tests.integration.test_investigation_e2e import cli

pytestmark = pytest.mark.privileged
DST1, DST2 = "198.51.100.7", "198.51.100.8"
PORTS = (7001, 7002, 7003, 7004)
CONNS, PERIOD_S = 8, 1.2
DETECT_S = 25           # 8 connections (~8.5 s) plus the tick, on a busy machine

# Check-ins: connect, send 200 bytes, keep the socket until the next check-in; the last
# one stays open for `hold` seconds (the evidence sees it).
BEACON = """
import random, socket, sys, time
dst, port, n, period, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \\
    float(sys.argv[4]), float(sys.argv[5])
rng, prev = random.Random(port), None
for i in range(n):
    s = socket.create_connection((dst, port), timeout=5)
    s.sendall(b"c" * 200)
    if prev is not None:
        prev.close()
    prev = s
    if i < n - 1:
        time.sleep(period * rng.uniform(0.9, 1.1))
print("done", flush=True)
time.sleep(hold)
"""


def counter(agent: AgentProcess, name: str) -> int:
    return int(cli(agent, "status")["counters"].get(name, 0))


def anomaly_line(agent: AgentProcess) -> dict:
    return [p for p in cli(agent, "status")["probes"] if p["name"] == "anomaly"][0]


def mine(agent: AgentProcess, entity: str) -> list[dict]:
    return [i for i in cli(agent, "incidents")
            if i["event_class"] == "suspicious_activity" and i["entity"] == entity]


def beacon(lab, cg: Path, dst: str, port: int, hold_s: float = 0.0) -> subprocess.Popen:
    return spawn_in(lab.victim, sys.executable, "-c", BEACON, dst, str(port), str(CONNS),
                    str(PERIOD_S), str(hold_s), cgroup=cg)


def finish(*procs: subprocess.Popen) -> None:
    for p in procs:
        assert p.stdout.readline().strip() == "done"
        p.wait(10)


@pytest.fixture
def agent(lab, tmp_path):
    proc = AgentProcess(lab.victim, tmp_path, "investigation: {refresh_s: 3600}\n")
    proc.start()
    status = cli(proc, "status")
    if not any(p["name"].startswith("activity") or "activity" in p["name"]
               for p in status["probes"] if p.get("state") == "loaded"):
        proc.stop()
        from tests.conftest import skip_unsupported
        skip_unsupported(f"the activity probe does not run here: {status['probes']}")
    yield proc
    proc.stop()


def test_beacon_investigation_feedback_restart_and_revert(lab, agent):
    for dst in (DST1, DST2):
        sh("ip", "addr", "add", f"{dst}/32", "dev", "lo", ns=lab.attacker)
    server = spawn_in(lab.attacker, sys.executable, "-c", SINK, "0.0.0.0", "300", *map(str, PORTS))
    try:
        assert server.stdout.readline().strip() == "ready"
        with throwaway_cgroup("swa-anb") as cg:
            run(lab, agent, cg)
    finally:
        server.kill()
        server.wait(10)


def run(lab, agent, cg: Path) -> None:
    entity = f"cgroup:{cgroup_path(cg)}"
    c = cli(agent, "status")["counters"]
    assert int(c["anomaly.beacon.alerting"]) == 1
    assert int(c["anomaly.mahalanobis.alerting"]) == 0     # warming up: shadow
    assert "fresh start" in anomaly_line(agent)["reason"]

    # 1. A beacon with jitter: an escalated investigation, with its evidence.
    b = beacon(lab, cg, DST1, 7001, hold_s=60)
    started = time.monotonic()
    try:
        [inc] = wait_for(lambda: mine(agent, entity), DETECT_S, 0.5)
        assert time.monotonic() - started < DETECT_S
        assert inc["state"] == "escalated" and inc["rules"] == ["anomaly.beacon@1"]
        detail = wait_for(lambda: _with_evidence(cli(agent, "incident", inc["id"])), 10, 0.5)
        assert detail.get("mitigations", []) == []        # investigations mitigate nothing
        ev = [e for e in detail["timeline"] if e["kind"] == "evidence"]
        bundle = json.loads(ev[0]["data_json"])
        assert cgroup_path(cg) in bundle["targets"]["cgroups"]
        procs = {p["pid"]: p for p in bundle["processes"]}
        assert b.pid in procs and procs[b.pid]["cgroup"] == cgroup_path(cg)
        conns = [s for s in bundle["connections"] if s["pid"] == b.pid]
        assert any((s["remote"], s["remote_port"]) == (DST1, 7001) for s in conns), conns
        human = cli(agent, "incident", inc["id"][:12], json_out=False)
        assert DST1 in human and "beacon" in human
    finally:
        b.kill()
        b.wait(10)

    # 2. A false positive, default scope: the destination.
    done = cli(agent, "resolve", inc["id"][:12], "--false-positive", "--comment", "our CI")
    assert done["state"] == "false_positive"
    [rec] = done["feedback"]
    assert (rec["rule"], rec["scope_kind"], rec["scope_value"], rec["action"]) == \
        ("anomaly.beacon", "address", f"{DST1}/32", "suppress")

    # 3. The same pattern (same workload, dst1, another port) is suppressed while a beacon
    #    to dst2 still alerts; both run at once.
    hits = counter(agent, "findings.anomaly.beacon@1")
    same, other = beacon(lab, cg, DST1, 7002), beacon(lab, cg, DST2, 7001)
    finish(same, other)
    wait_for(lambda: counter(agent, "findings_suppressed.anomaly.beacon@1") >= 1, 10, 0.5)
    live = wait_for(lambda: [i for i in mine(agent, entity) if i["state"] == "escalated"],
                    10, 0.5)
    assert len(live) == 1 and live[0]["id"] != inc["id"]
    assert counter(agent, "findings.anomaly.beacon@1") == hits + 2
    assert counter(agent, "findings_suppressed.anomaly.beacon@1") == 1

    # 4. A restart keeps the model and the feedback.
    scored = counter(agent, "anomaly.beacon.windows")
    agent.stop()
    agent.start()
    line = anomaly_line(agent)
    assert "restored" in line["reason"] and "fresh start" not in line["reason"], line
    assert counter(agent, "anomaly.beacon.windows") >= scored > 0   # what it scored
    listed = cli(agent, "feedback")
    assert [r["id"] for r in listed] == [rec["id"]] and int(listed[0]["hits"]) >= 1
    finish(beacon(lab, cg, DST1, 7003))
    wait_for(lambda: counter(agent, "findings_suppressed.anomaly.beacon@1") >= 1, 10, 0.5)
    assert counter(agent, "findings.anomaly.beacon@1") == 1

    # 5. Reverting the feedback brings the alert back (it joins the live dst2 incident).
    reverted = cli(agent, "feedback", "revert", rec["id"][:12], "--comment", "not CI after all")
    assert not reverted["live"] and cli(agent, "feedback") == []
    finish(beacon(lab, cg, DST1, 7004))
    wait_for(lambda: counter(agent, "findings.anomaly.beacon@1") >= 2, 10, 0.5)
    assert counter(agent, "findings_suppressed.anomaly.beacon@1") == 1
    escalated = [i for i in mine(agent, entity) if i["state"] == "escalated"]
    assert escalated and all(i["rules"] == ["anomaly.beacon@1"] for i in escalated)


def _with_evidence(detail: dict) -> dict | None:
    return detail if any(e["kind"] == "evidence" for e in detail["timeline"]) else None
