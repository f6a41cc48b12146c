"""GPU authorizations (agent.gpugrant): input validation, what a grant covers, the
verdict the detector adds to gpu.process events (and what a tenant cannot forge into
"system"), the config key, the store table (survives reopening), and the detector's
finding: the workload's cgroup as entity, gpu.on_violation as the action."""
from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import Config, ConfigError, Gpu, load
from agent.detect.rules import Detector, load_rules
from agent.enforce.base import DryRunEnforcer
from agent.gpugrant import GpuPolicy, Grant, GrantError, parse_gpus, parse_workload
from agent.gpuguard import GpuGuard
from agent.model import Event
from agent.respond.engine import Responder
from agent.state import gpugrants
from agent.state.store import Store

CID = "0123456789abcdef" * 4
RULES = Path(__file__).resolve().parents[2] / "agent" / "rules" / "policy.yaml"


def proc(**over) -> dict:
    return {"gpu_index": 0, "gpu_uuid": "GPU-aaaa", "pid": 4242, "resolved": True,
            "start_ticks": 9000, "cgroup": "/kubepods.slice/pod-1/c1", "container_id": None,
            "uid": 1000, "euid": 1000, "exe": "/usr/bin/python3", **over}


@pytest.mark.parametrize("text, want", [
    ("/kubepods.slice/pod-1/", "/kubepods.slice/pod-1"),
    ("  /a//b ", "/a/b"),
    (f"container:{CID.upper()}", f"container:{CID}"),
])
def test_workloads_normalised(text, want):
    assert parse_workload(text) == want


@pytest.mark.parametrize("text, says", [
    ("/", "root cgroup"), ("a/b", "starts with '/'"), ("/a/../b", "component"),
    ("/a/b c", "component"), ("container:abc", "64-hex-digit"), ("", "cgroup path"),
    (None, "cgroup path"),
])
def test_bad_workloads(text, says):
    with pytest.raises(GrantError, match=says):
        parse_workload(text)


def test_gpus():
    assert parse_gpus(["0", 1, "GPU-8d4b-1", "0"]) == ("0", "1", "GPU-8d4b-1")
    assert parse_gpus("ALL") == ("all",)
    for bad, says in (([], "at least one"), (["all", "0"], "alone"), (["x"], "not a GPU"),
                      ([True], "not a GPU"), (["64"], "not a GPU")):
        with pytest.raises(GrantError, match=says):
            parse_gpus(bad)


def test_what_a_grant_covers():
    g = Grant("/kubepods.slice/pod-1", "0")
    assert g.covers("/kubepods.slice/pod-1/c1", None, "GPU-x", 0)
    assert g.covers("/kubepods.slice/pod-1", None, "GPU-x", 0)
    assert not g.covers("/kubepods.slice/pod-10", None, "GPU-x", 0)   # whole components
    assert not g.covers("/kubepods.slice/pod-1/c1", None, "GPU-x", 1)  # another GPU
    assert Grant("/a", "GPU-x").covers("/a", None, "GPU-x", 3)
    c = Grant(f"container:{CID}", "all")
    assert c.covers("/whatever", CID, "GPU-y", 5) and not c.covers("/whatever", None, "GPU-y", 5)


