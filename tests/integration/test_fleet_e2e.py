"""The fleet end to end, every piece real: five agents (nodes A..E) in their own network
namespaces on one bridge, a hub namespace running nats-server (the fleet's generated
config: mesh and node users) and the mesh service (`swarm-mesh run`, mutual TLS, signing
key, SQLite or PostgreSQL store), and an attacker namespace on the same bridge.

A block on node A (an operator's `swarm-agent block` there) travels as a proposal in A's
outbox to the mesh, which decides under its policy (here min_nodes 1: one node's block
is enough, an operator's choice; the default needs corroboration, tested in
test_fleet_mesh.py), signs and publishes it; B..E verify and put it in their kernel. A
revocation from the mesh lifts it everywhere. A node cut off for 30 s catches up when it
comes back; a mesh service killed while a node proposes loses nothing.
"""
from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from swarmlab.lab import sh, wait_for
from swarmlab.scenario import AgentProcess
from tests.integration.nftlab import listener, reaches
from tests.fleetnats import fleet_in_force
from tests.meshkit import MeshProcess, node_cert, write_config
from tests.meshrecv import make_certs
from tests.natsserver import NatsServer
from tests.pgcluster import pg_cluster, pg_url  # noqa: F401  (fixtures)

pytestmark = pytest.mark.privileged
NODES = {"a": "provider-a", "b": "provider-b", "c": "provider-c", "d": "provider-a",
         "e": "provider-b"}
AGENT_CLI = [sys.executable, "-m", "agent.cli.main"]
MESH_PORT = 7443
PORT = 8080


ATTACKER = "198.51.100.66"      # the mesh never spreads a block of a private address


class Bridge:
    """Namespaces on one bridge (in a namespace of its own): hub .2, attacker .66, node i
    at .10+i, all in 10.<subnet>.0.0/24. The attacker also holds ATTACKER (a public-looking
    address, on link for every node): the fleet policy refuses RFC 1918 targets."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.subnet = 100 + secrets.randbelow(150)
        self.core = f"swf-core-{self.tag}"
        self.namespaces: list[str] = []

    def ip(self, host: int) -> str:
        return f"10.{self.subnet}.0.{host}"

    def add(self, name: str, host: int) -> str:
        ns = f"swf-{name}-{self.tag}"
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "link", "set", "lo", "up", ns=ns)
        port = f"p{host}"
        sh("ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", ns=self.core)
        sh("ip", "link", "set", "eth0", "netns", ns, ns=self.core)
        sh("ip", "link", "set", port, "master", "br0", "up", ns=self.core)
        sh("ip", "addr", "add", f"{self.ip(host)}/24", "dev", "eth0", ns=ns)
        sh("ip", "link", "set", "eth0", "up", ns=ns)
        if name == "att":
            sh("ip", "addr", "add", f"{ATTACKER}/32", "dev", "eth0", ns=ns)
        else:
            sh("ip", "route", "add", f"{ATTACKER}/32", "dev", "eth0", ns=ns)
        return ns

    def __enter__(self) -> "Bridge":
        sh("ip", "netns", "add", self.core)
        self.namespaces.append(self.core)
        sh("ip", "link", "add", "br0", "type", "bridge", ns=self.core)
        sh("ip", "link", "set", "br0", "up", ns=self.core)
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in reversed(self.namespaces):
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                subprocess.run(["kill", "-9", pid], check=False)
            sh("ip", "netns", "del", ns, check=False)


class Fleet:
    def __init__(self, tmp: Path, store_url: str):
        self.tmp, self.store_url = tmp, store_url
        self.bridge = Bridge()
        self.agents: dict[str, AgentProcess] = {}

    def __enter__(self) -> "Fleet":
        b = self.bridge.__enter__()
        try:
            self._start(b)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self, b: Bridge) -> None:
        tmp = self.tmp
        self.hub = b.add("hub", 2)
        self.attacker = b.add("att", 66)
        hub_ip = b.ip(2)
        certs = make_certs(tmp / "certs", server_ips=(hub_ip,))
        self.nats = NatsServer(tmp / "nats", nodes=("node",), host=hub_ip, ns=self.hub,
                               port=4222).start()
        (tmp / "mesh.password").write_text(self.nats.creds("mesh")["password"] + "\n")
        (tmp / "node.password").write_text(self.nats.creds("node")["password"] + "\n")
        keys = tmp / "keys"
        cfg = write_config(tmp / "mesh.yaml", certs, self.store_url,
                           listen=f"{hub_ip}:{MESH_PORT}", extra=f"""
