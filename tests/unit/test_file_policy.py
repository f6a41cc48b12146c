"""File policy without the kernel: the config's checks (exit-2 sentences), the default,
who is judged a violator (cgroup subtree, container id), the rate-limited reports and the
incident entity. The kernel side is tests/integration/test_file_policy.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from agent import config, filepolicy
from agent.config import Config, ConfigError
from agent.detect.rules import Detector, load_rules
from agent.filepolicy import FilePolicy
from agent.policyconfig import AGENT_SECRETS, WORKLOAD_CGROUPS, FileRule, Policy

RULES = Path(__file__).resolve().parents[2] / "agent" / "rules" / "files.yaml"
CID = "a" * 64


def load(tmp_path: Path, text: str) -> Config:
    p = tmp_path / "config.yaml"
    p.write_text(text)
    return config.load(p)


def test_default_keeps_workloads_out_of_the_agents_config_only() -> None:
    cfg = config.load(None)
    assert cfg.policy.files == (AGENT_SECRETS,)
    assert AGENT_SECRETS.paths == ("/etc/swarm-agent/",)
    assert AGENT_SECRETS.cgroups == (*WORKLOAD_CGROUPS, "/system.slice/docker-*.scope")
    assert "/user.slice" not in WORKLOAD_CGROUPS


@pytest.mark.parametrize("entry, message", [
    ("{name: a, paths: [etc/shadow], cgroups: [/x]}",
     "policy.files[a].paths: 'etc/shadow' is not an absolute path"),
    ("{name: a, paths: [/etc/../shadow], cgroups: [/x]}",
     "policy.files[a].paths: '/etc/../shadow' is not a plain absolute path (no //, . or ..)"),
    ("{name: a, paths: [/], cgroups: [/x]}", "policy.files[a].paths: '/' cannot be denied"),
    ("{name: a, paths: [/proc/], cgroups: [/x]}", "policy.files[a].paths: '/proc/' cannot be denied"),
    ("{name: a, paths: [], cgroups: [/x]}", "policy.files[a].paths is empty"),
    # The answering thread's own opens (a lazy import) would wait on itself.
    ("{name: a, paths: [/usr/], cgroups: [/x]}", "policy.files[a].paths: '/usr/' covers the agent's own code"),
    (f"{{name: a, paths: [{Path(config.__file__).parent}/], cgroups: [/x]}}", "covers the agent's own code"),
    ("{name: a, paths: [/etc/shadow]}", "policy.files[a] applies to nobody"),
    ("{name: a, paths: [/etc/shadow], cgroups: [/]}",
     "policy.files[a].cgroups: '/' is not a cgroup v2 path below the root"),
    ("{name: a, paths: [/etc/shadow], cgroups: [/x y]}",
     "policy.files[a].cgroups: '/x y' is not a cgroup v2 path"),
    ("{name: a, paths: [/etc/shadow], containers: [abc]}",
     "policy.files[a].containers: 'abc' is not a container id (64 lower-case hex digits)"),
    ("{name: 'a b', paths: [/etc/shadow], cgroups: [/x]}", "policy.files[0].name must be"),
    ("{name: a, paths: [/etc/shadow], cgroups: [/x], path: /y}",
     "unknown config key policy.files[0].path"),
])
def test_bad_rules_are_one_sentence(tmp_path, entry, message) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, f"policy:\n  files:\n    - {entry}\n")
    assert message in str(e.value), str(e.value)


def test_duplicate_names_and_off(tmp_path) -> None:
    dup = ("policy:\n  files:\n    - {name: a, paths: [/x], cgroups: [/k]}\n"
           "    - {name: a, paths: [/y], cgroups: [/k]}\n")
    with pytest.raises(ConfigError, match="policy.files\\[a\\]: the name 'a' is used twice"):
        load(tmp_path, dup)
    assert load(tmp_path, "policy: {files: []}\n").policy.files == ()
    off = FilePolicy(load(tmp_path, "policy: {files: []}\n"))
    assert off.state == "off" and off.counters()["files.denied"] == 0


def judged(rule: FileRule, cgroup: str, monkeypatch) -> str | None:
    monkeypatch.setattr(filepolicy, "cgroup_of", lambda pid: cgroup)
    return FilePolicy(Config(policy=Policy(files=(rule,))))._judge(0, 1234)


@pytest.mark.parametrize("cgroup, denied", [
    ("/kubepods.slice/pod-1/c", True), ("/kubepods.slice", True),
    ("/kubepods.slice-other/x", False),          # whole path components only
    ("/user.slice/user-0.slice/session-1.scope", False), ("/", False),
    (f"/system.slice/docker-{CID}.scope", True),  # the container, by its id
    (f"/user.slice/docker-{CID}.scope", False),   # a name outside the runtimes' roots
])
def test_who_is_denied(monkeypatch, cgroup, denied) -> None:
    rule = FileRule(name="r", paths=("/x",), cgroups=("/kubepods.slice",), containers=(CID,))
    assert (judged(rule, cgroup, monkeypatch) == cgroup) is denied


def test_the_agents_own_cgroup_is_never_refused(monkeypatch) -> None:
    rule = FileRule(name="r", paths=("/x",), cgroups=("/kubepods.slice",))
    pod = "/kubepods.slice/pod-agent/agent"
    monkeypatch.setattr(filepolicy, "cgroup_of", lambda pid: pod)
    assert FilePolicy(Config(policy=Policy(files=(rule,))), agent_cgroup=pod)._judge(0, 1) is None
    assert FilePolicy(Config(policy=Policy(files=(rule,))), agent_cgroup="/other")._judge(0, 1) == pod


def test_reports_rate_limited_per_rule_and_workload() -> None:
    policy = FilePolicy(Config(policy=Policy(files=(FileRule(name="r", paths=("/x",), cgroups=("/k",)),))))
    out: list = []
    policy._emit = out.append
    for _ in range(3):
        policy._on_denied(0, 7, "/k/a", "/bin/cat", "/x")
    policy._on_denied(0, 8, "/k/b", "/bin/sh", "/x")
    policy.flush(100.0)
    assert sorted((e.subject, e.fields["opens"]) for e in out) == [
        ("file:r:cgroup:/k/a", 3), ("file:r:cgroup:/k/b", 1)]
    policy._on_denied(0, 7, "/k/a", "/bin/cat", "/x")
    policy.flush(105.0)
    assert len(out) == 2                     # within REPORT_EVERY_S: waits
    policy.flush(100.0 + filepolicy.REPORT_EVERY_S)
    assert out[-1].fields["opens"] == 1 and out[-1].fields["opens_total"] == 4
    assert policy.denied["r"] == 5 and policy.counters()["files.denied.r"] == 5


def test_one_incident_entity_per_rule_and_workload(tmp_path) -> None:
    policy = FilePolicy(Config(policy=Policy(files=(FileRule(name="r", paths=("/x",), cgroups=("/k",)),))))
    out: list = []
    policy._emit = out.append
    policy._on_denied(0, 7, "/k/a", "/bin/cat", "/x")
    policy.flush(1.0)
    det = Detector(load_rules(RULES), Config())
    [finding] = det.evaluate(out[0], out[0].mono_ns)
    assert finding.entity == "file:r:cgroup:/k/a" and finding.rule_id == "policy.file_denied"
    assert finding.action == "report"


def test_no_fanotify_degrades_with_the_reason(monkeypatch) -> None:
    """The kernel's refusal (tests/integration/test_capabilities.py shows the real one)
    leaves the policy degraded with the reason, and the agent running."""
    import asyncio
    import errno

    from agent.enforce.fanotify import Unsupported

    def refused(*args, **kwargs):
        raise Unsupported(errno.EINVAL, "fanotify: the kernel has no fanotify permission "
                                        "events (CONFIG_FANOTIFY_ACCESS_PERMISSIONS)")
    monkeypatch.setattr(filepolicy, "FileGate", refused)
    policy = FilePolicy(Config())
    loop = asyncio.new_event_loop()
    try:
        policy.start(loop, lambda e: None)
    finally:
        loop.close()
    assert policy.state_reason() == {
        "state": "degraded", "reason": "fanotify: the kernel has no fanotify permission "
                                       "events (CONFIG_FANOTIFY_ACCESS_PERMISSIONS)"}
    assert policy.status()["marks"] == 0 and policy.counters()["files.denied"] == 0
