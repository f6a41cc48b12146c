"""A mesh made by `swarm-mesh init` and run by `swarm-mesh run` with its embedded
nats-server, and a node joined with `swarm-mesh enroll`, checked with the agent's own
pieces: its config loader reads the enrolled node's agent-fleet.yaml, its reporter sends a
heartbeat over mutual TLS with the enrolled certificate (the mesh names the node and its
provider from it), its fleet subscriber's connection reads the decision stream with the
node password (and cannot publish a decision), and an operator's block is verified with
the Verifier and the enrolled decisions.pub. A SIGKILLed nats-server is restarted; a
SIGTERM stops it with the service, a SIGKILL of the service takes it along.

No root needed: everything listens on 127.0.0.1 free ports in tmp_path.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent import __version__
from agent import config as agent_config
from agent._vendor import nats
from agent._vendor.nats import errors as nats_errors
from agent._vendor.nats.js.api import DeliverPolicy
from agent.fleet.decision import STREAM, SUBJECT_PREFIX, Verifier, load_public_key
from agent.fleet.subscriber import FleetSubscriber
from agent.report.mesh import MeshReporter
from agent.state.outbox import Outbox
from agent.state.store import Store as AgentStore
from tests.meshkit import REPO, MeshProcess
from tests.natsserver import free_port, nats_binary


def swarm_mesh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mesh", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def wait_for(fn, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    return fn()


def log_records(mesh: MeshProcess, msg: str) -> list[dict]:
    out = []
    for line in mesh.log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("msg") == msg:
            out.append(rec)
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:           # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture
def joined(tmp_path: Path):
    """A mesh (init with 127.0.0.1 as its name, free ports, state in tmp_path), running with
    its embedded nats-server, and node gpu-1 of provider acme enrolled into tmp_path/gpu-1
    (its files named where they are). Stopped after the test."""
    nats_binary()                               # skips (fails in CI) without nats-server
    d = tmp_path / "mesh"
    metrics_port = free_port()
    r = swarm_mesh("init", "--dir", str(d), "--state-dir", str(tmp_path / "state"),
                   "--name", "127.0.0.1", "--listen", f"127.0.0.1:{free_port()}",
                   "--nats-listen", f"127.0.0.1:{free_port()}",
                   "--metrics-listen", f"127.0.0.1:{metrics_port}")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "gpu-1"
    r = swarm_mesh("enroll", "gpu-1", "--provider", "acme", "--dir", str(d), "--out", str(out),
                   "--install-prefix", str(out))
    assert r.returncode == 0, r.stderr
    mesh = MeshProcess(d / "config.yaml").start()
    try:
        yield {"mesh": mesh, "dir": d, "out": out, "metrics": f"127.0.0.1:{metrics_port}",
               "agent": agent_config.load(out / "agent-fleet.yaml")}
    finally:
        mesh.stop()


async def heartbeat(cfg: agent_config.Config, db: Path) -> None:
    """The agent's reporter sends one heartbeat, as the node would."""
    store = AgentStore(db)
    box = Outbox(store.path, max_reports=100, hard_max_reports=200)
    delivered: list[int] = []
    reporter = MeshReporter(cfg.mesh, box, lambda: {"version": __version__, "ready": True},
                            on_delivered=lambda c: delivered.append(sum(c.values())))
    reporter.queue_heartbeat()
    task = asyncio.create_task(reporter.run())
    try:
        deadline = time.monotonic() + 20
        while not delivered and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert delivered, "the heartbeat was not delivered"


async def as_node(cfg: agent_config.Config, expect: int) -> tuple[list, list[str], int, int]:
    """Over the agent subscriber's own connection (node user, TLS with the enrolled CA):
    the stream read from the start and verified, then a publish of a decision attempted.
    Returns (decisions, errors the server sent, stream last seq before, after)."""
    verifier = Verifier([load_public_key(k) for k in cfg.fleet.keys])
    nc = await FleetSubscriber(cfg, None, None, "gpu-1", lambda: [])._connect()
    errors: list[str] = []
    try:
        js = nc.jetstream()
        got: list = []
        sub = await js.subscribe(f"{SUBJECT_PREFIX}.>", stream=STREAM, ordered_consumer=True,
                                 deliver_policy=DeliverPolicy.ALL)
        deadline = time.monotonic() + 10
        while len(got) < expect and time.monotonic() < deadline:
            try:
                msg = await sub.next_msg(timeout=1)
            except nats_errors.TimeoutError:
                continue
            got.append(verifier.open(msg.data, msg.subject, time.time()))
        await sub.unsubscribe()
        before = (await js.stream_info(STREAM)).state.last_seq
    finally:
        await nc.close()
    # the same credentials, with an error callback that keeps what the server says
    password = Path(cfg.fleet.password_file).read_text().strip()

    async def on_error(e: Exception) -> None:
        errors.append(str(e))
    nc = await nats.connect(cfg.fleet.nats_url, user=cfg.fleet.user, password=password,
                            tls=ssl.create_default_context(cafile=cfg.fleet.tls_ca),
                            error_cb=on_error, allow_reconnect=False)
    try:
        await nc.publish(f"{SUBJECT_PREFIX}.v4.198-51-100-1.32", b"{}")
        await nc.flush(timeout=5)
        await asyncio.sleep(0.5)
        after = (await nc.jetstream().stream_info(STREAM)).state.last_seq
    finally:
        await nc.close()
    return got, errors, before, after


