"""The `swarm-agent` CLI against a live agent process in the lab's victim namespace: human
and --json output, exit codes, manual blocks in the kernel's own nftables view, an
incident from a real SYN flood acknowledged and resolved, and the watch stream."""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time

import pytest

from swarmlab import attacks
from swarmlab.lab import sh, wait_for
from swarmlab.scenario import AgentProcess
from tests.integration.nftlab import listener, reaches, wait_reaches

pytestmark = pytest.mark.privileged
CLI = [sys.executable, "-m", "agent.cli.main"]


@pytest.fixture
def agent(lab, tmp_path):
    """`swarm-agent run` for the lab's victim, state in tmp_path; stopped after the test."""
    proc = AgentProcess(lab.victim, tmp_path)
    proc.start()
    yield proc
    proc.stop()


def cli(agent: AgentProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args, "--config", str(agent.config_path)],
                          capture_output=True, text=True, timeout=60)


def cli_json(agent: AgentProcess, *args: str):
    done = cli(agent, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def in_table(lab, addr: str) -> bool:
    return addr in sh("nft", "-j", "list", "table", "inet", "swarm_agent", ns=lab.victim).stdout


def test_status_block_unblock_and_errors(lab, agent):
    human = cli(agent, "status")
    assert human.returncode == 0, human.stderr
    assert human.stdout.startswith("agent: running") and "system_attack" in human.stdout
    st = cli_json(agent, "status")
    assert st["running"] and st["ready"] and st["pid"] == agent.pid
    assert {c["event_class"] for c in st["classes"]} >= {"system_attack", "security_breach"}

    target = "198.51.100.77"
    m = cli_json(agent, "block", target, "--ttl", "60", "--reason", "cli test")
    assert (m["kind"], m["target"], m["state"]) == ("block_ip", target, "active")
    wait_for(lambda: in_table(lab, target), 5)
    listed = cli(agent, "mitigations")
    assert listed.returncode == 0 and target in listed.stdout and "block_ip" in listed.stdout
    assert [x["id"] for x in cli_json(agent, "mitigations")] == [m["id"]]
    # status says what the mitigations in force are (blocked vs challenged)
    assert "mitigations in force: 1 (1 blocked)" in cli(agent, "status").stdout
    assert cli_json(agent, "status")["mitigation_verdicts"] == {"blocked": 1}

    unblocked = cli(agent, "unblock", m["id"][:8])
    assert unblocked.returncode == 0 and f"lifted block_ip {target}" in unblocked.stdout
    wait_for(lambda: not in_table(lab, target), 5)

    for args, code, text in [
        (("block", "300.1.1.1"), 2, "not an IP address or CIDR"),
        (("block", "198.51.100.1", "--ttl", "0"), 2, "ttl_s must be more than 0"),
        (("block", lab.addr("victim")), 6, "allowlisted"),
        (("incident", "f" * 32), 4, "no incident"),
        (("unblock", target), 4, "no mitigation in force"),
    ]:
        done = cli(agent, *args)
        assert (done.returncode, done.stdout) == (code, ""), done.stderr
        assert text in done.stderr and "Traceback" not in done.stderr

    audit = cli_json(agent, "audit")
    assert [e["method"] for e in audit][-2:] == ["LiftMitigation", "ApplyMitigation"]
    assert cli(agent, "audit").stdout.splitlines()[0].split()[:3] == ["SEQ", "TIME", "IDENTITY"]

    agent.stop()
    down = cli(agent, "status")
    assert down.returncode == 3 and "the agent is not running" in down.stderr


def test_incident_from_an_attack_acknowledged_and_resolved(lab, agent):
    watch = subprocess.Popen([*CLI, "incidents", "--watch", "--json", "--config",
                              str(agent.config_path)], stdout=subprocess.PIPE)
    try:
        attacks.run(lab.attacker, "syn_flood", timeout_s=30, target=lab.addr("victim"),
                    port=8080, duration_s=2)
        found = wait_for(lambda: cli_json(agent, "incidents"), 10)
        incident = found[0]
        assert incident["event_class"] == "system_attack"
        assert incident["entity"] == f"ip:{lab.addr('attacker')}"
        short = incident["id"][:12]
        acked = cli(agent, "ack", short, "--comment", "on it")
        assert acked.returncode == 0 and "acknowledged" in acked.stdout
        # Whenever the watch subscribed, it saw the live incident and then the ack.
        changes = _read_lines(watch, 2, timeout_s=10)
        assert {next(iter(c)) for c in changes} <= {"incident", "mitigation"}
        assert incident["id"] in {c["incident"]["id"] for c in changes if "incident" in c}
    finally:
        watch.terminate()
        watch.wait(10)

    table = cli(agent, "incidents")
    assert table.stdout.splitlines()[0].split()[:3] == ["ID", "CLASS", "STATE"]
    detail = cli(agent, "incident", short)
    assert detail.returncode == 0 and "mitigation_applied" in detail.stdout
    assert "acknowledged by local:uid=0" in detail.stdout   # the CLI's real uid
    resolved = cli_json(agent, "resolve", short, "--false-positive", "--comment", "lab")
    assert resolved["state"] == "false_positive"
    # Marking it a false positive lifted its block, in the kernel too.
    wait_for(lambda: not in_table(lab, lab.addr("attacker")), 5)
    again = cli(agent, "resolve", short)
    assert again.returncode == 6 and "already closed" in again.stderr
    methods = [e["method"] for e in cli_json(agent, "audit")]
    assert methods[:3] == ["ResolveIncident", "ResolveIncident", "AcknowledgeIncident"]


def set_elements(lab, name: str) -> str:
    return sh("nft", "-j", "list", "set", "inet", "swarm_agent", name, ns=lab.victim).stdout


def test_addresses_as_an_operator_may_type_them(lab, agent):
    """An IPv4-mapped address blocks the IPv4 host (v4 set, its connections really cut);
    scoped and broadcast addresses are refused with exit 2 and one sentence."""
    attacker, victim = lab.addr("attacker"), lab.addr("victim")
    with listener(lab.victim, "0.0.0.0", 8081):
        assert reaches(lab.attacker, victim, 8081)
        m = cli_json(agent, "block", f"::ffff:{attacker}", "--ttl", "60")
        assert (m["target"], m["state"]) == (attacker, "active")
        wait_for(lambda: attacker in set_elements(lab, "block_v4"), 5)
        assert "ffff" not in set_elements(lab, "block_v6")
        wait_reaches(lab.attacker, victim, 8081, expected=False)
        assert cli(agent, "unblock", f"::ffff:{attacker}").returncode == 0
        wait_reaches(lab.attacker, victim, 8081, expected=True)

    subnet_broadcast = f"10.{lab.subnet}.0.255"    # the victim's on-link /24
    for target, text in [
        ("fe80::1%v0", "fe80::1%v0 is a scoped address (zone 'v0')"),
        ("255.255.255.255", "255.255.255.255 is the limited broadcast address"),
        (subnet_broadcast, f"{subnet_broadcast} is the broadcast address of this host's "
                           f"subnet 10.{lab.subnet}.0.0/24"),
    ]:
        done = cli(agent, "block", target)
        assert (done.returncode, done.stdout) == (2, ""), done.stderr
        assert done.stderr.startswith(f"swarm-agent: {text}") and done.stderr.count("\n") == 1
    assert cli_json(agent, "mitigations") == []


def _read_lines(proc: subprocess.Popen[bytes], n: int, timeout_s: float) -> list[dict]:
    """At least n JSON lines from proc's stdout (raw reads: select and buffered lines
    do not mix)."""
    buf, out = b"", []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            out.extend(json.loads(line) for line in lines if line.strip())
    assert len(out) >= n, f"only {len(out)} changes watched"
    return out
