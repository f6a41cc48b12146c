"""The pieces bench/fleet_scale.py starts and always removes: a hub network namespace (the
"machine" the bench runs in, so the root namespace's addresses and firewall are never
touched), nats-server with the fleet's generated configuration, the mesh service as a
process, a proposer speaking the mesh reporting API with node certificates, real agents in
namespaces of their own, and an observer of each agent's nftables.

Topology: the bench process enters namespace `fs-<tag>-hub` first thing (before any
thread exists, so every thread and child lives there). The hub holds bridge `br0` with
10.77.0.1/24: nats-server listens there (local to the hub, like loopback), the mesh service
on the hub's 127.0.0.1. Every other namespace (a real agent, the partition group of
simulated nodes) is joined to br0 by a veth pair created inside the hub, so the root
namespace never holds one. close() kills what was started and deletes every namespace.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from mesh import natsconf
from swarmlab.lab import _setns, sh

SUBNET = "10.77.0"
NATS_IP = f"{SUBNET}.1"
NATS_PORT = 4222
NATS_BINARY = "/usr/sbin/nats-server"
MONITOR_PORT = 8222             # nats-server's monitoring endpoint, on the hub's 127.0.0.1


class Hub:
    """The namespaces of one run, named fs-<tag>-*; see the module docstring."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.name = f"fs-{self.tag}-hub"
        self.namespaces: list[str] = []
        self._links = 0

    def enter(self) -> None:
        """Create the hub and move this thread (the main one: call before any thread is
        started) into it for good."""
        self._add(self.name)
        sh("ip", "link", "add", "br0", "type", "bridge", ns=self.name)
        sh("ip", "addr", "add", f"{NATS_IP}/24", "dev", "br0", ns=self.name)
        sh("ip", "link", "set", "br0", "up", ns=self.name)
        with open(f"/run/netns/{self.name}") as f:
            _setns(f.fileno())

    def _add(self, ns: str) -> None:
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "link", "set", "lo", "up", ns=ns)

    def node_ns(self, label: str, host: int) -> tuple[str, str]:
        """A namespace joined to br0, address 10.77.0.<host>; (name, address)."""
        ns = f"fs-{self.tag}-{label}"
        self._add(ns)
        self._links += 1
        hub_if = f"fsv{self._links}"
        sh("ip", "link", "add", hub_if, "type", "veth", "peer", "name", "eth0", "netns", ns,
           ns=self.name)
        sh("ip", "link", "set", hub_if, "master", "br0", "up", ns=self.name)
        addr = f"{SUBNET}.{host}"
        sh("ip", "addr", "add", f"{addr}/24", "dev", "eth0", ns=ns)
        sh("ip", "link", "set", "eth0", "up", ns=ns)
        return ns, addr

    def close(self) -> None:
        """Kill whatever still runs in the other namespaces, then delete them all (the hub
        last: this process is in it, which keeps it until exit)."""
        for ns in reversed(self.namespaces):
            if ns != self.name:
                for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()