def test_an_enrolled_node_reports_reads_decisions_and_cannot_publish_them(joined):
    mesh, cfg = joined["mesh"], joined["agent"]
    asyncio.run(heartbeat(cfg, joined["out"] / "agent.db"))
    nodes = mesh.cli("nodes", "--json")
    assert [(n["node"], n["provider"], n["status"]) for n in nodes] == [("gpu-1", "acme", "alive")]

    out = mesh.cli("block", "192.0.2.10", "--reason", "scanner", "--operator", "ana", "--json")
    assert out["outcome"] == "decide" and out["state"] == "published", out
    got, errors, before, after = asyncio.run(as_node(cfg, 1))
    assert [(d.action, d.target, d.provenance.get("operator")) for d in got] == \
        [("block", "192.0.2.10/32", "ana")]
    assert any("permissions violation" in e.lower() for e in errors), errors
    assert before == after == 1, "a node's publish reached the stream"

    text = urllib.request.urlopen(f"http://{joined['metrics']}/metrics", timeout=5).read()
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for fam in text_string_to_metric_families(text.decode()) for s in fam.samples}
    assert got[("swarm_mesh_nodes", (("status", "alive"),))] == 1
    assert got[("swarm_mesh_decisions", (("action", "block"), ("state", "published")))] == 1
    assert got[("swarm_mesh_blocks_in_force", ())] == 1
    assert got[("swarm_mesh_decisions_enabled", ())] == got[("swarm_mesh_nats_connected", ())] == 1
    assert got[("swarm_mesh_reports_total", ())] >= 1


def test_the_embedded_nats_server_is_restarted_after_sigkill_and_stopped_with_the_service(
        joined):
    mesh = joined["mesh"]
    first = log_records(mesh, "nats-server started")
    assert len(first) == 1
    pid = first[0]["pid"]
    os.kill(pid, signal.SIGKILL)
    restarted = wait_for(lambda: log_records(mesh, "nats-server restarted"))
    assert restarted, mesh.log.read_text()[-2000:]
    assert log_records(mesh, "nats-server exited; restarting it")
    new = restarted[0]["pid"]
    assert new != pid and alive(new)
    # the service's own connection is back: an operator's block is published by the CLI,
    # and the service (not the CLI) would have republished anything pending
    out = mesh.cli("block", "192.0.2.11", "--reason", "scanner", "--operator", "ana", "--json")
    assert out["state"] == "published", out
    mesh.stop()
    assert wait_for(lambda: not alive(new), 10), "SIGTERM left nats-server running"
    assert log_records(mesh, "nats-server stopped")

    mesh.start()                                 # the stream survived on disk
    pid = log_records(mesh, "nats-server started")[-1]["pid"]
    got, _, _, _ = asyncio.run(as_node(joined["agent"], 1))
    assert [d.target for d in got] == ["192.0.2.11/32"]
    mesh.kill()                                  # SIGKILL: the kernel takes nats-server along
    assert wait_for(lambda: not alive(pid), 10), "nats-server outlived a SIGKILLed service"


def test_a_missing_nats_server_binary_is_one_sentence(tmp_path: Path):
    d = tmp_path / "mesh"
    assert swarm_mesh("init", "--dir", str(d), "--state-dir", str(tmp_path / "s"),
                      "--name", "127.0.0.1", "--listen", "127.0.0.1:0",
                      "--metrics-listen", "127.0.0.1:0").returncode == 0
    cfg = d / "config.yaml"
    cfg.write_text(cfg.read_text().replace("binary: nats-server", "binary: no-such-nats-server"))
    r = swarm_mesh("run", "--config", str(cfg))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "swarm-mesh: no-such-nats-server is not installed (looked on PATH and in /usr/sbin): "
        "apt install nats-server, or run one yourself and remove nats.server from the config")
