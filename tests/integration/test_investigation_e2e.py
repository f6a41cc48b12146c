"""Investigations and feedback end to end, against a real agent (`swarm-agent run` in the
lab's victim namespace) with its real process probe and the CLI:

- a suspicious finding (a test rule of class suspicious_activity, action investigate, on a
  shell exec inside a throw-away cgroup) opens an escalated incident, mitigates nothing,
  and carries an evidence bundle read from the kernel: the workload's process tree (a
  parent and its child), its listener and its TCP connection to a peer in another
  namespace;
- marking it a false positive (default scope) stops the same pattern from alerting while a
  different rule still alerts; a restart keeps the record (and it still suppresses);
  reverting it brings the alert back.

Scoping (the process probe is host-global): the rules match only execs inside the test's
own cgroup (swa-inv-<random>), so nothing else on the host can fire them.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from swarmlab.breachlab import cgroup_path, throwaway_cgroup
from swarmlab.lab import spawn_in, wait_for
from swarmlab.scenario import AgentProcess
from tests.integration.nftlab import listener

pytestmark = pytest.mark.privileged
PEER_PORT, LISTEN_PORT = 9300, 9301
RULES = """rules:
  - id: test.sh_exec
    version: 1
    class: suspicious_activity
    severity: medium
    action: investigate
    description: dash started inside the test's workload cgroup
    match:
      - event: proc.exec
        where:
          cgroup: {glob: "/swa-inv-*"}
          exe: {glob: "*/dash"}
  - id: test.bash_exec
    version: 1
    class: suspicious_activity
    severity: medium
    action: investigate
    description: bash started inside the test's workload cgroup
    match:
      - event: proc.exec
        where:
          cgroup: {glob: "/swa-inv-*"}
          exe: {glob: "*/bash"}
"""
# The workload: listens, connects to the peer, starts a child, then says "ready".
WORKLOAD = """
import socket, subprocess, sys, time
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[2]))); srv.listen()
conn = socket.create_connection((sys.argv[1], int(sys.argv[3])), timeout=5)
child = subprocess.Popen(["sleep", "120"])
print("ready", child.pid, conn.getsockname()[1], flush=True)
time.sleep(120)
"""


def cli(agent: AgentProcess, *args: str, json_out: bool = True):
    exe = str(Path(shutil.which("swarm-agent") or ".venv/bin/swarm-agent"))
    cmd = [exe, *args, *(["--json"] if json_out else []), "--config", str(agent.config_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout) if json_out else proc.stdout


def trigger(lab, cg: Path, shell: str) -> None:
    """One exec of `shell` inside the workload's cgroup (in the victim namespace)."""
    p = spawn_in(lab.victim, f"/usr/bin/{shell}", "-c", "true", cgroup=cg)
    p.wait(10)


def suspicious(agent: AgentProcess) -> list[dict]:
    return [i for i in cli(agent, "incidents") if i["event_class"] == "suspicious_activity"]


def counter(agent: AgentProcess, name: str) -> int:
    return int(cli(agent, "status")["counters"].get(name, 0))


@pytest.fixture
def agent(lab, tmp_path):
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "test.yaml").write_text(RULES)
    proc = AgentProcess(lab.victim, tmp_path, f"rules_file: {rules}\n"
                        "investigation: {refresh_s: 3600}\n")
    proc.start()
    probes = cli(proc, "status")["probes"]
    if not any(p["name"] == "handle_sched_process_exec" and p["state"] == "loaded"
               for p in probes):
        proc.stop()
        from tests.conftest import skip_unsupported
        skip_unsupported(f"the process probe does not run here: {probes}")
    yield proc
    proc.stop()


def test_investigation_evidence_feedback_revert_and_restart(lab, agent):
    peer = lab.addr("attacker")
    with listener(lab.attacker, "0.0.0.0", PEER_PORT), throwaway_cgroup("swa-inv") as cg:
        work = spawn_in(lab.victim, sys.executable, "-c", WORKLOAD, peer, str(LISTEN_PORT),
                        str(PEER_PORT), cgroup=cg)
        try:
            word, child_pid, local_port = work.stdout.readline().split()
            assert word == "ready"
            run_investigation(lab, agent, cg, work.pid, int(child_pid), int(local_port), peer)
        finally:
            work.kill()
            work.wait(10)


