"""End to end with the product on both sides: a real agent (`swarm-agent run`) in the
victim namespace reports over mutual TLS across the veth link to the real mesh service
(`python -m mesh run`) on a second address of the attacker's side; a port scan from the
attacker makes an incident. The fleet view (`swarm-mesh nodes|incidents --json`) then
shows the node alive under its certificate's name and provider, with the agent's version,
its rule set and its live incident by class."""
from __future__ import annotations

import pytest

from agent import __version__
from agent.detect.ruleset import load_ruleset
from swarmlab import attacks
from swarmlab.lab import sh, wait_for
from swarmlab.scenario import NETWORK_RULES, AgentProcess
from tests.meshkit import MeshProcess, node_cert, write_config
from tests.meshrecv import make_certs

pytestmark = pytest.mark.privileged


def test_a_real_agent_appears_in_the_fleet_view_with_its_incident(lab, tmp_path):
    mesh_ip = f"10.{lab.subnet}.0.3"
    sh("ip", "addr", "add", f"{mesh_ip}/24", "dev", "a0", ns=lab.attacker)
    certs = make_certs(tmp_path / "certs", server_ips=(mesh_ip,))
    node = node_cert(certs, "victim", "victim-node", "provider-v")
    cfg = write_config(tmp_path / "mesh.yaml", certs, f"sqlite:///{tmp_path}/mesh.db",
                       listen=f"{mesh_ip}:7443")
    (tmp_path / "agent").mkdir()
    agent = AgentProcess(lab.victim, tmp_path / "agent", f"""\
allowlist:
  mesh: [{mesh_ip}/32]
mesh:
  endpoint: "{mesh_ip}:7443"
  tls_ca: {certs['ca']}
  tls_cert: {node['cert']}
  tls_key: {node['key']}
  node_id: victim
  heartbeat_s: 1.0
  backoff_initial_s: 0.2
  backoff_max_s: 1.0
metrics:
  listen: null
""")
    mesh = MeshProcess(cfg, prefix=("ip", "netns", "exec", lab.attacker)).start()
    try:
        agent.start()
        scan = attacks.run(lab.attacker, "port_scan", target=lab.addr("victim"),
                           ports="1000-1400", duration_s=3)
        assert scan["sent"] > 0, scan

        def seen() -> bool:
            nodes = mesh.cli("nodes", "--json")
            return bool(nodes) and nodes[0]["version"] != "" and \
                bool(nodes[0]["open_incidents"])
        wait_for(seen, timeout_s=30)
        [n] = mesh.cli("nodes", "--json")
        incidents = mesh.cli("incidents", "--json", "--class", "system_attack")
    finally:
        agent.stop()
        mesh.stop()
    loaded = load_ruleset(NETWORK_RULES)
    assert (n["node"], n["provider"], n["claimed"], n["status"], n["version"], n["ready"]) == \
        ("victim-node", "provider-v", "victim", "alive", __version__, True)
    assert (n["ruleset_version"], n["rules"]) == (loaded.version, loaded.names)
    assert incidents and {i["node"] for i in incidents} == {"victim-node"}
    assert n["open_incidents"]["system_attack"] == len(incidents)
