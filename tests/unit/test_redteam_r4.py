"""Red-team round 4 on issue 10, the findings that need no kernel: each test fails on the
code as it was attacked and passes once the finding is fixed.

R4-4  "never acted on" (the host's GPU services, gpu.system_cgroups) is only a condition
      a rule may or may not write (`system: false`): a custom or edited policy rule without
      it, loaded or reloaded, kills nvidia-persistenced / the fabric manager.
R4-5  The control API's AuthorizeGpu stores grants without the documented per-source limit
      (gpugrant.MAX_GRANTS): a runaway scheduler grows the table, and the list every GPU
      event is judged against, without bound.
"""
from __future__ import annotations

import pytest

from agent.config import Config, Gpu
from agent.detect.rules import Detector, RuleError, parse_rules
from agent.gpuguard import GpuGuard
from agent.gpugrant import MAX_GRANTS, GrantError
from agent.model import Event
from agent.respond.engine import Responder
from agent.state import gpugrants
from agent.state.store import Store
from tests.unit.test_gpu_grants import _Enforcer  # the responder's live path, recorded

# A site rule as an operator writes it from the documentation ("a process of a workload not
# authorized for this GPU"), without the packaged rule's `system: false` line.
_SITE_RULE = {"rules": [{
    "id": "site.gpu_unauthorized", "version": 1, "class": "policy_violation",
    "severity": "high", "action": "kill",
    "description": "no unauthorized process on our GPUs",
    "match": [{"event": "gpu.process", "where": {"resolved": True, "authorized": False}}]}]}


@pytest.mark.parametrize("on_violation", ["kill", "freeze"])
@pytest.mark.parametrize("cgroup, exe", [
    ("/system.slice/nvidia-fabricmanager.service", "/usr/bin/nv-fabricmanager"),
    ("/system.slice/nvidia-persistenced.service", "/usr/bin/nvidia-persistenced"),
])
def test_r4_4_a_rule_cannot_turn_the_hosts_gpu_services_into_violations(
        tmp_path, on_violation, cgroup, exe):
    """The host's GPU services are "never acted on" (agent/gpugrant.py, README): that must
    hold whatever a loaded rule says. Found: only the packaged rule's `system: false`
    keeps them out; the detector, the responder and the enforcers do not."""
    try:
        rules = parse_rules(_SITE_RULE, origin="site.yaml")
    except RuleError:
        return              # refusing such a rule at load is a fix too
    cfg = Config(state_dir=str(tmp_path), gpu=Gpu(on_violation=on_violation))
    ev = Event(kind="gpu.process", subject="pid:777", mono_ns=2, first_mono_ns=1, fields={
        "gpu_index": 0, "gpu_uuid": "GPU-aaaa", "pid": 777, "resolved": True,
        "start_ticks": 100, "cgroup": cgroup, "container_id": None, "uid": 0, "euid": 0,
        "exe": exe})
    findings = Detector(rules, cfg).evaluate(ev, 3)
    enforcer = _Enforcer()
    with Store(tmp_path / "r.db") as store:
        responder = Responder(cfg, store, enforcer, rules=rules)
        for f in findings:
            assert f.evidence.get("system") is True     # the verdict knows what it is
            responder.handle(f)
    assert enforcer.applied == [], (
        f"{[(m.kind.value, m.target) for m in enforcer.applied]} applied to the host's GPU "
        f"service {cgroup} (system: true) because the rule omits `system: false`")


def test_r4_5_the_api_keeps_to_the_grant_limit(tmp_path):
    """AuthorizeGpu past gpugrant.MAX_GRANTS grants in the store: one sentence
    (GrantError, INVALID_ARGUMENT over the API), nothing stored. Found: stored."""
    cfg = Config(state_dir=str(tmp_path))
    with Store(tmp_path / "g.db") as store:
        # MAX_GRANTS grants made by earlier calls (one row each: a workload and a GPU)
        gpugrants.authorize(store, "/kubepods.slice/full", [f"GPU-{n}" for n in range(MAX_GRANTS)],
                            "", 1.0, "scheduler")
        guard = GpuGuard(cfg, store, publish=lambda p: None, emit=lambda e: None)
        assert len(guard.policy.grants) == MAX_GRANTS
        with pytest.raises(GrantError):
            guard.authorize("/kubepods.slice/one-more", ["0"], "job", "scheduler", 2.0)
        assert len(gpugrants.grants(store)) == MAX_GRANTS
