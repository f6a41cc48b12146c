"""Rules that change without a restart, against a live agent process in the lab's victim
namespace: SIGHUP and `swarm-agent rules reload` switch the detector and the kernel's
thresholds (a real SYN flood fires or not), a bad file is rejected with file:line and the
running rules keep working, `swarm-agent rules` counts hits per id@version, a rule removed
while its mitigation is in force leaves the mitigation its lifetime, and a SIGHUP during
start-up neither kills the agent nor is lost."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.detect.ruleset import load_ruleset
from swarmlab import attacks
from swarmlab.lab import wait_for
from swarmlab.scenario import SERVICE_PORT, AgentProcess

pytestmark = pytest.mark.privileged
CLI = [sys.executable, "-m", "agent.cli.main"]

RULE = """\
rules:
  - id: net.syn_flood
    version: {version}
    class: system_attack
    severity: high
    event: net.source
    thresholds: {{syns_per_s: {syns}}}
    action: challenge
    ttl_s: 300
"""
UDP_ONLY = """\
rules:
  - id: net.udp_flood
    version: 1
    class: system_attack
    severity: high
    event: net.source
    thresholds: {udp_per_s: 100000}
    action: challenge
"""


def write_atomically(path: Path, text: str) -> str:
    """Replace `path` as an operator should (rename), return the set's version."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.rename(tmp, path)
    return load_ruleset(path).version


def cli(agent: AgentProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args, "--config", str(agent.config_path)],
                          capture_output=True, text=True, timeout=60)


def listing(agent: AgentProcess) -> dict:
    done = cli(agent, "rules", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def hits(agent: AgentProcess) -> dict[str, int]:
    """The rules' hits (the anomaly detectors, listed beside them, are not rules)."""
    return {f"{r['id']}@{r['version']}": int(r["hits"]) for r in listing(agent)["rules"]
            if not r["id"].startswith("anomaly.")}


def flood(ns: str, target: str) -> dict:
    """1000 SYNs/s for 1.5 s: above 200/s, far below 5000/s."""
    return attacks.run(ns, "syn_flood", timeout_s=30, target=target, port=SERVICE_PORT,
                       rate=1000, count=1500, duration_s=1.5)


def wait_version(agent: AgentProcess, version: str, timeout_s: float = 5.0) -> None:
    wait_for(lambda: listing(agent)["ruleset"]["version"] == version, timeout_s)


@pytest.fixture
def agent(lab, tmp_path):
    """The agent on rules.yaml in tmp_path (net.syn_flood@1 at 5000 SYNs/s), with three
    more attacker namespaces made first (the probe attaches to the links there are)."""
    lab.sources = [lab.attacker] + [lab.add_attacker(i) for i in (1, 2, 3)]
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULE.format(version=1, syns=5000))
    proc = AgentProcess(lab.victim, tmp_path, f"rules_file: {rules}\n")
    proc.start()
    proc.rules = rules
    yield proc
    proc.stop()


def test_reload_changes_behaviour_and_bad_files_change_nothing(lab, agent):
    target = lab.addr("victim")
    server = attacks.start_server(lab.victim, SERVICE_PORT, duration_s=120)
    try:
        _reload_and_reject(lab, agent, target)
    finally:
        server.kill()
        server.wait()


