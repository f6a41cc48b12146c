"""Node and service isolation against the real kernel: NftEnforcer in the victim namespace,
real cgroup v2 groups (throw-away, removed after) holding real server processes, real
handshakes from the attacker namespace."""
from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from swarmlab.breachlab import throwaway_cgroup
from agent.config import Allowlist, Config
from agent.enforce.cgroup import CgroupEnforcer, CgroupError, cgroup2_mount, own_cgroup
from agent.enforce.isolate import IsolationRefused
from agent.enforce.nft import NftEnforcer
from swarmlab.lab import Lab, netns, serving, sh, spawn_in, wait_for
from agent.model import Mitigation, MitigationKind
from tests.integration.nftlab import _LISTENER, connect, listener, reaches

pytestmark = pytest.mark.privileged
PORT, OTHER_PORT = 8080, 8081


def mit(kind: MitigationKind, target: str, **params: object) -> Mitigation:
    now = time.time()
    return Mitigation(kind, target, now, now + 600, params=dict(params))


def table(lab: Lab) -> str:
    return sh("nft", "list", "table", "inet", "swarm_agent", ns=lab.victim).stdout


@contextlib.contextmanager
def listener_in(cg: Path, ns: str, addr: str, port: int, banner: str) -> Iterator[None]:
    with serving(ns, sys.executable, "-c", _LISTENER, addr, str(port), banner, cgroup=cg):
        yield


def connect_from(cg: Path, ns: str, addr: str, port: int) -> str:
    """The banner a one-shot client started in cgroup `cg` reads (empty on failure)."""
    code = ("import socket,sys\ns=socket.create_connection((sys.argv[1],int(sys.argv[2])),0.5)\n"
            "print(s.recv(64).decode())")
    proc = spawn_in(ns, sys.executable, "-c", code, addr, str(port), cgroup=cg)
    out, _ = proc.communicate(timeout=10)
    return out.strip()


@pytest.fixture
def nft(lab: Lab) -> Iterator[list[NftEnforcer]]:
    """Run the test thread in the victim namespace; remove every enforcer's table after."""
    built: list[NftEnforcer] = []
    with netns(lab.victim):
        yield built
        for e in built:
            e.remove()
            e.close()


def make(built: list[NftEnforcer], agent_cgroup: str | None = None, **allow: tuple[str, ...]) -> NftEnforcer:
    e = NftEnforcer(Config(allowlist=Allowlist(**allow)), agent_cgroup=agent_cgroup)
    built.append(e)
    e.setup([], time.time())
    return e


def test_node_isolation_keeps_management_and_agent_connections(lab, nft):
    friend = f"10.{lab.subnet}.0.77"
    sh("ip", "addr", "add", f"{friend}/24", "dev", "a0", ns=lab.attacker)
    victim, attacker = lab.addr("victim"), lab.addr("attacker")
    with throwaway_cgroup("swa-test-agent") as agent_cg, \
            listener(lab.victim, victim, PORT), listener(lab.attacker, attacker, PORT, "mesh"):
        agent_path = "/" + str(agent_cg.relative_to(cgroup2_mount()))
        e = make(nft, agent_cgroup=agent_path, management=(f"{friend}/32",))
        m = mit(MitigationKind.ISOLATE_NODE, "node")
        e.apply(m, time.time())
        assert not reaches(lab.attacker, victim, PORT, src=attacker)
        assert connect(lab.attacker, victim, PORT, src=friend) == "ok"
        # The agent's own outgoing connection still works; anyone else's is cut.
        assert connect_from(agent_cg, lab.victim, attacker, PORT) == "mesh"
        assert connect(lab.victim, attacker, PORT) is None
        assert "isolate_in" in table(lab) and "counter packets" in table(lab)
        assert not e.reconcile([m], time.time())
        e.lift(m)
        assert connect(lab.attacker, victim, PORT, src=attacker) == "ok"
        assert connect(lab.victim, attacker, PORT) == "mesh"