def test_verdict_and_what_is_system():
    pol = GpuPolicy((Grant("/kubepods.slice/pod-1", "0"),), agent_cgroup="/")
    assert pol.verdict(proc()) == {"authorized": True, "system": False, "container_id": None}
    assert pol.verdict(proc(gpu_index=1, gpu_uuid="GPU-b")) == {
        "authorized": False, "system": False, "container_id": None}
    # at the device open the GPU is not known yet: any grant of the workload will do
    assert pol.verdict(proc(gpu_index=None), "gpu.open")["authorized"] is True
    assert pol.verdict(proc(cgroup="/kubepods.slice/pod-2"), "gpu.open")["authorized"] is False
    # a kernel event names no container: read from the cgroup path, as the GPU source does
    cpol = GpuPolicy((Grant(f"container:{CID}", "all"),))
    assert cpol.verdict({"cgroup": f"/system.slice/docker-{CID}.scope"}, "gpu.open") == \
        {"authorized": True, "system": False, "container_id": CID}
    assert pol.verdict({"pid": 1, "resolved": False}) == {}     # never acted on
    # the agent's own cgroup is exact: an agent in "/" exempts nobody else
    assert pol.verdict(proc(cgroup="/"))["system"] is True
    assert pol.verdict(proc(cgroup="/user.slice"))["system"] is False
    persist = proc(cgroup="/system.slice/nvidia-persistenced.service", uid=0)
    assert pol.verdict(persist)["system"] is True
    # a system executable's name is forgeable inside a container, or by a user
    host = proc(cgroup="/system.slice/my-dcgm.service", uid=0, exe="/usr/bin/nv-hostengine")
    assert pol.verdict(host)["system"] is True
    for forged in (dict(cgroup=f"/system.slice/docker-{CID}.scope"), dict(uid=1000),
                   dict(cgroup="/user.slice/u.scope")):
        assert pol.verdict({**host, **forged})["system"] is False, forged
    # root's own nvidia-smi over SSH (its login session) is the host's, not a workload's
    admin = proc(cgroup="/user.slice/user-0.slice/session-3.scope", uid=0,
                 exe="/usr/bin/nvidia-smi")
    assert pol.verdict(admin, "gpu.open")["system"] is True
    assert pol.verdict({**admin, "uid": 1000}, "gpu.open")["system"] is False


def test_a_cgroup_named_after_a_granted_container_is_not_that_container():
    # Found by a red-team review: a container id was read from any of the last components
    # of a cgroup path, which anyone who may create cgroups names (a login user's
    # delegated user@UID.service, rootless podman, a writable cgroupfs in a container).
    cpol = GpuPolicy((Grant(f"container:{CID}", "all"),))
    for forged in (f"/user.slice/user-1000.slice/user@1000.service/docker-{CID}.scope",
                   f"/swa-x/user@1000.service/docker-{CID}.scope",
                   f"/system.slice/docker-{'a' * 64}.scope/docker-{CID}.scope"):
        v = cpol.verdict(proc(cgroup=forged))
        assert v["authorized"] is False, forged
    assert cpol.verdict(proc(cgroup=f"/system.slice/docker-{CID}.scope"))["authorized"] is True
    k8s = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-{CID}.scope"
    assert cpol.verdict(proc(cgroup=k8s))["authorized"] is True


def test_config_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(f"gpu:\n  on_violation: freeze\n  authorized:\n"
                 f"    - workload: /kubepods.slice/pod-1\n      gpus: [0, GPU-abc]\n"
                 f"      job: j1\n    - workload: container:{CID}\n")
    g = load(p).gpu
    assert g.on_violation == "freeze"
    assert g.authorized == (Grant("/kubepods.slice/pod-1", "0", "config", "j1"),
                            Grant("/kubepods.slice/pod-1", "GPU-abc", "config", "j1"),
                            Grant(f"container:{CID}", "all", "config", ""))
    for body, says in (("  authorized:\n    - workload: /\n", "gpu.authorized #1: the root"),
                       ("  authorized:\n    - gpus: all\n", "#1: each entry"),
                       ("  authorized: /a\n", "must be a list"),
                       ("  on_violation: shoot\n", "gpu.on_violation must be one of"),
                       ("  system_exes: [nvidia-smi]\n", "not an absolute path"),
                       ("  device_major: 5000\n", "gpu.device_major must be at least 0")):
        p.write_text("gpu:\n" + body)
        with pytest.raises(ConfigError, match=says):
            load(p)


def test_store_grants_survive_reopening(tmp_path):
    with Store(tmp_path / "a.db") as s:
        assert gpugrants.authorize(s, "/a", ["0", "1"], "j", 10.0, "ops") == 2
        assert gpugrants.authorize(s, "/a", ["1"], "j2", 11.0, "ops") == 1   # renewed
    with Store(tmp_path / "a.db") as s:
        assert [(g.workload, g.gpu, g.job, g.source) for g in gpugrants.grants(s)] == \
            [("/a", "0", "j", "api"), ("/a", "1", "j2", "api")]
        assert gpugrants.revoke(s, "/a", ["1"]) == 1 and gpugrants.revoke(s, "/b") == 0
        assert gpugrants.revoke(s, "/a") == 1 and gpugrants.grants(s) == []


