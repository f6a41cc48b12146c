"""Enforcement outlives storage, against the real agent (`ip netns exec VICTIM swarm-agent
run`): its state_dir on a small tmpfs filled to the last byte, or holding a corrupt
database of several kinds. Blocks keep working (manual and automatic), the agent never
dies, `status` says storage is degraded and why, and what it did meanwhile is written
once space returns; a corrupt database is moved aside and the mitigations in force in the
kernel table are kept and re-recorded."""
from __future__ import annotations

import ipaddress
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swarmlab import attacks
from swarmlab.lab import sh, wait_for
from agent.model import EventClass, Finding, Mitigation, MitigationKind, Severity
from swarmlab.scenario import AgentProcess
from agent.state.store import Store
from tests.fullfs import SmallFs

pytestmark = pytest.mark.privileged
CLI = [sys.executable, "-m", "agent.cli.main"]


def cli(agent: AgentProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args, "--config", str(agent.config_path)],
                          capture_output=True, text=True, timeout=60)


def storage(agent: AgentProcess) -> dict:
    done = cli(agent, "status", "--json")
    assert done.returncode == 0, done.stderr
    probes = {p["name"]: p for p in json.loads(done.stdout).get("probes", [])}
    return probes["storage"]


def table(lab) -> str:
    return sh("nft", "-j", "list", "table", "inet", "swarm_agent", ns=lab.victim).stdout


def blocked(lab, addr: str) -> bool:
    """Whether the kernel's block set covers `addr` (elements may be merged ranges)."""
    return sh("nft", "get", "element", "inet", "swarm_agent", "block_v4", f"{{ {addr} }}",
              ns=lab.victim, check=False).returncode == 0


def rows(db: Path, sql: str) -> list[tuple]:
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return c.execute(sql).fetchall()
    finally:
        c.close()


@pytest.fixture
def full_agent(lab, tmp_path):
    """An agent whose state_dir is a 1 MiB tmpfs (unmounted after the test)."""
    fs = SmallFs(tmp_path / "state", 1024)
    agent = AgentProcess(lab.victim, tmp_path)
    try:
        agent.start()
        yield fs, agent
    finally:
        agent.stop()
        fs.close()


def block_until_degraded(lab, agent: AgentProcess) -> list[str]:
    """Manual blocks on a full disk until one had to go to memory; the targets blocked."""
    targets = [f"198.51.100.{n}" for n in range(1, 21)]
    for i, target in enumerate(targets):
        done = cli(agent, "block", target, "--ttl", "300", "--reason", "disk full test")
        assert done.returncode == 0, done.stderr
        assert blocked(lab, target)
        if storage(agent)["state"] == "degraded":
            return targets[:i + 1]
    raise AssertionError("the full disk never failed a write")


def test_full_disk_blocks_keep_working_and_state_catches_up(lab, full_agent):
    fs, agent = full_agent
    fs.fill()
    done = block_until_degraded(lab, agent)   # the first write that needs space: to memory
    st = storage(agent)
    assert st["state"] == "degraded" and "full" in st["reason"], st
    # An automatic block on the full disk (a port scan: completed handshakes).
    attacker = lab.addr("attacker")
    attacks.run(lab.attacker, "port_scan", timeout_s=30, target=lab.addr("victim"),
                ports="1000-3000", duration_s=3)
    wait_for(lambda: attacker in table(lab), 10)
    listed = cli(agent, "mitigations", "--json")
    assert listed.returncode == 0 and attacker in listed.stdout
    # The outbox cleanup (every 5 s) and housekeeping ran on the full disk: still alive.
    time.sleep(5.5)
    assert agent.proc.poll() is None, "".join(agent.log_lines[-5:])
    incidents = json.loads(cli(agent, "incidents", "--json").stdout)
    health = [i for i in incidents if i["event_class"] == "agent_health"]
    assert health and health[0]["state"] == "escalated", incidents
    assert not rows(agent.db_path, "SELECT 1 FROM incidents WHERE class='agent_health'")
    fs.free()
    wait_for(lambda: storage(agent)["state"] == "ok", 10)
    # Everything done meanwhile is on disk now.
    on_disk = {r[0] for r in rows(agent.db_path, "SELECT target FROM mitigations "
                                                 "WHERE state='active'")}
    assert {*done, attacker} <= on_disk, on_disk
    (state,) = rows(agent.db_path, "SELECT state FROM incidents WHERE class='agent_health'")
    assert state == ("resolved",)
    # And new writes go straight to the file again.
    assert cli(agent, "block", "198.51.100.99", "--ttl", "300").returncode == 0
    assert rows(agent.db_path, "SELECT 1 FROM mitigations WHERE target='198.51.100.99'")
    assert any("storage degraded" in line for line in agent.log_lines)
    assert any("storage recovered" in line for line in agent.log_lines)


