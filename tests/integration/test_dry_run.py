"""Dry run equals live: one scenario of findings run through the real responder and the
real CompositeEnforcer in the lab's victim namespace, once in dry run and once live (real
nft table, real wireguard-go peers), and the two plans compared: the same kinds, targets
and outcomes, the same refusals with the same reasons.

The scenario holds each case where a dry run used to lie: node isolation without a
management allowlist (refused), an attack from a WireGuard peer's tunnel address
(quarantine the peer, not a block), allowlisted sources (the config's and the host's own
address, which only the enforcer knows), a cgroup that does not exist, a process that has
exited, and plain blocks and rate limits that go ahead.
"""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from swarmlab.breachlab import wireguard_pair
from agent.config import Allowlist, Config
from agent.enforce.composite import CompositeEnforcer
from swarmlab.lab import Lab, netns, sh
from agent.model import EventClass, Finding, IncidentState, MitigationState, Severity
from agent.respond.engine import ALLOWLISTED_NOTE, Responder
from agent.state.store import Store
from tests.conftest import skip_unsupported

pytestmark = pytest.mark.privileged
LB = "203.0.113.0/24"


def attack(addr: str, rule: str, action: str = "block") -> Finding:
    entity = addr if addr.startswith("service:") else f"ip:{addr}"
    return Finding(rule, 1, EventClass.SYSTEM_ATTACK, Severity.HIGH, entity, action,
                   time.monotonic_ns(), time.monotonic_ns(), {"dport": 80})


def breach(entity: str, action: str, rule: str, **evidence) -> Finding:
    return Finding(rule, 1, EventClass.SECURITY_BREACH, Severity.CRITICAL, entity, action,
                   time.monotonic_ns(), time.monotonic_ns(), {"pid": 1234, **evidence})


def gone_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def scenario(lab: Lab, tunnel_addr: str, dead_pid: int) -> list[Finding]:
    return [
        breach("node", "isolate_node", "breach.credential_write", uid=0, euid=0, cgroup="/"),
        attack(tunnel_addr, "net.port_scan"),
        attack("203.0.113.10", "net.connection_flood"),
        attack(lab.addr("victim"), "net.http_flood"),
        breach("cgroup:/swa-no-such-cgroup", "isolate_service", "breach.service_shell",
               uid=0, euid=0, cgroup="/swa-no-such-cgroup"),
        breach("node", "isolate_node", "breach.module_load", uid=1000, euid=1000, cgroup="/",
               pid=dead_pid),
        attack("198.51.100.9", "net.scan"),
        attack("service:tcp/80", "net.syn_flood", "rate_limit_service"),
    ]


def plan_of(store: Store) -> list[tuple]:
    """Per incident (by entity): whether it was escalated for a human, and what was done,
    in order; "in force" for a mitigation applied live or planned in dry run (a dry-run
    incident is never marked mitigated: nothing was)."""
    out = []
    for inc in sorted(store.incidents(), key=lambda i: i.entity):
        steps: list[tuple] = []
        for e in store.incident_events(inc.id):
            d = e.data or {}
            if e.kind in ("mitigation_applied", "mitigation_dry_run"):
                steps.append(("in force", d["kind"], d["target"]))
            elif e.kind == "mitigation_failed":
                steps.append(("failed", d["kind"], d["target"], d["error"]))
            elif e.text == ALLOWLISTED_NOTE:
                steps.append(("allowlisted", d["kind"], d["target"]))
        out.append((inc.entity, inc.state is IncidentState.ESCALATED, steps))
    return out


def run(lab: Lab, tmp: Path, findings: list[Finding], dry: bool) -> tuple[list[tuple], str]:
    """The plan of `findings`, and the victim's ruleset afterwards (before clean-up)."""
    cfg = Config(state_dir=str(tmp / "state"), dry_run=dry,
                 allowlist=Allowlist(load_balancers=(LB,)))
    store = Store(tmp / "agent.db")
    with netns(lab.victim):
        enf = CompositeEnforcer(cfg, dry_run=dry)
        try:
            enf.setup([], time.time())
            r = Responder(cfg, store, enf, rules=[])
            for f in findings:
                r.handle(f)
            states = {m.state for m in store.mitigations()}
            assert states <= {MitigationState.FAILED,
                              MitigationState.DRY_RUN if dry else MitigationState.ACTIVE}
            ruleset = sh("nft", "list", "ruleset").stdout
            return plan_of(store), ruleset
        finally:
            enf.remove()
            enf.close()
            store.close()


def test_dry_run_plans_exactly_what_the_live_agent_does(lab, tmp_path):
    for tool in ("wireguard-go", "wg"):
        if shutil.which(tool) is None:
            skip_unsupported(f"needs {tool} (apt-get install wireguard-go wireguard-tools)")
    with wireguard_pair(lab, tmp_path) as wg:
        findings = scenario(lab, wg.attacker_tunnel, gone_pid())
        # Dry first: it must leave the host as it was (the peer in place, no table).
        dry, dry_ruleset = run(lab, tmp_path / "dry", findings, dry=True)
        assert "swarm_agent" not in dry_ruleset
        assert wg.attacker_key in sh("wg", "show", wg.victim_if, "peers", ns=lab.victim).stdout
        live, live_ruleset = run(lab, tmp_path / "live", findings, dry=False)
        assert "198.51.100.9" in live_ruleset                  # live really acted

    assert dry == live
    by_entity = {entity: steps for entity, _, steps in live}
    escalated = {entity for entity, up, _ in live if up}
    assert escalated == {"node", f"ip:{wg.attacker_tunnel}", "cgroup:/swa-no-such-cgroup",
                         "user:1000"}
    (refused,) = by_entity["node"]
    assert refused[:3] == ("failed", "isolate_node", "node")
    assert "no mesh or management network is allowlisted" in refused[3]
    assert by_entity[f"ip:{wg.attacker_tunnel}"] == [("in force", "remove_peer", wg.target)]
    assert by_entity["ip:203.0.113.10"] == [("allowlisted", "block_ip", "203.0.113.10")]
    assert by_entity[f"ip:{lab.addr('victim')}"] == [
        ("allowlisted", "block_ip", lab.addr("victim"))]      # the host's own address
    (bad_cgroup,) = by_entity["cgroup:/swa-no-such-cgroup"]
    assert bad_cgroup[:2] == ("failed", "isolate_service") and "no cgroup" in bad_cgroup[3]
    (exited,) = by_entity["user:1000"]
    assert exited[:2] == ("failed", "kill_process") and "has exited" in exited[3]
    assert by_entity["ip:198.51.100.9"] == [("in force", "block_ip", "198.51.100.9")]
    assert by_entity["service:tcp/80"] == [("in force", "rate_limit_service", "tcp/80")]
