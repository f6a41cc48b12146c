"""Egress policy against the real kernel: NftEnforcer (and the real agent) in the victim
namespace, real processes in real cgroup v2 groups (throw-away, removed after), a
"metadata service" listening on 169.254.169.254 in the attacker namespace, whose own
nft counter (the receiving side's view, not the agent's) says how many packets arrived."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from agent.config import Config
from agent.enforce.cgroup import cgroup2_mount
from agent.enforce.egress import Scope
from agent.enforce.nft import NftEnforcer
from agent.model import EventClass
from agent.policyconfig import METADATA_V4, EgressRule, Policy
from swarmlab.breachlab import throwaway_cgroup
from swarmlab.lab import Lab, netns, sh, wait_for
from swarmlab.scenario import Scenario
from tests.integration.nftlab import connect, listener
from tests.integration.test_isolation import connect_from

pytestmark = pytest.mark.privileged
METADATA = METADATA_V4.split("/")[0]
PORT = 80
EGRESS_RULES = Path(__file__).resolve().parents[2] / "agent" / "rules" / "egress.yaml"


def arrived(ns: str) -> int:
    """Packets to the metadata address that reached namespace `ns` (its own counter)."""
    out = json.loads(sh("nft", "-j", "list", "chain", "inet", "swa_peer", "seen", ns=ns).stdout)
    return sum(e["counter"]["packets"] for o in out["nftables"] if "rule" in o
               for e in o["rule"]["expr"] if "counter" in e)


def metadata_service(lab: Lab, ns: str, via: str) -> None:
    """169.254.169.254 on namespace `ns` with a counter of what arrives for it; the victim
    routes it through `via`."""
    sh("ip", "addr", "add", f"{METADATA}/32", "dev", "a0", ns=ns)
    sh("nft", "-f", "-", ns=ns, input=(
        "table inet swa_peer { chain seen { type filter hook prerouting priority -400; "
        f"ip daddr {METADATA} counter; }};\n}}\n"))
    sh("ip", "route", "add", f"{METADATA}/32", "via", via, ns=lab.victim)


def cgroup_path(cg: Path) -> str:
    return "/" + str(cg.relative_to(cgroup2_mount()))


@pytest.fixture
def restricted() -> Iterator[Path]:
    with throwaway_cgroup("swa-egress") as cg:
        yield cg


def test_restricted_cgroup_cannot_reach_metadata_others_can(lab, restricted):
    metadata_service(lab, lab.attacker, lab.addr("attacker"))
    path = cgroup_path(restricted)
    child = restricted / "job"
    child.mkdir()
    rule = EgressRule(name="metadata", cgroups=(path,), destinations=(METADATA_V4,))
    with listener(lab.attacker, METADATA, PORT, "secret"), \
            listener(lab.attacker, lab.addr("attacker"), PORT, "public"), netns(lab.victim):
        e = NftEnforcer(Config(policy=Policy(egress=(rule,))))
        try:
            e.setup([], time.time())
            # Denied in the cgroup and in every cgroup below it; not one packet arrives.
            assert connect_from(restricted, lab.victim, METADATA, PORT) == ""
            assert connect_from(child, lab.victim, METADATA, PORT) == ""
            assert arrived(lab.attacker) == 0
            assert e.egress_counts()[Scope("metadata", f"cgroup:{path}")] >= 2
            # Other destinations stay open to it; other cgroups reach the metadata service.
            assert connect_from(restricted, lab.victim, lab.addr("attacker"), PORT) == "public"
            assert connect(lab.victim, METADATA, PORT) == "secret"
            assert arrived(lab.attacker) > 0
            # Drift: the chain flushed by someone else is put back by reconcile.
            sh("nft", "flush", "chain", "inet", "swarm_agent", "egress_out", ns=lab.victim)
            assert e.reconcile([], time.time()).table_recreated
            before = arrived(lab.attacker)
            assert connect_from(restricted, lab.victim, METADATA, PORT) == ""
            assert arrived(lab.attacker) == before
        finally:
            e.remove()
            e.close()


def test_port_rule_and_waiting_cgroup(lab, restricted):
    """A ports-only rule (mining pools): every destination on those ports; a cgroup that
    does not exist yet waits and is enforced by the reconcile after it appears."""
    path = cgroup_path(restricted)
    later = f"{path}-later"
    rules = (EgressRule(name="mining", cgroups=(later,), ports=(PORT,), proto="tcp"),)
    with listener(lab.attacker, lab.addr("attacker"), PORT, "pool"), netns(lab.victim):
        e = NftEnforcer(Config(policy=Policy(egress=rules)))
        try:
            e.setup([], time.time())
            assert e.egress_status()["waiting"] == [f"mining: {later}"]
            new = cgroup2_mount() / later.lstrip("/")
            new.mkdir()
            try:
                assert connect_from(new, lab.victim, lab.addr("attacker"), PORT) == "pool"
                drift = e.reconcile([], time.time())
                assert f"egress:mining:cgroup:{later}" in drift.elements_added
                assert connect_from(new, lab.victim, lab.addr("attacker"), PORT) == ""
                assert e.egress_status()["enforced"] == {"mining": [f"cgroup:{later}"]}
            finally:
                wait_for(lambda: not (new / "cgroup.procs").read_text().strip(), 5.0)
                new.rmdir()
            # The workload ended: its rule goes, the table is not rebuilt for it.
            drift = e.reconcile([], time.time())
            assert not drift.table_recreated and drift.elements_removed == [f"egress:mining:cgroup:{later}"]
            assert e.egress_status()["waiting"] == [f"mining: {later}"]
        finally:
            e.remove()
            e.close()


def test_forwarded_container_traffic_is_dropped_by_the_default(lab):
    """The default policy, no cgroup configured for it: a "container" namespace routed
    through the victim over an interface named like Calico's (`cali*`) cannot reach the
    metadata service behind the victim; its other forwarded traffic passes."""
    meta = lab.add_attacker(1)
    metadata_service(lab, meta, lab.addr("attacker", link=1))
    sh("ip", "route", "add", f"10.{lab.subnet}.0.0/24", "via", lab.addr("victim", link=1), ns=meta)
    sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=lab.victim)
    for args in (("down",), ("name", "caliswa0"), ("up",)):
        sh("ip", "link", "set", "v0" if args != ("up",) else "caliswa0", *args, ns=lab.victim)
    with listener(meta, METADATA, PORT, "secret"), \
            listener(meta, lab.addr("attacker", link=1), PORT, "public"), netns(lab.victim):
        e = NftEnforcer(Config())
        try:
            e.setup([], time.time())
            assert connect(lab.attacker, lab.addr("attacker", link=1), PORT) == "public"
            assert connect(lab.attacker, METADATA, PORT) is None
            assert arrived(meta) == 0
            assert e.egress_counts()[Scope("metadata", "iif:cali*")] >= 1
        finally:
            e.remove()
            e.close()


def test_attempt_becomes_a_policy_violation_incident(restricted):
    """The real agent: an attempt from the restricted cgroup becomes one incident of
    class policy_violation (repeats join it), within a poll or so of the attempt."""
    path = cgroup_path(restricted)
    cfg = (f"rules_file: {EGRESS_RULES}\npolicy:\n  egress_poll_s: 0.2\n  egress:\n"
           f"    - {{name: metadata, cgroups: [{path}], destinations: [{METADATA_V4}]}}\n")
    with Scenario(cfg) as sc:
        metadata_service(sc.lab, sc.lab.attacker, sc.lab.addr("attacker"))
        with listener(sc.lab.attacker, METADATA, PORT, "secret"):
            t0 = time.monotonic()
            assert connect_from(restricted, sc.lab.victim, METADATA, PORT) == ""
            entity = f"egress:metadata:cgroup:{path}"

            def incident():
                with sc.agent.store() as store:
                    found = store.incidents(entity=entity)
                return found[0] if found else None
            inc = wait_for(incident, 10.0)
            took_s = time.monotonic() - t0
            assert connect_from(restricted, sc.lab.victim, METADATA, PORT) == ""
            assert arrived(sc.lab.attacker) == 0
        assert inc.event_class is EventClass.POLICY_VIOLATION
        assert inc.rules == ["policy.metadata_denied@1"], inc
        assert took_s < 5.0
        with sc.agent.store() as store:
            assert len(store.incidents(event_class=EventClass.POLICY_VIOLATION)) == 1


def test_bad_policy_exits_2(tmp_path):
    bad = tmp_path / "config.yaml"
    bad.write_text("policy:\n  egress:\n    - {name: x, cgroups: [/a], destinations: [1.2.3.999]}\n")
    exe = Path(sys.executable).with_name("swarm-agent")
    for args in (["check-config"], ["run"]):
        out = sh(str(exe), *args, "--config", str(bad), check=False)
        assert out.returncode == 2, out
        assert "policy.egress[x].destinations: '1.2.3.999' is not an IP address or CIDR" in out.stderr
        assert "Traceback" not in out.stderr


def test_the_agents_own_cgroup_is_never_cut(lab, restricted):
    """A policy over a parent of the agent's cgroup: the agent still gets out (its
    notifications, the mesh by name); its sibling workloads do not."""
    metadata_service(lab, lab.attacker, lab.addr("attacker"))
    agent_cg, job = restricted / "agent", restricted / "job"
    agent_cg.mkdir()
    job.mkdir()
    rule = EgressRule(name="metadata", cgroups=(cgroup_path(restricted),), destinations=(METADATA_V4,))
    with listener(lab.attacker, METADATA, PORT, "secret"), netns(lab.victim):
        e = NftEnforcer(Config(policy=Policy(egress=(rule,))), agent_cgroup=cgroup_path(agent_cg))
        try:
            e.setup([], time.time())
            assert connect_from(agent_cg, lab.victim, METADATA, PORT) == "secret"
            assert connect_from(job, lab.victim, METADATA, PORT) == ""
        finally:
            e.remove()
            e.close()