def test_restart_on_a_full_disk_keeps_what_the_last_run_did(lab, full_agent):
    fs, agent = full_agent
    fs.fill()
    done = block_until_degraded(lab, agent)
    assert agent.stop() == 0
    unsaved = agent.workdir / "run" / "unsaved-state.db"
    assert unsaved.exists()                  # the memory copy, in the run directory
    agent.start()                            # still full: starts, keeps the blocks
    assert all(blocked(lab, t) for t in done), table(lab)
    assert "last run" in storage(agent)["reason"]
    fs.free()
    wait_for(lambda: storage(agent)["state"] == "ok", 10)
    on_disk = {r[0] for r in rows(agent.db_path, "SELECT target FROM mitigations")}
    assert set(done) <= on_disk and not unsaved.exists()


def test_sigkill_while_degraded_loses_no_block(lab, full_agent):
    fs, agent = full_agent
    fs.fill()
    done = block_until_degraded(lab, agent)
    unsaved = agent.workdir / "run" / "unsaved-state.db"
    wait_for(unsaved.exists, 5)              # kept in the run directory within a second
    time.sleep(1.5)                          # ... and refreshed with the last block
    agent.stop(signal.SIGKILL)
    agent.start()
    assert all(blocked(lab, t) for t in done), table(lab)
    fs.free()
    wait_for(lambda: storage(agent)["state"] == "ok", 10)
    on_disk = {r[0] for r in rows(agent.db_path, "SELECT target FROM mitigations")}
    assert set(done) <= on_disk


def test_start_on_a_full_disk_runs_degraded(lab, tmp_path):
    fs = SmallFs(tmp_path / "state", 256)
    agent = AgentProcess(lab.victim, tmp_path)
    try:
        fs.fill()
        agent.start()                      # ready, not a crash loop
        assert storage(agent)["state"] == "degraded"
        assert cli(agent, "block", "198.51.100.7", "--ttl", "300").returncode == 0
        assert "198.51.100.7" in table(lab)
        fs.free()
        wait_for(lambda: storage(agent)["state"] == "ok", 10)
        assert rows(agent.db_path, "SELECT 1 FROM mitigations WHERE target='198.51.100.7'")
    finally:
        agent.stop()
        fs.close()


def test_start_on_a_read_only_state_dir_runs_degraded(lab, full_agent):
    fs, agent = full_agent
    assert cli(agent, "block", "198.51.100.1", "--ttl", "300").returncode == 0
    agent.stop()
    fs.readonly()
    agent.start()                          # not a crash loop: ready, and says why
    st = storage(agent)
    assert st["state"] == "degraded" and "read-only filesystem" in st["reason"], st
    assert blocked(lab, "198.51.100.1")    # what the file held is still in force
    assert cli(agent, "block", "198.51.100.2", "--ttl", "300").returncode == 0
    assert blocked(lab, "198.51.100.2")
    fs.readonly(False, pid=agent.pid)
    wait_for(lambda: storage(agent)["state"] == "ok", 40)   # backoff, at most 30 s
    on_disk = {r[0] for r in rows(agent.db_path, "SELECT target FROM mitigations")}
    assert {"198.51.100.1", "198.51.100.2"} <= on_disk


