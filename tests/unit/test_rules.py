"""Rules: the annotated case files, the detector's contract, and validation errors."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from agent.config import Allowlist, Config, Policy, Probes
from agent.detect.rules import (Detector, RuleError, kernel_thresholds, load_rules,
                                parse_rules)
from agent.model import Event, EventClass

CASES_DIR = Path(__file__).resolve().parents[1] / "rules"
# tests/rules/exec.cases reads these lists (empty by default)
EXEC_LISTS = Policy(exec_denied_paths=("/usr/bin/nc*", "/opt/miners/"),
                    exec_denied_sha256=("a" * 64,), exec_denied_users=(4000,),
                    exec_denied_cgroups=("/kubepods.slice/*banned*",),
                    exec_denied_containers=("deadbeef0000",))
CFG = Config(allowlist=Allowlist(load_balancers=("10.20.0.0/16", "fd00:1b::/64")),
             probes=Probes(window_ms=1000), policy=EXEC_LISTS)
T0_NS = 5_000_000_000


def read_cases(path: Path) -> list[tuple[int, dict, set[str]]]:
    """(line number, event, expected rule names) for every event line of a case file;
    every event must be followed by exactly one `# expect:` line."""
    cases: list[tuple[int, dict, set[str]]] = []
    pending: tuple[int, dict] | None = None
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if line.startswith("# expect:"):
            assert pending is not None, f"{path.name}:{n}: expect without an event"
            names = line.split(":", 1)[1].strip()
            expected = set() if names == "none" else {s.strip() for s in names.split(",")}
            cases.append((*pending, expected))
            pending = None
        elif line and not line.startswith("#"):
            assert pending is None, f"{path.name}:{pending[0]}: event without an expect line"
            pending = (n, json.loads(line))
    assert pending is None, f"{path.name}: last event has no expect line"
    return cases


def to_event(spec: dict) -> Event:
    return Event(kind=spec["kind"], subject=spec["subject"], mono_ns=T0_NS + 10**9,
                 first_mono_ns=T0_NS, fields=spec.get("fields", {}))


CASES = [(f"{p.name}:{n}", ev, exp) for p in sorted(CASES_DIR.glob("*.cases"))
         for n, ev, exp in read_cases(p)]


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector(load_rules(), CFG)


@pytest.mark.parametrize("where,spec,expected", CASES, ids=[c[0] for c in CASES])
def test_case(detector: Detector, where: str, spec: dict, expected: set[str]) -> None:
    found = {f.rule for f in detector.evaluate(to_event(spec), T0_NS + 2 * 10**9)}
    assert found == expected, where


def test_every_rule_has_positive_and_negative_cases() -> None:
    fired = set().union(*(exp for _, _, exp in CASES))
    assert fired == {r.name for r in load_rules()}
    assert any(not exp for _, _, exp in CASES)


def test_finding_contents(detector: Detector) -> None:
    ev = Event("net.source", "2001:db8:0::1", mono_ns=T0_NS + 7, first_mono_ns=T0_NS,
               fields={"packets": 300, "syns": 300, "ports": 1, "dport": 80, "proto": "tcp",
                       "family": 6, "extra": "dropped"})
    [f] = detector.evaluate(ev, now_mono_ns=T0_NS + 99)
    assert f.rule == "net.syn_flood@2"
    assert f.entity == "ip:2001:db8::1"
    assert f.event_class is EventClass.SYSTEM_ATTACK
    assert f.action == "challenge"     # SYN counts are forgeable: never a block
    assert (f.first_mono_ns, f.detected_mono_ns) == (T0_NS, T0_NS + 99)
    assert dict(f.evidence) == {"packets": 300, "syns": 300, "ports": 1, "dport": 80,
                                "proto": "tcp", "family": 6}


def test_service_entity(detector: Detector) -> None:
    ev = Event("net.service", "tcp/80", T0_NS, T0_NS,
               {"syns": 5000, "sources": 900, "dport": 80, "proto": "tcp"})
    [f] = detector.evaluate(ev, T0_NS)
    assert (f.entity, f.action) == ("service:tcp/80", "challenge_service")


def test_shorter_kernel_window_scales_rates() -> None:
    det = Detector(load_rules(), Config(probes=Probes(window_ms=100)))
    ev = Event("net.source", "198.51.100.1", T0_NS, T0_NS, {"syns": 25})  # 250/s
    assert [f.rule for f in det.evaluate(ev, T0_NS)] == ["net.syn_flood@2"]


def test_kernel_thresholds() -> None:
    assert kernel_thresholds(load_rules()) == {
        "syns": 200, "packets": 20000, "udp": 5000, "ports": 30, "conns": 100,
        "resets": 50, "svc_syns": 1000, "svc_packets": 10000, "svc_udp": 20000,
        "svc_sources": 50}
    assert set(kernel_thresholds([]).values()) == {0}


def _rule(**over) -> dict:
    base = {"id": "net.test", "version": 1, "class": "system_attack", "severity": "high",
            "event": "net.source", "thresholds": {"syns_per_s": 10}, "action": "block"}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize("over,message", [
    ({"colour": "red"}, "rule net.test: unknown key 'colour'"),
    ({"thresholds": {"syns_per_s": -5}},
     "rule net.test: threshold syns_per_s must be greater than 0"),
    ({"thresholds": {"syns_per_s": 0}}, "threshold syns_per_s must be greater than 0"),
    ({"thresholds": {"syns_per_s": "many"}}, "threshold syns_per_s must be a number"),
    ({"thresholds": {"conns_per_s": 5}}, "unknown threshold 'conns_per_s' for net.source"),
    ({"thresholds": {}}, "thresholds must be a non-empty mapping"),
    ({"class": "nuisance"}, "rule net.test: unknown class 'nuisance'"),
    ({"severity": "apocalyptic"}, "unknown severity 'apocalyptic'"),
    ({"action": "nuke"}, "rule net.test: unknown action 'nuke'"),
    ({"action": None}, "rule net.test: missing key 'action'"),
    ({"event": "net.rumour"}, "unknown event 'net.rumour'"),
    ({"version": 0}, "version must be a positive integer"),
    ({"ttl_s": -1}, "ttl_s must be a number greater than 0"),
    ({"exempt": ["friends"]}, "unknown exempt group 'friends'"),
    ({"id": "Bad Id"}, "rule #1: id must look like"),
    ({"action": "rate_limit_service"}, "action rate_limit_service needs net.service events"),
    ({"event": "net.service", "action": "block"}, "action block needs per-source events"),
    ({"match": [{"event": "tcp.reset", "thresholds": {"resets_per_s": 1}}]},
     "use either 'match' or 'event' + 'thresholds'"),
])
def test_validation_errors(over: dict, message: str) -> None:
    with pytest.raises(RuleError, match=re.escape(message)):
        parse_rules({"rules": [_rule(**over)]})


def test_duplicate_ids_and_file_shape(tmp_path: Path) -> None:
    with pytest.raises(RuleError, match="rule net.test: duplicate id"):
        parse_rules({"rules": [_rule(), _rule()]})
    with pytest.raises(RuleError, match="one key, 'rules'"):
        parse_rules([_rule()])
    bad = tmp_path / "r.yaml"
    bad.write_text("rules: [\n")
    with pytest.raises(RuleError, match="not valid YAML"):
        load_rules(bad)
    with pytest.raises(RuleError, match="cannot read rules file"):
        load_rules(tmp_path / "missing.yaml")


def test_load_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"rules": [_rule(ttl_s=60, exempt=["mesh"])]}))
    [rule] = load_rules(path)
    assert (rule.name, rule.ttl_s, rule.exempt) == ("net.test@1", 60.0, ("mesh",))


_XID = {"match": [{"event": "gpu.xid", "where": {"xid": {"in": [79]}}}]}


@pytest.mark.parametrize("over,message", [
    # GPU health is for operators: never a block, an isolation or a kill.
    ({"class": "gpu_health", "action": "block", "event": None, "thresholds": None, **_XID},
     "class gpu_health takes GPU events and action report only"),
    ({"class": "gpu_health", "action": "isolate", "scope": "node", "event": None,
      "thresholds": None, **_XID}, "class gpu_health takes GPU events and action report only"),
    ({"class": "gpu_health", "action": "report"},
     "class gpu_health takes GPU events and action report only"),
    ({"class": "security_breach", "action": "isolate", "scope": "node", "event": None,
      "thresholds": None, **_XID}, "gpu.xid events are GPU health: class gpu_health"),
    ({"class": "system_attack", "action": "report", "event": None, "thresholds": None,
      "match": [{"event": "gpu.throttle", "where": {"reasons": {"any_in": ["hw_thermal"]}}}]},
     "gpu.throttle events are GPU health"),
])
def test_gpu_health_rules_only_report(over: dict, message: str) -> None:
    with pytest.raises(RuleError, match=re.escape(message)):
        parse_rules({"rules": [_rule(**over)]})


def test_gpu_health_entity_per_gpu_and_rule(detector: Detector) -> None:
    """One live incident per GPU and reason: the entity names both."""
    ev = to_event({"kind": "gpu.xid", "subject": "gpu:GPU-aaaa",
                   "fields": {"gpu_index": 0, "gpu_uuid": "GPU-aaaa", "xid": 79}})
    [f] = detector.evaluate(ev, T0_NS + 2 * 10**9)
    assert (f.entity, f.action, f.event_class.value) == \
        ("gpu:GPU-aaaa:xid_fatal", "report", "gpu_health")