def _reload_and_reject(lab, agent, target):
    v1 = load_ruleset(agent.rules).version
    st = json.loads(cli(agent, "status", "--json").stdout)
    assert st["ruleset"]["version"] == v1 and st["rules"] == ["net.syn_flood@1"]

    # v1 (5000 SYNs/s): the flood stays below; neither the kernel nor the detector fires.
    flood(lab.attacker, target)
    time.sleep(0.5)
    assert hits(agent) == {"net.syn_flood@1": 0}

    # SIGHUP with a lower threshold: the same flood from another source now fires.
    v2 = write_atomically(agent.rules, RULE.format(version=2, syns=200))
    os.kill(agent.pid, signal.SIGHUP)
    wait_version(agent, v2)
    flood(lab.sources[1], lab.addr("victim", link=1))
    wait_for(lambda: hits(agent).get("net.syn_flood@2", 0) > 0, 5)
    first_hits = hits(agent)["net.syn_flood@2"]
    human = cli(agent, "rules")
    assert human.returncode == 0 and f"rule set {v2}: 1 rules" in human.stdout, human.stderr
    row = next(line for line in human.stdout.splitlines() if line.startswith("net.syn_flood@2"))
    assert f" {first_hits} " in row and f"{agent.rules}:2" in row, row
    mitigations = json.loads(cli(agent, "mitigations", "--json").stdout)
    challenge = [m for m in mitigations if m["kind"] == "challenge"]
    assert [m["target"] for m in challenge] == [lab.addr("attacker", link=1)], mitigations

    # Bad files, each rejected whole with file:line and reason; the rules in use stay.
    good = agent.rules.read_text()
    bad = {
        "syntax": (good.replace("version: 2", "version: [2"), 4, "not valid YAML"),
        "unknown key": (good + "    colour: red\n", 10, "unknown key 'colour'"),
        "duplicate id": (good + good.split("rules:\n")[1], 10, "duplicate id"),
        # cut mid-rule, as a non-atomic copy can leave it
        "half written": (good[:good.index("severity")], 2, "missing key 'severity'"),
    }
    for name, (text, line, reason) in bad.items():
        agent.rules.write_text(text)
        done = cli(agent, "rules", "reload")
        assert done.returncode == 6, (name, done.stdout, done.stderr)
        assert f"{agent.rules}:{line}: " in done.stderr and reason in done.stderr, \
            (name, done.stderr)
        assert "the rules in use stay" in done.stderr and "Traceback" not in done.stderr
        rs = listing(agent)["ruleset"]
        assert rs["version"] == v2 and reason in rs["last_error"], (name, rs)
    assert listing(agent)["ruleset"]["reload_failures"] == len(bad)
    # The kept rules still fire (kernel threshold and detector unchanged), hits grow.
    write_atomically(agent.rules, good)
    flood(lab.sources[2], lab.addr("victim", link=2))
    wait_for(lambda: hits(agent)["net.syn_flood@2"] > first_hits, 5)

    # The CLI reload removing the rule: its challenge keeps its lifetime, its hits are
    # kept as retired, and the kernel no longer signals SYN floods.
    write_atomically(agent.rules, UDP_ONLY)
    done = cli(agent, "rules", "reload")
    assert done.returncode == 0 and "rules reloaded: 1 rules" in done.stdout, done.stderr
    assert int(listing(agent)["retired_hits"]["net.syn_flood@2"]) >= first_hits + 1
    after = [m for m in json.loads(cli(agent, "mitigations", "--json").stdout)
             if m["id"] == challenge[0]["id"]]
    assert after and after[0]["state"] == "active" and \
        after[0]["expires_at"] == challenge[0]["expires_at"], after
    before_incidents = len(json.loads(cli(agent, "incidents", "--json").stdout))
    flood(lab.sources[3], lab.addr("victim", link=3))
    time.sleep(0.5)
    assert len(json.loads(cli(agent, "incidents", "--json").stdout)) == before_incidents
    audit = json.loads(cli(agent, "audit", "--json").stdout)
    reloads = [(e["identity"], e["result"]) for e in reversed(audit)
               if e["method"] == "ReloadRules"]
    assert reloads == [("signal:SIGHUP", "OK"), *[("local:uid=0", "FAILED_PRECONDITION")] * 4,
                       ("local:uid=0", "OK")], reloads


def test_sighup_during_startup_is_kept_not_fatal(lab, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULE.format(version=1, syns=5000))
    proc = AgentProcess(lab.victim, tmp_path, f"rules_file: {rules}\n")
    sent: list[float] = []

    def hup_while_starting() -> None:
        # Once the agent catches SIGHUP (from just before it reads the rules) and before
        # it is ready, rewrite the rules in place and send SIGHUP: the agent must survive
        # (a rewrite during its first read is read again) and use them once ready.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not sent:
            p = proc.proc
            if p is not None and p.poll() is None and _catches_hup(p.pid) and \
                    not any('"agent ready"' in line for line in proc.log_lines):
                rules.write_text(RULE.format(version=2, syns=200))
                os.kill(p.pid, signal.SIGHUP)
                sent.append(time.monotonic())
            time.sleep(0.005)

    t = threading.Thread(target=hup_while_starting)
    t.start()
    try:
        proc.start()
        t.join(5)
        assert sent, "the agent was ready before it caught SIGHUP: nothing tested"
        wait_for(lambda: listing(proc)["ruleset"]["version"] == load_ruleset(rules).version, 5)
        assert proc.proc.poll() is None
        assert listing(proc)["ruleset"]["reloads"] == 1
    finally:
        t.join(5)
        proc.stop()


def _catches_hup(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGHUP - 1)))
