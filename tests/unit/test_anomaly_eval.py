"""bench/anomaly_eval.py's judgement: the Poisson bound that says whether 0.2 false
investigations a day is resolved, incidents grouped as the responder groups them, and which
findings count as an injected behaviour's (destinations first, else the workload near its
start) -- so the bench can show a failure instead of crediting the wrong finding."""
from __future__ import annotations

import importlib.util
import pathlib
import sys
from types import SimpleNamespace

import pytest

from agent.model import EventClass, Finding, Severity
from swarmlab.nodeday import BASE_NS, Behaviour

_spec = importlib.util.spec_from_file_location(
    "anomaly_eval", pathlib.Path(__file__).parents[2] / "bench" / "anomaly_eval.py")
ae = importlib.util.module_from_spec(_spec)
sys.modules["anomaly_eval"] = ae          # its dataclasses look their module up
_spec.loader.exec_module(ae)
NS = 1_000_000_000
ARGS = SimpleNamespace(warmup_s=3600.0, grace_s=600.0, base_ns=BASE_NS)


def finding(at_s: float, entity: str, **scope) -> Finding:
    t = BASE_NS + int(at_s * NS)
    return Finding("anomaly.workload", 1, EventClass.SUSPICIOUS_ACTIVITY, Severity.MEDIUM, entity,
                   "investigate", t, t, {"scope": scope, "summary": "x"})


def behaviour(name="beacon", start_s=10_000.0, end_s=11_000.0, dst="203.0.113.9") -> Behaviour:
    b = Behaviour(name, start_s, end_s, "/kubepods.slice/web.scope", "c" * 64, dst, 443, "ab" * 32)
    b.start_ns, b.end_ns = BASE_NS + int(start_s * NS), BASE_NS + int(end_s * NS)
    return b


def test_poisson_upper_bound():
    assert ae.poisson_upper(0, 16) == pytest.approx(2.996 / 16, rel=1e-3)   # -ln(0.05)
    assert ae.poisson_upper(0, 10) > 0.2 >= ae.poisson_upper(0, 16)
    assert ae.poisson_upper(5, 10) == pytest.approx(10.51 / 10, rel=1e-2)


def test_investigations_group_per_entity_until_an_hour_of_quiet():
    fs = [finding(0, "cgroup:/a"), finding(600, "cgroup:/a"), finding(700, "cgroup:/b"),
          finding(600 + 3601, "cgroup:/a")]
    assert [(f.entity, f.detected_mono_ns) for f in ae.investigations(fs, 3600)] == \
        [(fs[0].entity, fs[0].detected_mono_ns), (fs[2].entity, fs[2].detected_mono_ns),
         (fs[3].entity, fs[3].detected_mono_ns)]


def test_a_finding_is_a_behaviours_by_its_destination_or_its_workload_near_its_start():
    b = behaviour()
    web = f"cgroup:{b.cgroup}"
    assert ae.names_behaviour(finding(10_050, web, dst=[b.dst]), b, ARGS)
    # it names another injected behaviour's destination, even in the same workload: not b's
    assert not ae.names_behaviour(finding(10_050, web, dst=["203.0.113.10"]), b, ARGS,
                                  {b.dst, "203.0.113.10"})
    # destinations of no behaviour (the window's other traffic): the workload decides
    assert ae.names_behaviour(finding(10_050, web, dst=["10.0.1.101"]), b, ARGS, {b.dst})
    assert ae.names_behaviour(finding(10_300, "cgroup:/other", container=b.container), b, ARGS)
    assert not ae.names_behaviour(finding(10_000 + 601, web), b, ARGS)
    assert not ae.names_behaviour(finding(10_050, "cgroup:/other"), b, ARGS)
    slow = behaviour("low_and_slow", 1200.0, 86_400.0)   # began in the warm-up
    assert ae.names_behaviour(finding(3600 + 500, web), slow, ARGS)
    assert not ae.names_behaviour(finding(3600 + 700, web), slow, ARGS)


def test_a_listeners_finding_names_it_by_its_port_in_its_workload():
    # the window's destinations (the low-and-slow export's among them) do not disown it
    b = behaviour("listener", dst="")
    b.dport = 4444
    web = f"cgroup:{b.cgroup}"
    f = finding(10_006, web, dst=["203.0.113.10"])
    f.evidence["new"] = {"listens": ["4/4444"]}
    assert ae.names_behaviour(f, b, ARGS, {"203.0.113.10"})
    other = finding(10_006, "cgroup:/other", dst=["203.0.113.10"])
    other.evidence["new"] = {"listens": ["4/4444"]}
    assert not ae.names_behaviour(other, b, ARGS, {"203.0.113.10"})
    f.evidence["new"] = {"listens": ["4/1337"]}
    assert not ae.names_behaviour(f, b, ARGS, {"203.0.113.10"})