nats:
  url: {self.nats.url}
  user: mesh
  password_file: {tmp / 'mesh.password'}
signing:
  private_key: {keys / 'decisions.key'}
policy:
  min_nodes: 1
  min_providers: 1
  stage_s: 0
""")
        self.mesh = MeshProcess(cfg, prefix=("ip", "netns", "exec", self.hub))
        subprocess.run([sys.executable, "-m", "mesh", "keygen", "--dir", str(keys),
                        "--config", str(cfg)], check=True, capture_output=True, timeout=60)
        self.mesh.start()
        for i, (name, provider) in enumerate(NODES.items()):
            ns = b.add(name, 10 + i)
            c = node_cert(certs, f"node-{name}", f"node-{name}", provider)
            work = tmp / f"node-{name}"
            work.mkdir()
            self.agents[name] = AgentProcess(ns, work, f"""\
allowlist:
  mesh: [{hub_ip}/32]
mesh:
  endpoint: "{hub_ip}:{MESH_PORT}"
  tls_cert: {c['cert']}
  tls_key: {c['key']}
  tls_ca: {certs['ca']}
  node_id: node-{name}
  heartbeat_s: 2
  backoff_initial_s: 0.2
  backoff_max_s: 1.0
fleet:
  nats_url: {self.nats.url}
  user: node
  password_file: {tmp / 'node.password'}
  keys: [{keys / 'decisions.pub'}]
  reconnect_initial_s: 0.2
  reconnect_max_s: 1.0
metrics:
  listen: null
""")
        with ThreadPoolExecutor(len(self.agents)) as pool:      # five starts at once
            for done in [pool.submit(a.start) for a in self.agents.values()]:
                done.result()

    def __exit__(self, *exc: object) -> None:
        for agent in self.agents.values():
            agent.stop()
        if getattr(self, "mesh", None):
            self.mesh.stop()
        if getattr(self, "nats", None):
            self.nats.kill()
        self.bridge.__exit__()

    def agent_cli(self, name: str, *args: str) -> str:
        out = subprocess.run([*AGENT_CLI, *args, "--config", str(self.agents[name].config_path)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def mesh_cli(self, *args: str) -> dict:
        out = subprocess.run(["ip", "netns", "exec", self.hub, sys.executable, "-m", "mesh", *args,
                              "--config", str(self.mesh.config), "--json"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr + out.stdout
        return json.loads(out.stdout)

    def in_force(self, name: str) -> set[str]:
        """Addresses in node `name`'s fleet sets, read from its kernel."""
        return fleet_in_force(self.agents[name].ns)

    def enforced_on(self, names, target: str) -> bool:
        return all(target in self.in_force(n) for n in names)

    def ip_of(self, name: str) -> str:
        return self.bridge.ip(10 + list(NODES).index(name))

    def reaches(self, names) -> list[bool]:
        """Whether the attacker completes a TCP handshake with a service on each node."""
        with contextlib.ExitStack() as stack:
            for n in names:
                stack.enter_context(listener(self.agents[n].ns, self.ip_of(n), PORT))
            return [reaches(self.attacker, self.ip_of(n), PORT, src=ATTACKER) for n in names]


@pytest.fixture
def fleet(request, tmp_path):
    store = (f"sqlite:///{tmp_path / 'mesh.db'}" if request.param == "sqlite"
             else request.getfixturevalue("pg_url"))
    with Fleet(tmp_path, store) as f:
        yield f


@pytest.mark.parametrize("fleet", ["postgresql"], indirect=True)
def test_a_block_on_node_a_is_enforced_on_b_to_e_and_a_revocation_lifts_it(fleet):
    block_on_a_spreads_and_a_revocation_lifts_it(fleet)


