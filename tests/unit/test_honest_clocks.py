"""Honest figures (issue 9, item 7): the incident's detected_at is the detector's decision,
not the kernel's event time; a bench run that measured nothing is invalid, with its reason.

The responder runs on a real SQLite file with the real dry-run enforcer; the run-validation
logic is the one the benches and the demo use (swarmlab.figures, swarmlab.scenario)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from agent.config import Allowlist, Config
from agent.detect.rules import Detector, load_rules
from agent.enforce.base import DryRunEnforcer
from agent.model import Event
from agent.respond.engine import Responder
from agent.state.store import Store
from swarmlab import figures
from swarmlab.scenario import Timeline

BASE_S = 1_700_000_000.0        # wall time at mono 0 in these tests
S = 1_000_000_000               # ns per second
ALLOW = Allowlist(management=("192.0.2.0/24",))


@pytest.fixture
def responder(tmp_path: Path):
    cfg = Config(state_dir=str(tmp_path), allowlist=ALLOW)
    store = Store(cfg.db_path)
    r = Responder(cfg, store, DryRunEnforcer([str(n) for n in ALLOW.networks()]),
                  lambda: BASE_S + 200.0, to_wall=lambda ns: BASE_S + ns / 1e9)
    yield r, store
    store.close()


def finding(kernel_ns: int, rules=None):
    """The real detector's finding for a port scan whose kernel event is at kernel_ns."""
    ev = Event("net.source", "198.51.100.7", kernel_ns, kernel_ns - S,
               {"syns": 5000, "packets": 5000, "dports": 2000, "dport": 80, "proto": "tcp"})
    found = Detector(rules or load_rules(), Config(allowlist=ALLOW)).evaluate(ev, kernel_ns)
    assert found, "the shipped rules no longer fire on this event"
    return found[0]


def test_detected_at_is_the_decision_not_the_kernel_event(responder) -> None:
    r, store = responder
    old_kernel_ns, decided_ns = 100 * S, 190 * S        # the event waited 90 s in a queue
    inc = r.handle(replace(finding(old_kernel_ns), decided_mono_ns=decided_ns))
    assert inc.detected_at == BASE_S + 190.0
    assert inc.first_seen_at == BASE_S + 99.0            # the evidence's start is the kernel's
    [line] = [e for e in store.incident_events(inc.id) if e.kind == "finding"]
    assert line.at == BASE_S + 190.0
    assert line.data["event_to_decision_ms"] == 90_000.0   # the kernel's time stays known


def test_unstamped_finding_keeps_the_event_time(responder) -> None:
    """A finding nobody stamped (a manual one, a test's) is dated by its event."""
    r, store = responder
    inc = r.handle(finding(150 * S))
    assert inc.detected_at == BASE_S + 150.0
    [line] = [e for e in store.incident_events(inc.id) if e.kind == "finding"]
    assert "event_to_decision_ms" not in line.data


# -- run validation -------------------------------------------------------------------------

MS = 1_000_000
GOOD = figures.Marks(first_packet=1000 * MS, probe_first_ok=700 * MS, kernel_event=1001 * MS,
                     detected=1003 * MS, applying=1004 * MS, mitigated=1007 * MS,
                     cut_off=1010 * MS, expect_cut_off=True)


def test_a_run_that_measured_its_figure_is_valid() -> None:
    assert figures.invalid_reason(GOOD) is None
    # the cut-off may land while the transaction commits, between applying and mitigated
    assert figures.invalid_reason(replace(GOOD, cut_off=1005 * MS)) is None


@pytest.mark.parametrize("change, reason", [
    ({"cut_off": 990 * MS}, "before the mitigation could be in force"),
    ({"cut_off": 1001 * MS, "applying": None}, "before the mitigation could be in force"),
    ({"probe_first_ok": None}, "never connected"),
    ({"probe_first_ok": 1000 * MS}, "after the attack began"),
    ({"probe_first_ok": 1200 * MS}, "after the attack began"),
    ({"mitigated": None}, "mitigation never came"),
    ({"detected": None}, "never detected"),
    ({"cut_off": None}, "never cut off"),
    ({"first_packet": None}, "no packet"),
    ({"detected": 900 * MS}, "clocks disagree"),
    ({"kernel_event": 1100 * MS}, "clocks disagree"),
    ({"mitigated": 990 * MS}, "clocks disagree"),
])
def test_runs_that_measured_nothing_are_invalid(change, reason) -> None:
    why = figures.invalid_reason(replace(GOOD, **change))
    assert why is not None and reason in why


def test_no_cut_off_is_fine_where_none_is_expected() -> None:
    """A challenge (SYN proxy) lets the attacker's own prober through by design."""
    assert figures.invalid_reason(replace(GOOD, cut_off=None, expect_cut_off=False)) is None


def test_the_timeline_judges_its_own_run() -> None:
    """The demo's and attack_latency's Timeline: cut off before mitigation is invalid."""
    tl = Timeline("port_scan", first_packet_mono_ns=GOOD.first_packet,
                  detected_mono_ns=GOOD.detected, applying_mono_ns=GOOD.applying,
                  mitigated_mono_ns=GOOD.mitigated, cut_off_mono_ns=GOOD.cut_off,
                  kernel_event_mono_ns=GOOD.kernel_event,
                  probe={"first_success_mono_ns": GOOD.probe_first_ok})
    d = tl.as_dict()
    assert d["invalid"] is None
    assert (d["kernel_event_ms"], d["detected_ms"], d["kernel_to_detected_ms"]) == (1.0, 3.0, 2.0)
    tl.cut_off_mono_ns = 995 * MS
    assert "before the mitigation" in tl.as_dict()["invalid"]
    tl.cut_off_mono_ns = None              # port_scan is answered with a block: a cut is due
    assert "never cut off" in tl.as_dict()["invalid"]


def test_summaries_leave_invalid_runs_out_and_fail_when_too_many() -> None:
    runs = [{"x": 1.0, "invalid": None}, {"x": 500.0, "invalid": "the prober never connected"},
            {"x": 3.0, "invalid": None}]
    valid, invalid = figures.split(runs)
    assert [r["x"] for r in valid] == [1.0, 3.0]
    assert invalid == [{"run": 1, "reason": "the prober never connected"}]
    assert figures.spread([r["x"] for r in valid])["max"] == 3.0
    assert figures.too_many_invalid(3, 1, 0.2) and not figures.too_many_invalid(10, 2, 0.2)
    assert figures.too_many_invalid(0, 0) and figures.too_many_invalid(2, 2, 1.0)


def test_containment_and_sent_after() -> None:
    # 1000 packets evenly from t=0 to t=1 s; the mitigation at 0.25 s: 750 sent after it
    assert figures.sent_after(1000, 0, S, S // 4) == 750.0
    assert figures.sent_after(1000, 0, S, -5) == 1000.0 and figures.sent_after(1000, 0, S, 2 * S) == 0.0
    assert figures.containment(75, 750.0) == pytest.approx(0.9)
    assert figures.containment(0, 750.0) == 1.0
    assert figures.containment(5, 0.0) is None


def test_a_kernel_event_before_the_first_packet_makes_the_run_invalid():
    # The rule fired on something else (a previous window, the prober's own traffic).
    s = 1_000_000_000
    m = figures.Marks(first_packet=10 * s, probe_first_ok=9 * s, detected=int(10.01 * s),
                      applying=int(10.02 * s), mitigated=int(10.03 * s), cut_off=None,
                      kernel_event=int(9.5 * s))
    assert "before the attack's first packet" in figures.invalid_reason(m)
