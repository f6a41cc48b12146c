"""End to end: a real agent in the victim namespace reports to the test mesh receiver
(tests/meshrecv.py) over mutual TLS across the veth link, the receiver on a second,
allowlisted address of the attacker's side. Attacks from the attacker namespace make the
incidents; the receiver goes down, the agent is SIGKILLed and restarted in between, and
after recovery every incident has arrived, each report id processed once."""
from __future__ import annotations

import json
import select
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from agent.detect.ruleset import load_ruleset
from swarmlab import attacks
from swarmlab.lab import sh, wait_for
from swarmlab.scenario import NETWORK_RULES, AgentProcess
from tests.meshrecv import make_certs, received

pytestmark = pytest.mark.privileged

REPO = Path(__file__).resolve().parents[2]
MESH_PORT = 7443


def start_receiver(ns: str, listen: str, certs: Path, db: Path,
                   lose_acks: int = 0) -> subprocess.Popen[str]:
    """The receiver as a process in `ns`, returned once it listens."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.meshrecv", "--listen", listen,
         "--certs", str(certs), "--db", str(db), "--lose-acks", str(lose_acks), "--max-s", "120"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    line = proc.stdout.readline() if ready else ""
    if '"listening"' not in line:
        proc.kill()
        raise RuntimeError(f"mesh receiver did not start: {proc.communicate()[1][-500:]}")
    return proc


def stop(proc: subprocess.Popen[str] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def flood(lab, seed: int) -> None:
    """SYNs from 12 spoofed sources, each above the per-source SYN-flood threshold and
    together below the distributed rule's source count: 12 incidents."""
    out = attacks.run(lab.attacker, "distributed_syn_flood", target=lab.addr("victim"),
                      port=8080, sources=12, seed=seed, rate=4000, count=8000, duration_s=3)
    assert out["sent"] > 0, out


def agent_state(db: Path) -> tuple[dict[str, str], int]:
    """({incident id: state}, reports still queued) from the agent's database."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        incidents = dict(conn.execute("SELECT id, state FROM incidents").fetchall())
        queued = conn.execute("SELECT COUNT(*) FROM outbox WHERE kind != 'heartbeat'").fetchone()[0]
    return incidents, queued


def latest_by_incident(rows: list[dict]) -> dict[str, str]:
    """{incident id: state of its newest report} as the receiver saw them."""
    best: dict[str, tuple[float, str]] = {}
    for r in rows:
        if r["kind"] == "incident":
            at = json.loads(r["payload"])["incident"].get("updated_at", 0.0)
            if r["ref"] not in best or at >= best[r["ref"]][0]:
                best[r["ref"]] = (at, r["state"])
    return {ref: state for ref, (_, state) in best.items()}


def test_every_incident_reaches_the_mesh_across_an_outage_and_a_sigkill(lab, tmp_path):
    mesh_ip = f"10.{lab.subnet}.0.3"
    sh("ip", "addr", "add", f"{mesh_ip}/24", "dev", "a0", ns=lab.attacker)
    certs = make_certs(tmp_path / "certs", server_ips=(mesh_ip,), client_cn="victim-node")
    recv_db = tmp_path / "recv.db"
    listen = f"{mesh_ip}:{MESH_PORT}"
    (tmp_path / "agent").mkdir()
    agent = AgentProcess(lab.victim, tmp_path / "agent", f"""\
allowlist:
  mesh: [{mesh_ip}/32]
mesh:
  endpoint: "{listen}"
  tls_ca: {certs['ca']}
  tls_cert: {certs['client_cert']}
  tls_key: {certs['client_key']}
  node_id: victim
  heartbeat_s: 1.0
  backoff_initial_s: 0.2
  backoff_max_s: 1.0
metrics:
  listen: null
""")
    mesh = start_receiver(lab.attacker, listen, certs["ca"].parent, recv_db)
    try:
        agent.start()
        # 1. The mesh is up: a port scan and a flood, every incident arrives.
        scan = attacks.run(lab.attacker, "port_scan", target=lab.addr("victim"),
                           ports="1000-1400", duration_s=3)
        assert scan["sent"] > 0, scan
        flood(lab, seed=1)

        def delivered() -> bool:
            incidents, queued = agent_state(agent.db_path)
            return queued == 0 and set(incidents) <= set(latest_by_incident(received(recv_db)[0]))
        wait_for(delivered, timeout_s=20)
        first, _ = agent_state(agent.db_path)
        assert len(first) >= 13, first          # the scanner and the 12 flooders

        # 2. The mesh goes down; new incidents wait in the outbox, through a SIGKILL.
        stop(mesh)
        flood(lab, seed=2)
        wait_for(lambda: len(agent_state(agent.db_path)[0]) >= len(first) + 12, timeout_s=10)
        during, queued = agent_state(agent.db_path)
        assert queued >= len(during) - len(first), (queued, len(during), len(first))
        agent.stop(signal.SIGKILL)
        agent.start()
        flood(lab, seed=3)

        # 3. The mesh is back, losing its first two replies: everything arrives, once.
        mesh = start_receiver(lab.attacker, listen, certs["ca"].parent, recv_db, lose_acks=2)
        wait_for(delivered, timeout_s=30)
        incidents, _ = agent_state(agent.db_path)
        assert len(incidents) >= len(during) + 12
    finally:
        stop(mesh)
        agent.stop()
    rows, stats = received(recv_db)
    latest = latest_by_incident(rows)
    assert {i: latest.get(i) for i in incidents} == incidents   # each with its latest state
    assert {r["peer"] for r in rows} == {"victim-node"} and {r["node"] for r in rows} == {"victim"}
    assert any(r["kind"] == "mitigation" for r in rows)
    heartbeats = [r for r in rows if r["kind"] == "heartbeat"]
    assert heartbeats and all(json.loads(r["payload"])["heartbeat"]["ready"] for r in heartbeats[-1:])
    # Heartbeats say which rule set is in use: its content version and id@version list.
    loaded = load_ruleset(NETWORK_RULES)
    last = json.loads(heartbeats[-1]["payload"])["heartbeat"]
    assert (last["ruleset_version"], last["rules"]) == (loaded.version, loaded.names)
    # Two replies were lost, so reports came twice; each id was processed once.
    assert stats["duplicates"] >= 1
    assert stats["deliveries"] == len(rows) + stats["duplicates"]
    assert len({r["id"] for r in rows}) == len(rows)
