"""One host, several agents: the process probe of an agent reports the processes of its own
network namespace, and the host agent (initial namespace) those of every namespace without
a live agent of its own; one breach-shaped exec, one report. Real probes in real
namespaces; the registrations go to a directory of the test's own."""
from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import Config, Probes
from swarmlab.lab import netns, serving
from agent.sources.abi import ProcProg
from agent.sources.owners import OwnerConflict
from agent.sources.proc import ProcProbe
from agent.sources.procscope import REFRESH_OWNERS_S
from tests.conftest import skip_unsupported
from tests.integration.test_proc_probe import require_proc_probe

pytestmark = pytest.mark.privileged
PY = sys.executable

# A "web server" that starts a shell: breach.service_shell's shape.
SERVICE = """
import ctypes, subprocess, sys
ctypes.CDLL(None).prctl(15, b"nginx", 0, 0, 0)
sys.exit(subprocess.run(["sh", "-c", "exit 3"]).returncode)
"""
# Another agent's process probe, in a process of its own (as `ip netns exec NS swarm-agent`).
AGENT = """
import sys, time
from agent.config import Config, Probes
from agent.sources.capability import ensure_tracefs
from agent.sources.proc import ProcProbe
ensure_tracefs()
ProcProbe(Config(state_dir=sys.argv[2], probes=Probes(process_owners=sys.argv[1]))).open()
print("ready", flush=True)
time.sleep(60)
"""


@pytest.fixture(scope="module", autouse=True)
def built():
    require_proc_probe()


@pytest.fixture
def cfg(tmp_path) -> Config:
    return Config(state_dir=str(tmp_path / "state"),
                  probes=Probes(process_owners=str(tmp_path / "owners")))


def open_in(ns: str | None, cfg: Config) -> ProcProbe:
    """A process probe opened in namespace `ns` (None: this one, the initial namespace)."""
    probe = ProcProbe(cfg)
    if ns is None:
        probe.open()
    else:
        with netns(ns):
            probe.open()
    if probe.status()[ProcProg.EXEC]["state"] != "loaded":
        probe.close()
        skip_unsupported(f"process probe degraded here: {probe.status()}")
    return probe


def service_shell(ns: str | None) -> int:
    """Runs the service-shell shape in namespace `ns`; the pid of its "nginx"."""
    proc = subprocess.Popen((["ip", "netns", "exec", ns] if ns else []) + [PY, "-c", SERVICE])
    assert proc.wait(timeout=20) == 3
    return proc.pid


def reporters(probes: dict[str, ProcProbe], pid: int) -> set[str]:
    """Which probes reported the shell that `pid` started. The tracepoint runs every
    attached program before exec returns, so once `pid` has exited each probe's ring
    buffer holds whatever it will ever get."""
    return {name for name, p in probes.items()
            if any(e.kind == "proc.exec" and e.fields["ppid"] == pid for e in p.poll())}


def test_two_namespace_agents_each_report_only_their_own(lab, cfg):
    probes = {"attacker": open_in(lab.attacker, cfg), "victim": open_in(lab.victim, cfg)}
    try:
        assert reporters(probes, service_shell(lab.attacker)) == {"attacker"}
        assert reporters(probes, service_shell(lab.victim)) == {"victim"}
        assert reporters(probes, service_shell(None)) == set()   # the host's: no host agent here
    finally:
        for p in probes.values():
            p.close()


def test_the_host_agent_leaves_a_namespace_to_its_own_agent(lab, cfg):
    ns_agent = open_in(lab.attacker, cfg)
    host = open_in(None, cfg)
    probes = {"host": host, "attacker": ns_agent}
    try:
        assert host.host_scope and not ns_agent.host_scope
        assert reporters(probes, service_shell(lab.attacker)) == {"attacker"}
        assert reporters(probes, service_shell(lab.victim)) == {"host"}   # a container, no agent
        assert reporters(probes, service_shell(None)) == {"host"}
        ns_agent.close()                 # the namespace is the host agent's again
        host.refresh_owners()
        assert reporters(probes, service_shell(lab.attacker)) == {"host"}
    finally:
        host.close()
        ns_agent.close()


def test_a_dead_agent_does_not_blind_the_host_agent(lab, cfg):
    owners = cfg.probes.process_owners
    with serving(lab.attacker, PY, "-c", AGENT, owners, cfg.state_dir) as agent:
        host = open_in(None, cfg)
        try:
            assert reporters({"host": host}, service_shell(lab.attacker)) == set()
            with pytest.raises(OwnerConflict, match=f"already watched by the agent with pid {agent.pid}"):
                open_in(lab.attacker, cfg)
            agent.kill()
            agent.wait(timeout=5)
            # No refresh from user space: the kernel forgot the owner when it exited.
            assert reporters({"host": host}, service_shell(lab.attacker)) == {"host"}
            assert Path(owners, str(_netns_ino(lab.attacker))).exists()   # a stale registration
            host.refresh_owners()
            assert reporters({"host": host}, service_shell(lab.attacker)) == {"host"}
            replacement = open_in(lab.attacker, cfg)   # the stale registration is replaced
            try:
                host.refresh_owners()
                assert reporters({"host": host, "new": replacement},
                                 service_shell(lab.attacker)) == {"new"}
            finally:
                replacement.close()
        finally:
            host.close()


def _netns_ino(ns: str) -> int:
    return Path(f"/run/netns/{ns}").stat().st_ino


def test_the_running_host_agent_learns_of_a_new_agent(lab, cfg):
    host, events = open_in(None, cfg), []

    async def main() -> tuple[int, int, ProcProbe]:
        task = asyncio.create_task(host.run(events.append))
        try:
            ns_agent = open_in(lab.attacker, cfg)        # registers after the host started
            await asyncio.sleep(REFRESH_OWNERS_S + 0.5)
            pid = await asyncio.to_thread(service_shell, lab.attacker)
            unowned = await asyncio.to_thread(service_shell, lab.victim)
            await asyncio.sleep(0.3)                     # let run() drain what it got
            return pid, unowned, ns_agent
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    try:
        pid, unowned, ns_agent = asyncio.run(main())
        try:
            assert reporters({"attacker": ns_agent}, pid) == {"attacker"}
            shells = lambda p: [e for e in events if e.kind == "proc.exec" and e.fields["ppid"] == p]
            assert shells(pid) == [] and len(shells(unowned)) == 1
        finally:
            ns_agent.close()
    finally:
        host.close()