def _truncate(db: Path) -> None:
    with open(db, "r+b") as f:
        f.truncate(db.stat().st_size // 3)


def _garble(db: Path) -> None:
    with open(db, "r+b") as f:
        f.write(b"garbage garbage garbage garbage!")


def _random(db: Path) -> None:
    db.write_bytes(bytes(range(256)) * 97)


def _directory(db: Path) -> None:
    db.unlink()
    db.mkdir()


def _foreign(db: Path) -> None:
    db.unlink()
    c = sqlite3.connect(db)
    c.execute("CREATE TABLE things (a, b)")
    c.commit()
    c.close()


@pytest.mark.parametrize("damage", [_truncate, _garble, _random, _directory, _foreign])
def test_corrupt_database_is_moved_aside_and_kernel_mitigations_kept(lab, tmp_path, damage):
    agent = AgentProcess(lab.victim, tmp_path)
    now = time.time()
    with Store(agent.db_path) as store:      # 40 blocks (and enough pages to truncate)
        for n in range(40):
            store.add_mitigation(Mitigation(MitigationKind.BLOCK_IP, f"198.51.100.{n + 1}", now,
                                            now + 600, reason="x" * 200))
        for n in range(300):
            store.record_finding(Finding("net.port_scan", 1, EventClass.SYSTEM_ATTACK,
                                         Severity.HIGH, f"ip:203.0.113.{n % 250}", "block",
                                         1, 2, {"n": n, "pad": "y" * 100}), now, now)
    agent.start()                            # puts them in the kernel table
    agent.stop()
    db = agent.db_path
    for side in ("-wal", "-shm"):
        Path(f"{db}{side}").unlink(missing_ok=True)
    kept = db.read_bytes()
    damage(db)
    agent.start()
    try:
        aside = sorted(db.parent.glob("agent.db.corrupt-*"))
        assert aside and not aside[0].name.endswith(("-wal", "-shm")), list(db.parent.iterdir())
        assert aside[0].is_dir() or aside[0].read_bytes() != kept or damage is _foreign
        # The blocks stayed in the kernel and are in the fresh database again.
        assert all(blocked(lab, f"198.51.100.{n + 1}") for n in range(40)), table(lab)
        # (the kernel merged neighbours of one expiry: they come back as the covering nets)
        recorded = [ipaddress.ip_network(r[0]) for r in rows(
            db, "SELECT target FROM mitigations WHERE state='active' AND kind='block_ip'")]
        assert all(any(ipaddress.ip_address(f"198.51.100.{n + 1}") in net for net in recorded)
                   for n in range(40)), recorded
        assert not any(ipaddress.ip_address("198.51.100.41") in net for net in recorded)
        incidents = json.loads(cli(agent, "incidents", "--json").stdout)
        health = [i for i in incidents if i["event_class"] == "agent_health"]
        assert health and health[0]["state"] == "escalated", incidents
        st = storage(agent)
        assert st["state"] == "ok" and "moved aside" in st["reason"], st
        assert any("corrupt database moved aside" in line for line in agent.log_lines)
    finally:
        agent.stop()


def test_sigkill_right_after_a_degraded_block_keeps_it_in_force(lab, full_agent):
    # A block put in force while the store is in memory is in the spill file before the
    # host change (commit point): a SIGKILL right after it, before any periodic spill,
    # must not make the next start lift it (a start lifts what no row holds).
    fs, agent = full_agent
    fs.fill()
    block_until_degraded(lab, agent)
    target = "198.51.100.77"
    done = cli(agent, "block", target, "--ttl", "300", "--reason", "operator block, disk full")
    assert done.returncode == 0, done.stderr
    assert blocked(lab, target)
    agent.stop(signal.SIGKILL)
    agent.start()
    assert blocked(lab, target), "the block in force before the crash was lifted by the start"
