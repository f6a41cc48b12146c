"""Finding lines of an incident's timeline: repeated identical findings are one line with a
count, first and last time, deduplicated when recorded (not when shown).

Why at record time: a reverse shell respawned in a loop, or a flood re-reported every
window, would otherwise add a row per finding; the attacker would decide how large the
database grows and how long every timeline is. Deduplicated in the store, the rows an
incident holds are bounded: at most MAX_FINDING_LINES distinct finding lines, then one
"other findings" line that counts the rest. The incident's own `findings` counter still
counts every finding.

Identical: the same rule, action and evidence shape -- the same evidence keys and the same
non-numeric values (executable, command line, cgroup, path, stdio kinds, ...). Numbers
(pids, counters, rates, ports) may differ: they differ on every repeat of one attack. The
numbers that say who acted or on whom (IDENTITY_KEYS: uids) are not such numbers: another
user doing the same thing is another line. Authority's note (`authority`) is left out: it
names the pid, and the rest of what it says follows from the rule, the uids and the
cgroup. The line keeps the first finding's evidence and the last one's (`last_evidence`).

Line data: rule, action, evidence, shape, count, first_at, last_at (and last_evidence
once count > 1; event_to_decision_ms, the first finding's time from its event -- the
kernel's timestamp for probe events -- to the detector's decision, when it was stamped).
`at` is the detector's decision time (the incident's detected_at); the line's `at` stays
the first time, so the timeline keeps its order.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
from typing import Any, Mapping

from agent.model import Finding

MAX_FINDING_LINES = 64
OTHER_SHAPE = "other"
IDENTITY_KEYS = frozenset({"uid", "euid", "target_uid", "loginuid", "cap_effective"})
NOT_SHAPE_KEYS = frozenset({"authority"})


def shape_of(f: Finding) -> str:
    """A short digest of what makes two findings "identical" (see the module docstring)."""
    ev: Mapping[str, Any] = {k: v for k, v in f.evidence.items() if k not in NOT_SHAPE_KEYS}
    fixed = sorted((k, v) for k, v in ev.items() if not _is_number(v) or k in IDENTITY_KEYS)
    numeric = sorted(k for k, v in ev.items() if _is_number(v) and k not in IDENTITY_KEYS)
    text = json.dumps([f.rule, f.action, fixed, numeric], default=str, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def record(db: sqlite3.Connection, incident_id: str, at: float, f: Finding) -> None:
    """Add `f` to the incident's timeline, inside the caller's transaction."""
    shape = shape_of(f)
    evidence = json.loads(json.dumps(dict(f.evidence), default=str))
    row = _line(db, incident_id, shape)
    if row is None:
        lines = db.execute("SELECT COUNT(*) FROM incident_events WHERE incident_id=? AND "
                           "kind='finding'", (incident_id,)).fetchone()[0]
        if lines >= MAX_FINDING_LINES:
            shape = OTHER_SHAPE
            row = _line(db, incident_id, shape)
    if row is None:
        data = {"rule": f.rule, "action": f.action, "evidence": evidence, "shape": shape,
                "count": 1, "first_at": at, "last_at": at}
        if f.decided_mono_ns:   # the event's (kernel's) time -> the detector's decision
            data["event_to_decision_ms"] = round((f.decided_mono_ns - f.detected_mono_ns) / 1e6, 3)
        text = f.rule
        if shape == OTHER_SHAPE:
            data["rules"] = [f.rule]
            text = _other_text(1)
        db.execute("INSERT INTO incident_events (incident_id, at, kind, text, data) "
                   "VALUES (?,?,?,?,?)", (incident_id, at, "finding", text, json.dumps(data)))
        return
    data = json.loads(row["data"])
    count = int(data.get("count", 1)) + 1
    data.update(count=count, last_at=max(at, float(data.get("last_at", at))),
                last_evidence=evidence)
    if shape == OTHER_SHAPE:
        if f.rule not in data.setdefault("rules", []) and len(data["rules"]) < 32:
            data["rules"].append(f.rule)
        text = _other_text(count)
    else:
        text = f"{data['rule']} (x{count})"
    db.execute("UPDATE incident_events SET text=?, data=? WHERE seq=?",
               (text, json.dumps(data), row["seq"]))


def _line(db: sqlite3.Connection, incident_id: str, shape: str) -> sqlite3.Row | None:
    return db.execute("SELECT seq, data FROM incident_events WHERE incident_id=? AND "
                      "kind='finding' AND json_extract(data, '$.shape')=? LIMIT 1",
                      (incident_id, shape)).fetchone()


def _other_text(count: int) -> str:
    return (f"other findings (x{count}): past {MAX_FINDING_LINES} distinct ones, further "
            "findings are counted here")
