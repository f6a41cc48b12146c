"""The anomaly path end to end, against a real agent (`swarm-agent run` in the lab's victim
namespace) with its real activity probe, the real anomaly engine and the CLI:

- a beacon (a process in its own cgroup opening a TCP connection to an address in the
  attacker namespace every ~1.2 s +- 15 %) becomes an escalated suspicious_activity
  investigation (rule anomaly.beacon) whose evidence holds the beacon's process and its
  recent connections, as the kernel reported them;
- marking it a false positive (default scope: that destination, /32) stops the same
  pattern from alerting, while a beacon to another address from the same workload still
  does;
- a restart keeps the model (status: restored, not a fresh start) and the feedback (the
  pattern still does not alert);
- reverting the feedback brings the alert back.

The beacon detector learns nothing (no warm-up), so the test needs no pre-trained state;
the lab's addresses are private ones, which the shipped config never scores as beacons
(kubelet probes, scrapes), so the test's config sets `beacon.internal: true`, and
`dedup_s: 2` so that each run of the same pair may alert again. Findings are matched to
the test's own cgroup (the probe sees the host's other tests too).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from swarmlab.breachlab import cgroup_path, throwaway_cgroup
from swarmlab.lab import sh, spawn_in, wait_for
from swarmlab.scenario import AgentProcess
from tests.integration.nftlab import listener

pytestmark = pytest.mark.privileged
PORT = 9443
CONFIG = ("anomaly: {dedup_s: 2, beacon: {internal: true, min_conns: 6}}\n"
          "investigation: {refresh_s: 3600}\n")
# Connect every ~1.2 s +- 15 %, `count` times, to argv[1]:PORT; each connection is closed
# at once (the peer's banner read or not).
BEACON = """
import random, socket, sys, time
for _ in range(int(sys.argv[2])):
    try:
        s = socket.create_connection((sys.argv[1], %d), timeout=2); s.close()
    except OSError:
        pass
    time.sleep(1.2 * random.uniform(0.85, 1.15))
""" % PORT


def cli(agent: AgentProcess, *args: str, json_out: bool = True):
    exe = str(Path(shutil.which("swarm-agent") or ".venv/bin/swarm-agent"))
    cmd = [exe, *args, *(["--json"] if json_out else []), "--config", str(agent.config_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout) if json_out else proc.stdout


def beacon(lab, cg: Path, dst: str, count: int = 9) -> int:
    p = spawn_in(lab.victim, sys.executable, "-c", BEACON, dst, str(count), cgroup=cg)
    pid = p.pid
    p.wait(30)
    return pid


def ours(agent: AgentProcess, entity: str) -> list[dict]:
    return [i for i in cli(agent, "incidents") if i["event_class"] == "suspicious_activity"
            and i["entity"] == entity]


def counter(agent: AgentProcess, name: str) -> int:
    return int(cli(agent, "status")["counters"].get(name, 0))


@pytest.fixture
def agent(lab, tmp_path):
    proc = AgentProcess(lab.victim, tmp_path, CONFIG)
    proc.start()
    probes = {p["name"]: p for p in cli(proc, "status")["probes"]}
    if probes.get("activity", {}).get("state") not in ("loaded", "ok", "degraded"):
        proc.stop()
        from tests.conftest import skip_unsupported
        skip_unsupported(f"the activity probe does not run here: {probes.get('activity')}")
    yield proc
    proc.stop()


def test_beacon_investigation_false_positive_restart_and_revert(lab, agent):
    primary, other = lab.addr("attacker"), f"10.{lab.subnet}.0.3"
    sh("ip", "addr", "add", f"{other}/24", "dev", "a0", ns=lab.attacker)
    with listener(lab.attacker, "0.0.0.0", PORT), throwaway_cgroup("swa-anb") as cg:
        entity = f"cgroup:{cgroup_path(cg)}"
        run(lab, agent, cg, entity, primary, other)


def run(lab, agent, cg, entity, primary, other) -> None:
    pid = beacon(lab, cg, primary)
    [inc] = wait_for(lambda: ours(agent, entity), 15)
    assert inc["state"] == "escalated"
    [rule] = inc["rules"]
    assert rule.startswith("anomaly.beacon@")
    detail = wait_for(lambda: _with_evidence(cli(agent, "incident", inc["id"])), 15)
    assert detail.get("mitigations", []) == []        # an investigation blocks nothing
    bundle = json.loads([e for e in detail["timeline"] if e["kind"] == "evidence"][0]["data_json"])
    assert cgroup_path(cg) in bundle["targets"]["cgroups"]
    connects = [r for r in bundle["recent"] if r.get("kind") == "flow.connect"]
    assert connects and all(r.get("pid") == pid for r in connects), bundle["recent"][:3]
    assert {r.get("daddr") or r.get("subject") for r in connects} == {primary}
    finding = [e for e in detail["timeline"] if e["kind"] == "finding"][0]
    assert primary in finding["text"] or primary in finding.get("data_json", "")

    # False positive, default scope: that destination only.
    done = cli(agent, "resolve", inc["id"][:12], "--false-positive", "--comment", "lab probe")
    [rec] = done["feedback"]
    assert (rec["rule"], rec["scope_kind"], rec["scope_value"]) == \
        ("anomaly.beacon", "address", f"{primary}/32")
    suppressed = f"findings_suppressed.{rule}"
    beacon(lab, cg, primary)
    wait_for(lambda: counter(agent, suppressed) >= 1, 15)
    assert [i["state"] for i in ours(agent, entity)] == ["false_positive"]
    # A different behaviour of the same workload still alerts: a beacon to another address.
    beacon(lab, cg, other)
    [new] = wait_for(lambda: [i for i in ours(agent, entity) if i["state"] == "escalated"], 15)
    assert new["rules"] == [rule]
    cli(agent, "resolve", new["id"][:12], "--comment", "seen")

    # A restart keeps the model and the feedback.
    agent.stop()
    agent.start()
    line = {p["name"]: p for p in cli(agent, "status")["probes"]}["anomaly"]
    assert "restored" in line["reason"] and "fresh start" not in line["reason"], line
    assert [r["id"] for r in cli(agent, "feedback")] == [rec["id"]]
    beacon(lab, cg, primary)
    wait_for(lambda: counter(agent, suppressed) >= 1, 15)
    assert not [i for i in ours(agent, entity) if i["state"] == "escalated"]

    # Reverting the feedback brings the alert back.
    cli(agent, "feedback", "revert", rec["id"][:12], "--comment", "was it?")
    beacon(lab, cg, primary)
    back = wait_for(lambda: [i for i in ours(agent, entity) if i["state"] == "escalated"], 15)
    assert back and back[0]["rules"] == [rule]


def _with_evidence(detail: dict) -> dict | None:
    return detail if any(e["kind"] == "evidence" for e in detail["timeline"]) else None