@pytest.mark.parametrize("on_violation", ["kill", "freeze", "report"])
def test_finding_is_the_workloads(on_violation):
    cfg = Config(gpu=Gpu(on_violation=on_violation))
    det = Detector(load_rules(RULES), cfg)
    ev = Event(kind="gpu.process", subject="pid:4242", mono_ns=2, first_mono_ns=1,
               fields=proc())
    [f] = det.evaluate(ev, 3)
    assert (f.rule, f.entity, f.action, f.event_class.value) == \
        ("policy.gpu_unauthorized@1", "cgroup:/kubepods.slice/pod-1/c1", on_violation,
         "policy_violation")
    assert f.evidence["authorized"] is False and f.evidence["pid"] == 4242
    det.gpu_policy = GpuPolicy((Grant("/kubepods.slice", "all"),))   # a grant arrives
    assert det.evaluate(ev, 3) == []


class _Enforcer(DryRunEnforcer):
    dry_run = False             # the responder's live path, recording what it applies

    def __init__(self):
        super().__init__()
        self.applied: list = []

    def apply(self, m, now):
        super().apply(m, now)
        self.applied.append(m)


@pytest.mark.parametrize("on_violation, kind, target", [
    ("kill", "kill_process", "4242"), ("freeze", "freeze_cgroup", "/kubepods.slice/pod-1/c1"),
    ("report", None, None)])
def test_response(tmp_path, on_violation, kind, target):
    """kill: exactly the judged process (pid pinned by start time and cgroup); freeze: the
    workload's cgroup; report: nothing; always an incident on the workload."""
    cfg = Config(state_dir=str(tmp_path), gpu=Gpu(on_violation=on_violation))
    rules = load_rules(RULES)
    ev = Event(kind="gpu.process", subject="pid:4242", mono_ns=2, first_mono_ns=1,
               fields=proc())
    [f] = Detector(rules, cfg).evaluate(ev, 3)
    enforcer = _Enforcer()
    with Store(tmp_path / "r.db") as store:
        incident = Responder(cfg, store, enforcer, rules=rules).handle(f)
        assert incident.entity == "cgroup:/kubepods.slice/pod-1/c1"
        assert [(m.kind.value, m.target) for m in enforcer.applied] == \
            ([(kind, target)] if kind else [])
        if kind == "kill_process":
            assert enforcer.applied[0].params["start_ticks"] == 9000
            assert enforcer.applied[0].params["cgroup"] == "/kubepods.slice/pod-1/c1"


def test_auto_kills_only_once_the_node_is_enrolled(tmp_path):
    """on_violation auto (the default): report while no workload was ever authorized here,
    kill once the config lists one or a scheduler's AuthorizeGpu made one; revoking every
    grant leaves the node enrolled (stored), so a miner between two jobs is killed."""
    ev = Event(kind="gpu.process", subject="pid:4242", mono_ns=2, first_mono_ns=1,
               fields=proc())
    cfg = Config(state_dir=str(tmp_path))
    assert cfg.gpu.on_violation == "auto"
    det = Detector(load_rules(RULES), cfg)
    with Store(tmp_path / "a.db") as store:
        guard = GpuGuard(cfg, store, lambda p: setattr(det, "gpu_policy", p), lambda e: None)
        det.gpu_policy = guard.policy
        assert [f.action for f in det.evaluate(ev, 3)] == ["report"]
        assert guard.status()["state"] == "reporting"
        guard.authorize("/kubepods.slice/pod-other", ["0"], "job-1", "sched", now=10.0)
        assert [f.action for f in det.evaluate(ev, 3)] == ["kill"]
        guard.revoke("/kubepods.slice/pod-other", [], None)
        assert guard.policy.grants == () and guard.policy.enrolled
        assert [f.action for f in det.evaluate(ev, 3)] == ["kill"]
        assert guard.status()["state"] == "enforcing"
    with Store(tmp_path / "a.db") as store:     # after a restart: still enrolled
        assert GpuGuard(cfg, store, lambda p: None, lambda e: None).policy.enrolled
    listed = Config(gpu=Gpu(authorized=(Grant("/kubepods.slice/pod-9", "all"),)))
    det = Detector(load_rules(RULES), listed)
    with Store(tmp_path / "b.db") as store:
        det.gpu_policy = GpuGuard(listed, store, lambda p: None, lambda e: None).policy
    assert [f.action for f in det.evaluate(ev, 3)] == ["kill"]