def test_node_isolation_refused_without_allowlist_unless_forced(lab, nft):
    e = make(nft)
    before = table(lab)
    with pytest.raises(IsolationRefused, match="no mesh or management network"):
        e.apply(mit(MitigationKind.ISOLATE_NODE, "node"), time.time())
    assert table(lab) == before
    victim = lab.addr("victim")
    with listener(lab.victim, victim, PORT):
        m = mit(MitigationKind.ISOLATE_NODE, "node", force=True)
        e.apply(m, time.time())
        assert not reaches(lab.attacker, victim, PORT)
        e.lift(m)
        assert reaches(lab.attacker, victim, PORT)


def test_node_isolation_drift_is_repaired(lab, nft):
    e = make(nft, mesh=(f"10.{lab.subnet}.0.77/32",))
    desired = [mit(MitigationKind.ISOLATE_NODE, "node")]
    e.setup(desired, time.time())
    victim = lab.addr("victim")
    with listener(lab.victim, victim, PORT):
        assert not reaches(lab.attacker, victim, PORT)
        for chain in ("isolate_in", "isolate_out"):
            sh("nft", "flush", "chain", "inet", "swarm_agent", chain, ns=lab.victim)
        assert reaches(lab.attacker, victim, PORT)
        assert e.reconcile(desired, time.time()).table_recreated
        assert not reaches(lab.attacker, victim, PORT)
        assert not e.reconcile(desired, time.time())
        assert e.reconcile([], time.time()).elements_removed == ["isolation:node"]
        assert reaches(lab.attacker, victim, PORT)


def _events(cg: Path) -> dict[str, str]:
    return dict(line.split() for line in (cg / "cgroup.events").read_text().splitlines())


def test_service_isolation_cuts_and_freezes_only_the_cgroup(lab, nft):
    victim = lab.addr("victim")
    with throwaway_cgroup() as cg, listener_in(cg, lab.victim, victim, PORT, "svc"), \
            listener(lab.victim, victim, OTHER_PORT, "other"):
        path = "/" + str(cg.relative_to(cgroup2_mount()))
        e, freezer = make(nft), CgroupEnforcer()
        m = mit(MitigationKind.ISOLATE_SERVICE, path)
        assert connect(lab.attacker, victim, PORT) == "svc"
        e.apply(m, time.time())
        assert not reaches(lab.attacker, victim, PORT)
        assert connect(lab.attacker, victim, OTHER_PORT) == "other"
        # `ip netns exec` hides the cgroup mount from nft, so it lists the cgroup's id.
        assert f"socket cgroupv2 level 1 {cg.stat().st_ino} counter" in table(lab)
        freezer.apply(m, time.time())
        wait_for(lambda: _events(cg)["frozen"] == "1", 5.0)
        assert connect(lab.attacker, victim, OTHER_PORT) == "other"
        assert not freezer.reconcile([m], time.time())
        freezer.lift(m)
        e.lift(m)
        wait_for(lambda: _events(cg)["frozen"] == "0", 5.0)
        assert connect(lab.attacker, victim, PORT) == "svc"
        assert "cgroupv2" not in table(lab)


def test_service_isolation_bad_targets_change_nothing(lab, nft):
    with throwaway_cgroup("swa-test-agent") as agent_cg:
        agent_path = "/" + str(agent_cg.relative_to(cgroup2_mount()))
        e = make(nft, agent_cgroup=agent_path)
        freezer = CgroupEnforcer(agent_cgroup=agent_path)
        before = table(lab)
        for target, why in (("/swa-test-no-such-group", "no cgroup"), ("/", "root cgroup"),
                            (agent_path, "holds the agent"), ("/a/../b", "not a cgroup path"),
                            ('/x" accept', "not a cgroup path")):
            m = mit(MitigationKind.ISOLATE_SERVICE, target)
            with pytest.raises(CgroupError, match=why):
                e.apply(m, time.time())
            with pytest.raises(CgroupError, match=why):
                freezer.apply(mit(MitigationKind.FREEZE_CGROUP, target), time.time())
        assert table(lab) == before
        assert (agent_cg / "cgroup.freeze").read_text().strip() == "0"
        assert freezer.is_allowlisted(agent_path) and freezer.is_allowlisted("/")
    # By default the agent is this process: its cgroup (the root here, maybe) is refused.
    with pytest.raises(CgroupError):
        CgroupEnforcer().apply(mit(MitigationKind.FREEZE_CGROUP, own_cgroup()), time.time())
    assert json.loads(sh("nft", "-j", "list", "tables", ns=lab.victim).stdout)