@pytest.mark.parametrize("fleet", ["sqlite"], indirect=True)
def test_the_same_on_sqlite_then_a_node_cut_off_30_s_and_a_killed_mesh(fleet):
    """One fleet (its setup is 20 s) for both: the block and revoke, then the partition."""
    block_on_a_spreads_and_a_revocation_lifts_it(fleet)
    node_cut_off_for_30_s_catches_up_and_a_killed_mesh_loses_nothing(fleet)


def block_on_a_spreads_and_a_revocation_lifts_it(fleet):
    attacker = ATTACKER
    others = ["b", "c", "d", "e"]
    assert all(fleet.reaches(others))
    t0 = time.monotonic()
    fleet.agent_cli("a", "block", attacker, "--ttl", "600", "--reason", "ssh brute force")
    assert wait_for(lambda: fleet.enforced_on(others, attacker), timeout_s=20, interval_s=0.05)
    took_s = time.monotonic() - t0
    assert not any(fleet.reaches(others))
    decisions = fleet.mesh_cli("decisions")
    assert [(d["action"], d["target"], d["state"]) for d in decisions] == \
        [("block", f"{attacker}/32", "published")]
    assert decisions[0]["provenance"]["nodes"] == ["node-a"]
    # what node B's operator sees: the fleet's block, who decided it, in the CLI
    seen = json.loads(fleet.agent_cli("b", "fleet", "--json"))
    assert seen["enabled"] and seen["in_force"] == 1
    assert [d["target"] for d in seen["decisions"]] == [f"{attacker}/32"]
    assert "fleet: 1 blocks decided by the mesh" in fleet.agent_cli("b", "mitigations")
    fleet.mesh_cli("revoke", attacker, "--reason", "false positive", "--operator", "sec")
    assert wait_for(lambda: not any(attacker in fleet.in_force(n) for n in others),
                    timeout_s=20, interval_s=0.05)
    assert all(fleet.reaches(others))
    # A's own local block is its own: a fleet revocation does not lift it
    assert attacker in fleet.agent_cli("a", "mitigations")
    print(f"\nblock on A -> enforced on B..E: {took_s:.2f} s")


def node_cut_off_for_30_s_catches_up_and_a_killed_mesh_loses_nothing(fleet):
    first, second = "198.51.100.7", "198.51.100.8"
    e = fleet.agents["e"].ns
    # cut E off from the hub (its NATS and mesh) for 30 s: a table of the test's own
    sh("nft", "add table inet partition", ns=e)
    sh("nft", "add chain inet partition out { type filter hook output priority -10 ; }", ns=e)
    sh("nft", f"add rule inet partition out ip daddr {fleet.bridge.ip(2)} drop", ns=e)
    sh("nft", "add chain inet partition in { type filter hook input priority -10 ; }", ns=e)
    sh("nft", f"add rule inet partition in ip saddr {fleet.bridge.ip(2)} drop", ns=e)
    cut = time.monotonic()
    fleet.mesh_cli("block", first, "--reason", "scanner", "--operator", "sec")
    assert wait_for(lambda: fleet.enforced_on(["a", "b", "c", "d"], first), timeout_s=20)
    assert first not in fleet.in_force("e")
    # meanwhile the mesh service dies; node B proposes while it is down
    fleet.mesh.kill()
    fleet.agent_cli("b", "block", second, "--ttl", "600", "--reason", "ssh brute force")
    time.sleep(2)
    fleet.mesh.start()
    assert wait_for(lambda: fleet.enforced_on(["a", "c", "d"], second), timeout_s=30)
    time.sleep(max(0.0, 30 - (time.monotonic() - cut)))
    assert not {first, second} & fleet.in_force("e"), "E was cut off"
    sh("nft", "delete table inet partition", ns=e)
    back = time.monotonic()
    assert wait_for(lambda: fleet.enforced_on(["e"], first) and fleet.enforced_on(["e"], second),
                    timeout_s=60, interval_s=0.1)
    print(f"\nE caught up {time.monotonic() - back:.1f} s after the partition ended")
    assert {d["target"] for d in fleet.mesh_cli("decisions")} >= {f"{first}/32", f"{second}/32"}