class Nats:
    """nats-server on 10.77.0.1:4222 with JetStream in `workdir` and the config of
    mesh.natsconf (users "mesh" and "node"); restart() keeps the store."""

    def __init__(self, workdir: Path):
        if shutil.which(NATS_BINARY) is None:
            raise SystemExit(f"needs {NATS_BINARY} (apt-get install nats-server)")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.users = {"mesh": natsconf.User("mesh", natsconf.new_password(), "mesh"),
                      "node": natsconf.User("node", natsconf.new_password(), "node")}
        natsconf.write(workdir / "nats.conf", natsconf.ServerSettings(
            store_dir=str(workdir / "jetstream"), host=NATS_IP, port=NATS_PORT,
            http_port=MONITOR_PORT),
            list(self.users.values()))
        self.log_path = workdir / "nats.log"
        self.proc: subprocess.Popen | None = None
        self.url = f"nats://{NATS_IP}:{NATS_PORT}"

    def start(self, timeout_s: float = 30.0) -> float:
        """Start and wait until it accepts connections; returns the wall time it did."""
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([NATS_BINARY, "-c", str(self.workdir / "nats.conf")],
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited: {self.log_path.read_text()[-1500:]}")
            if b"Server is ready" in self.log_path.read_bytes()[offset:]:
                with contextlib.suppress(OSError), socket.create_connection((NATS_IP, NATS_PORT), 0.5):
                    return time.time()
            time.sleep(0.02)
        raise RuntimeError("nats-server did not become ready")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def counters(self) -> dict[str, Any]:
        """From the monitoring endpoint: connections, messages and bytes in and out,
        JetStream consumers and API requests (all since this process started)."""
        import urllib.request

        def get(path: str) -> dict[str, Any]:
            with urllib.request.urlopen(f"http://127.0.0.1:{MONITOR_PORT}{path}", timeout=5) as r:
                return json.load(r)
        v, j = get("/varz"), get("/jsz")
        return {"connections": v["connections"], "in_msgs": v["in_msgs"],
                "out_msgs": v["out_msgs"], "in_bytes": v["in_bytes"], "out_bytes": v["out_bytes"],
                "consumers": j.get("consumers", 0), "api_requests": j.get("api", {}).get("total", 0)}

    def stored_at(self, subjects: list[str]) -> dict[str, float]:
        """The wall time JetStream stored the latest message of each subject (its own
        timestamp), read as a node would (STREAM.MSG.GET is in the node's permissions)."""
        import asyncio
        from agent._vendor import nats
        from agent.fleet.decision import STREAM

        async def go() -> dict[str, float]:
            nc = await nats.connect(self.url, user="node", password=self.users["node"].password,
                                    allow_reconnect=False, connect_timeout=3)
            try:
                js = nc.jetstream()
                return {s: (await js.get_last_msg(STREAM, s)).time.timestamp() for s in subjects}
            finally:
                await nc.close()
        return asyncio.run(go())


def proc_usage(pid: int) -> dict[str, float]:
    """RSS (MiB) and CPU seconds (user + system) of a process, from /proc."""
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return {"rss_mib": round(rss, 1), "cpu_s": (int(fields[11]) + int(fields[12])) / tick}


class Proposer:
    """Nodes proposing blocks over the mesh reporting API (mutual TLS, each with its own
    certificate: the mesh takes node and provider from it)."""

    def __init__(self, certs: dict[str, Path], node_certs: dict[str, dict[str, Path]], port: int):
        import grpc
        from agent.proto.swarm.mesh.v1 import mesh_pb2, mesh_pb2_grpc
        self.pb = mesh_pb2
        self.stubs = {}
        self.channels = []
        for node, c in node_certs.items():
            creds = grpc.ssl_channel_credentials(
                root_certificates=certs["ca"].read_bytes(), private_key=c["key"].read_bytes(),
                certificate_chain=c["cert"].read_bytes())
            ch = grpc.secure_channel(f"127.0.0.1:{port}", creds,
                                     options=[("grpc.ssl_target_name_override", "localhost")])
            self.channels.append(ch)
            self.stubs[node] = mesh_pb2_grpc.MeshReportingStub(ch)

    def propose(self, node: str, target: str) -> None:
        pb, pid, now = self.pb, uuid.uuid4().hex, time.time()
        report = pb.Report(id=uuid.uuid4().hex, node_id=node, created_at=now,
                           proposal=pb.Proposal(
                               proposal_id=pid, target=target, rule="net.ssh_bruteforce",
                               rule_version=1, incident_id="i-" + pid[:8],
                               evidence="40 completed handshakes", created_at=now, ttl_s=3600,
                               event_class="system_attack"))
        ack = self.stubs[node].Report(pb.ReportBatch(reports=[report]), timeout=10)
        if list(ack.accepted) != [report.id]:
            raise RuntimeError(f"the mesh did not accept {node}'s proposal for {target}")

    def close(self) -> None:
        for ch in self.channels:
            ch.close()


class AgentNode:
    """A real `swarm-agent run` in its own namespace following the stream, and an observer:
    `nft -j monitor` in that namespace, recording the wall time each element first appeared
    in the agent's fleet table (the kernel's own notification)."""

    def __init__(self, hub: Hub, index: int, workdir: Path, nats: Nats, pub_key: Path):
        from swarmlab.scenario import AgentProcess
        self.ns, self.addr = hub.node_ns(f"agent{index}", 10 + index)
        workdir.mkdir(parents=True, exist_ok=True)
        self.agent = AgentProcess(self.ns, workdir, f"""\
allowlist:
  mesh: [{NATS_IP}/32]
mesh:
  node_id: agent-{index}
fleet:
  nats_url: {nats.url}
  user: node
  password: {nats.users['node'].password}
  keys: [{pub_key}]
metrics:
  listen: null
""")
        self.seen: dict[str, float] = {}
        self.monitor: subprocess.Popen | None = None

    def start(self) -> None:
        self.monitor = subprocess.Popen(["ip", "netns", "exec", self.ns, "nft", "-j", "monitor"],
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, args=(self.monitor.stdout,), daemon=True).start()
        self.agent.start()

    def _read(self, stream) -> None:
        for line in stream:
            at = time.time()
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            el = obj.get("add", {}).get("element") if isinstance(obj, dict) else None
            if not el or el.get("table") != "swarm_agent_fleet":
                continue
            for e in el.get("elem", {}).get("set", []):
                v = e["elem"]["val"] if isinstance(e, dict) and "elem" in e else e
                if isinstance(v, str):
                    self.seen.setdefault(v + ("/128" if ":" in v else "/32"), at)

    def cursor(self) -> int | None:
        import sqlite3
        try:
            with sqlite3.connect(f"file:{self.agent.db_path}?mode=ro", uri=True) as c:
                rows = c.execute("SELECT seq FROM fleet_cursor").fetchall()
        except sqlite3.Error:
            return None
        return rows[0][0] if rows else None

    def pid(self) -> int:
        return self.agent.pid

    def stop(self) -> None:
        self.agent.stop()
        if self.monitor is not None and self.monitor.poll() is None:
            self.monitor.kill()
            self.monitor.wait(5)