def run_investigation(lab, agent, cg, pid, child_pid, local_port, peer) -> None:
    trigger(lab, cg, "dash")
    [inc] = wait_for(lambda: suspicious(agent), 10)
    assert inc["state"] == "escalated" and inc["rules"] == ["test.sh_exec@1"]
    detail = wait_for(lambda: _with_evidence(cli(agent, "incident", inc["id"])), 10)
    assert detail.get("mitigations", []) == []        # investigations mitigate nothing
    notes = [e["text"] for e in detail["timeline"] if e["kind"] == "note"]
    assert any("investigation opened for the security team" in n for n in notes)
    bundle = json.loads([e for e in detail["timeline"] if e["kind"] == "evidence"][0]["data_json"])
    assert bundle["targets"]["cgroups"] == [cgroup_path(cg)]
    procs = {p["pid"]: p for p in bundle["processes"]}
    # The workload (python, exec'd through `ip netns exec` with the same pid) and its child.
    assert pid in procs and procs[child_pid]["ppid"] == pid
    assert procs[child_pid]["exe"].endswith("/sleep") and procs[pid]["cgroup"] == cgroup_path(cg)
    assert {(s["local_port"], s["pid"]) for s in bundle["listening"]} >= {(LISTEN_PORT, pid)}
    # The peer (nftlab.listener) sends its banner and closes: the workload's side of the
    # connection is established or, by then, in close_wait.
    [conn] = [s for s in bundle["connections"] if s["remote_port"] == PEER_PORT]
    assert (conn["remote"], conn["local_port"], conn["pid"]) == (peer, local_port, pid)
    assert conn["state"] in ("established", "close_wait")
    human = cli(agent, "incident", inc["id"][:12], json_out=False)
    assert "evidence (collected 1 time(s)" in human and "the process's own claim" in human
    assert f"{peer}:{PEER_PORT} {conn['state']} pid {pid}" in human

    # Refused verdicts: exit 2, one sentence, nothing changed.
    exe = str(Path(shutil.which("swarm-agent") or ".venv/bin/swarm-agent"))
    fp = ("--false-positive", "--comment", "benign")
    for args, words in [((*fp, "--scope", "address=0.0.0.0/0"), "wider than /16"),
                        ((*fp, "--scope", "cgroup=/"), "every workload"),
                        ((*fp, "--scope", "uid=0"), "unknown scope kind"),
                        (("--false-positive",), "needs a comment"),
                        (("--scope", "node"), "go with --false-positive")]:
        done = subprocess.run([exe, "resolve", inc["id"][:12], *args, "--config",
                               str(agent.config_path)], capture_output=True, text=True,
                              timeout=30)
        assert done.returncode == 2 and words in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    assert [i["state"] for i in suspicious(agent)] == ["escalated"]

    # A false positive (default scope): the same pattern no longer alerts.
    done = cli(agent, "resolve", inc["id"][:12], "--false-positive", "--comment", "lab job")
    assert done["state"] == "false_positive"
    [rec] = done["feedback"]
    assert (rec["rule"], rec["action"], rec["incident_id"]) == \
        ("test.sh_exec", "suppress", inc["id"])
    assert rec["scope_kind"] in ("exe", "cgroup") and rec["by"] == "local:uid=0"
    trigger(lab, cg, "dash")
    wait_for(lambda: counter(agent, "findings_suppressed.test.sh_exec@1") >= 1, 10)
    assert [(i["id"], i["state"]) for i in suspicious(agent)] == \
        [(inc["id"], "false_positive")]                 # no new incident
    assert "feedback: 1 incidents marked false positive, 1 findings suppressed" in \
        cli(agent, "status", json_out=False)
    # Another rule on the same workload still alerts.
    trigger(lab, cg, "bash")
    wait_for(lambda: any(i["rules"] == ["test.bash_exec@1"] and i["state"] == "escalated"
                         for i in suspicious(agent)), 10)

    # A restart keeps the record, and it still suppresses.
    agent.stop()
    agent.start()
    listed = cli(agent, "feedback")
    assert [r["id"] for r in listed] == [rec["id"]] and int(listed[0]["hits"]) >= 1
    assert "test.sh_exec@1" in cli(agent, "feedback", json_out=False)
    trigger(lab, cg, "dash")
    wait_for(lambda: counter(agent, "findings_suppressed.test.sh_exec@1") >= 1, 10)
    assert not [i for i in suspicious(agent) if "test.sh_exec@1" in i["rules"]
                and i["state"] != "false_positive"]
    rules = {r["id"]: r for r in cli(agent, "rules")["rules"]}
    assert int(rules["test.sh_exec"]["false_positives"]) == 1
    assert int(rules["test.sh_exec"]["suppressed"]) >= 1

    # Reverting it brings the alert back.
    reverted = cli(agent, "feedback", "revert", rec["id"][:12], "--comment", "not so sure")
    assert reverted["reverted_by"] == "local:uid=0" and not reverted["live"]
    assert cli(agent, "feedback") == []
    trigger(lab, cg, "dash")      # (joins the live incident of the bash finding: both "node")
    wait_for(lambda: any("test.sh_exec@1" in i["rules"] and i["state"] == "escalated"
                         for i in suspicious(agent)), 10)
    methods = [e["method"] for e in cli(agent, "audit")]
    assert methods[:2] == ["RevertFeedback", "ResolveIncident"] or \
        "RevertFeedback" in methods


def _with_evidence(detail: dict) -> dict | None:
    return detail if any(e["kind"] == "evidence" for e in detail["timeline"]) else None

