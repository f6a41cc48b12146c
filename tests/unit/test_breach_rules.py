"""Breach rules: the annotated cases in tests/rules/breach.cases, scope -> entity, the
`where` matchers and their validation, and loading rules from a directory or a list."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from agent.config import Breach, Config
from agent.detect import match
from agent.detect.rules import Detector, RuleError, load_rules, parse_rules
from agent.model import Event, EventClass
from tests.unit.test_rules import read_cases, to_event

CASES_FILE = Path(__file__).resolve().parents[1] / "rules" / "breach.cases"
RULES = Path(__file__).resolve().parents[2] / "agent" / "rules"
CASES = [(f"breach.cases:{n}", ev, exp) for n, ev, exp in read_cases(CASES_FILE)]
T0_NS = 5_000_000_000


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector(load_rules(RULES / "breach.yaml"), Config())


@pytest.mark.parametrize("where,spec,expected", CASES, ids=[c[0] for c in CASES])
def test_case(detector: Detector, where: str, spec: dict, expected: set[str]) -> None:
    found = {f.rule for f in detector.evaluate(to_event(spec), T0_NS)}
    assert found == expected, where


def test_every_breach_rule_has_positive_and_negative_cases() -> None:
    rules = load_rules(RULES / "breach.yaml")
    assert {r.name for r in rules} == set().union(*(exp for _, _, exp in CASES))
    for rule in rules:
        kinds = {c.event for c in rule.conditions}
        assert any(not exp and ev["kind"] in kinds for _, ev, exp in CASES), rule.name
        assert rule.event_class is EventClass.SECURITY_BREACH and rule.scope in ("node", "service")


def _exec(**fields) -> Event:
    return Event("proc.exec", f"pid:{fields.get('pid', 1)}", T0_NS, T0_NS, fields)


SVC_SHELL = {"comm": "sh", "exe": "/usr/bin/dash", "exe_is": ["shells"],
             "ancestors_are": ["services"]}


def test_service_scope_isolates_the_cgroup(detector: Detector) -> None:
    ev = _exec(pid=9, cgroup="/system.slice/nginx.service", **SVC_SHELL)
    [f] = detector.evaluate(ev, T0_NS + 5)
    assert (f.rule, f.entity, f.action) == ("breach.service_shell@2",
                                             "cgroup:/system.slice/nginx.service", "isolate_service")
    assert f.evidence["scope"] == "service" and f.evidence["exe"] == "/usr/bin/dash"
    assert (f.first_mono_ns, f.detected_mono_ns) == (T0_NS, T0_NS + 5)


@pytest.mark.parametrize("cgroup", ["/", None, ""])
def test_service_scope_without_a_service_falls_back_to_node(detector, cgroup) -> None:
    [f] = detector.evaluate(_exec(cgroup=cgroup, **SVC_SHELL), T0_NS)
    assert (f.entity, f.action, f.evidence["scope"]) == ("node", "isolate_node", "node")
    assert "scope_fallback" in f.evidence


def test_node_scope(detector: Detector) -> None:
    ev = Event("bpf.prog_load", "pid:3", T0_NS, T0_NS, {"exe_is": [], "cgroup": "/x"})
    [f] = detector.evaluate(ev, T0_NS)
    assert (f.entity, f.action) == ("node", "isolate_node")


def test_configured_lists_change_the_verdict() -> None:
    rules = load_rules(RULES / "breach.yaml")
    ev = _exec(exe="/usr/bin/bash", exe_is=["shells"], ancestors_are=[], manager_start=False,
               cgroup="/system.slice/myapi.service")
    assert Detector(rules, Config()).evaluate(ev, T0_NS) == []
    by_cgroup = Config(breach=Breach(service_cgroups=("/system.slice/myapi*",)))
    assert [f.rule for f in Detector(rules, by_cgroup).evaluate(ev, T0_NS)] == \
        ["breach.service_shell@2"]
    # the service's own start by its manager is not a shell "spawned by the service"
    start = _exec(exe="/usr/bin/python3.11", exe_is=["shells"], parent_is=["service_managers"],
                  manager_start=True, cgroup="/system.slice/myapi.service")
    assert Detector(rules, by_cgroup).evaluate(start, T0_NS) == []
    # a system directory list without /opt makes /opt executables below a service count
    helper = _exec(exe="/opt/tool/run", exe_is=[], ancestors_are=["services"], cgroup="/s")
    assert Detector(rules, Config()).evaluate(helper, T0_NS) == []
    narrow = Config(breach=Breach(system_exec_dirs=("/usr/*",)))
    assert [f.rule for f in Detector(rules, narrow).evaluate(helper, T0_NS)] == \
        ["breach.service_shell@2"]


def test_agent_paths_follow_state_dir() -> None:
    rules = load_rules(RULES / "breach.yaml")
    ev = Event("file.open", "/srv/agent/agent.db", T0_NS, T0_NS,
               {"path": "/srv/agent/agent.db", "write": True, "exe_is": [], "ancestors_are": [],
                "watch_lists": []})
    assert Detector(rules, Config()).evaluate(ev, T0_NS) == []
    # which lists a watch belongs to is the probe's (agent.sources.ident.watch_lists)
    from agent.sources.ident import patterns, watch_lists
    cfg = Config(state_dir="/srv/agent")
    pats = patterns(cfg)
    [rule_id] = [i for i, (_, text, _) in enumerate(pats) if text == "/srv/agent/"]
    fields = {**ev.fields, "watch_lists": watch_lists(cfg, pats)[rule_id]}
    [f] = Detector(rules, cfg).evaluate(Event("file.open", ev.subject, T0_NS, T0_NS, fields), T0_NS)
    assert f.rule == "breach.agent_tamper@2"


@pytest.mark.parametrize("op,value,fields,expected", [
    ("eq", 3, {"x": 3}, True), ("ne", 3, {"x": 3}, False), ("ne", 3, {}, True),
    ("in", ("a", "b"), {"x": "b"}, True), ("not_in", ("a",), {}, True), ("in", ("a",), {}, False),
    ("glob", ("/etc/sh*",), {"x": "/etc/shadow-"}, True),
    ("not_glob", ("nvidia*",), {"x": "nvidia_uvm"}, False),
    ("prefix", ("/tmp/",), {"x": "/tmp/a"}, True), ("not_prefix", ("/tmp/",), {"x": "/t"}, True),
    ("ge", 1, {"x": 1}, True), ("gt", 1, {"x": 1}, False), ("lt", 5, {"x": True}, False),
    ("le", 5, {"x": "3"}, False),
    ("ne_field", "y", {"x": 0, "y": 1000}, True), ("ne_field", "y", {"x": 0}, False),
    ("eq_field", "y", {"x": 7, "y": 7}, True),
    ("any_in", ("dpkg",), {"x": ["sh", "dpkg"]}, True), ("none_in", ("dpkg",), {"x": ["sh"]}, True),
    ("none_in", ("dpkg",), {"x": []}, True), ("none_in", ("dpkg",), {}, True),
])
def test_matchers(op, value, fields, expected) -> None:
    assert match.holds(match.Test("x", op, value), fields, {}) is expected


def test_named_list_is_resolved() -> None:
    t = match.Test("x", "in", "@shells")
    assert match.holds(t, {"x": "sh"}, {"shells": ("sh",)})
    assert not match.holds(t, {"x": "sh"}, {"shells": ("bash",)})
    assert not match.holds(t, {"x": "sh"}, {})


def _rule(**over) -> dict:
    base = {"id": "breach.test", "version": 1, "class": "security_breach", "severity": "high",
            "scope": "node", "action": "isolate", "event": "proc.exec",
            "where": {"exe_is": {"any_in": ["shells"]}}}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize("over,message", [
    ({"where": {"colour": "red"}}, "unknown field 'colour' for proc.exec"),
    ({"where": {"comm": {"like": "sh"}}}, "field comm: unknown test 'like'"),
    ({"where": {"cgroup": {"glob": "@friends"}}}, "unknown list '@friends'"),
    ({"where": {"comm": {"in": "sh"}}}, "in needs a list of values or a named list"),
    ({"where": {"uid": {"gt": "zero"}}}, "gt needs a number"),
    ({"where": {"uid": {"ne_field": "target_uid"}}}, "ne_field names an unknown field 'target_uid'"),
    ({"where": {"uid": {"ge": "@service_cgroups"}}}, "ge cannot take a named list"),
    ({"where": {"exe_is": {"any_in": ["shell"]}}},
     "field exe_is: 'shell' is not an executable list"),
    # comm is the process's to set: a rule may not compare it with executable lists
    ({"where": {"comm": {"in": "@shells"}}},
     "field comm: @shells names executables, which are judged by inode"),
    ({"where": {}}, "where must be a non-empty mapping"),
    ({"where": None, "thresholds": {"syns_per_s": 1}}, "proc.exec conditions take 'where'"),
    ({"scope": None}, "action isolate needs a scope"),
    ({"scope": "planet"}, "unknown scope 'planet'"),
    ({"action": "block", "scope": None}, "action block needs per-source events"),
    ({"event": "net.source", "where": None, "thresholds": {"syns_per_s": 1}},
     "action isolate needs process events"),
    ({"event": "net.source", "action": "block", "scope": None},
     "'where' needs a process event"),
])
def test_validation_errors(over: dict, message: str) -> None:
    with pytest.raises(RuleError, match=re.escape(message)):
        parse_rules({"rules": [_rule(**over)]})


def test_report_action_keeps_the_scope_entity() -> None:
    [rule] = parse_rules({"rules": [_rule(action="report", scope=None)]})
    [f] = Detector([rule], Config()).evaluate(_exec(exe_is=["shells"], cgroup="/a"), T0_NS)
    assert (f.action, f.entity) == ("report", "node")


def test_load_rules_file_directory_and_list(tmp_path: Path) -> None:
    names = {r.id for r in load_rules()}
    assert {"net.syn_flood", "breach.reverse_shell"} <= names          # packaged directory
    assert {r.id for r in load_rules(RULES)} == names
    assert {r.id for r in load_rules([RULES / "network.yaml", RULES / "breach.yaml",
                                      RULES / "gpu.yaml", RULES / "egress.yaml",
                                      RULES / "exec.yaml", RULES / "policy.yaml",
                                      RULES / "files.yaml"])} == names
    assert all(r.id.startswith("net.") for r in load_rules(RULES / "network.yaml"))
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"rules": [_rule()]}))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"rules": [_rule()]}))
    with pytest.raises(RuleError, match="rule breach.test: duplicate id"):
        load_rules(tmp_path)
