"""Red team r7 (area B): feedback records whose scope an attacker can piggyback on.

A finding's scope lists up to 8 executables and destinations, and a record matches when
ANY of them is in its scope. A suppressed (not learned) executable stays never-seen, so it
is in the scope of every later window that runs it. An attacker who runs that benign,
already-excused executable in the same window as a miner gets the miner's findings kept
back: the exception silences more than "exactly that" pattern."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent.detect.anomaly import AnomalyEngine
from agent.model import EventClass, Finding, Severity
from agent.respond.feedbackbook import FeedbackBook
from agent.state.store import Store
from tests.unit.anomaly_stream import WEB, WEB_ID, benign, config, ev, replay

NODE = "node-1"
BENIGN_SHA, MINER_SHA = "bb" * 32, "cc" * 32


@pytest.fixture(scope="module")
def snap():
    eng = AnomalyEngine(config(), NODE)
    replay(eng, benign(1, 0, 3000), 0, 3000)
    return json.loads(json.dumps(eng.snapshot()))


class Clock:
    t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def _helper_incident(snap, tmp_path: Path):
    """A warm engine sees a benign new tool (a package update's helper) run once in the
    web workload; its findings recorded as one incident, with a feedback book on the
    store: (engine, store, book, findings, incident id)."""
    eng = AnomalyEngine.restore(config(), NODE, snap)
    evs = benign(3, 3000, 3300) + [ev("proc.exec", 3101, "pid:9", exe="/usr/bin/helper",
                                      exe_id="8:1:4242", exe_sha256=BENIGN_SHA,
                                      cgroup=WEB, container=WEB_ID)]
    first = [f for _, f in replay(eng, evs, 3000, 3300)]
    store = Store(tmp_path / "state.db")
    book = FeedbackBook(store, NODE, max_ttl_s=86400 * 365, clock=Clock())
    incident = None
    for f in first:
        incident = store.record_finding(f, 999_990.0, 999_995.0).id
    return eng, store, book, first, incident


def test_a_benign_executable_run_beside_a_miner_does_not_hide_the_miner(snap, tmp_path: Path):
    # 1. A benign new tool (say, a package update's helper) runs once: findings.
    eng, store, book, first, incident = _helper_incident(snap, tmp_path)
    assert first, "the benign tool raised no finding (precondition)"
    # 2. The operator marks it a false positive with the default scope (the helper's sha).
    planned = book.plan(incident, by="local:uid=0", reason="apt's helper")
    assert planned and all(r.scope_kind == "exe" or r.scope_kind == "address"
                           for r in planned)
    book.commit(planned)
    # 3. Later the attacker runs a miner, and the helper in the same window.
    evs = benign(5, 3300, 4700) + [
        ev("proc.exec", 4503, "pid:20", exe="/usr/bin/helper", exe_id="8:1:4242",
           exe_sha256=BENIGN_SHA, cgroup=WEB, container=WEB_ID),
        ev("proc.exec", 4503.2, "pid:21", exe="/tmp/.miner", exe_id="8:1:6666",
           exe_sha256=MINER_SHA, cgroup=WEB, container=WEB_ID)]
    second = [f for _, f in replay(eng, evs, 3300, 4700)
              if MINER_SHA in f.evidence.get("scope", {}).get("exe_sha256", [])]
    assert second, "the miner raised no finding (precondition)"
    kept_back = [f.rule_id for f in second if book.check(f) is not None]
    # What should happen: the miner is not the pattern the operator excused; it alerts.
    assert kept_back == [], f"the miner's findings were silenced by the helper's " \
        f"exception: {kept_back}"
    store.close()


def test_excusing_a_new_executable_does_not_silence_the_workloads_usual_destination(
        snap, tmp_path: Path):
    """The benign helper's window also had the workload's usual database connections; a
    detector whose drivers included a network feature lists 10.0.0.5 (not new) in its
    scope.dst, and the default scope takes an address before an executable: the verdict
    "this helper is fine" becomes "this detector never alerts on anything that talks to
    the database" -- on every workload of the node."""
    eng, store, book, first, incident = _helper_incident(snap, tmp_path)
    planned = book.plan(incident, by="local:uid=0", reason="apt's helper")
    scopes = {(r.rule, r.scope_kind, r.scope_value) for r in planned}
    assert not [s for s in scopes if s[1] == "address"], \
        f"a never-new destination became a default scope: {sorted(scopes)}"
    store.close()


def _file_id(path: Path) -> str:
    st = path.stat()
    return f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}:{st.st_ino}"


def _exe_finding(exe_id: str, dst: str) -> Finding:
    scope = {"node": NODE, "cgroup": WEB, "container": WEB_ID, "exe_id": [exe_id],
             "dst": [dst], "dport": [443]}
    return Finding(rule_id="anomaly.beacon", rule_version=3,
                   event_class=EventClass.SUSPICIOUS_ACTIVITY, severity=Severity.MEDIUM,
                   entity=f"cgroup:{WEB}", action="investigate", first_mono_ns=1,
                   detected_mono_ns=2, evidence={"detector": "beacon", "scope": scope})


def test_scope_exe_without_a_value_does_not_take_a_reusable_file_id(tmp_path: Path):
    """exe_sha256 may be None (CONTRACT11); `--scope exe` then silently takes the kernel
    file id (dev:ino), which README says happens only when the id is named. Once the
    excused file is deleted, the next file created gets its inode (ext4 reuses it at
    once), and that file's findings are kept back."""
    helper = tmp_path / "helper"
    helper.write_bytes(b"#!/bin/sh\nexit 0\n")
    helper_id = _file_id(helper)
    # (The attacker's swap is done first here only so that the store's own files do not
    # take the freed inode in this test; the record holds the id text either way.)
    helper.unlink()
    miner = tmp_path / "miner"
    miner.write_bytes(b"\x7fELF a miner")
    if _file_id(miner) != helper_id:
        pytest.skip("this filesystem did not reuse the inode")
    (tmp_path / "db").mkdir()
    store = Store(tmp_path / "db" / "state.db")
    book = FeedbackBook(store, NODE, max_ttl_s=86400 * 365, clock=Clock())
    incident = store.record_finding(_exe_finding(helper_id, "203.0.113.7"),
                                    999_990.0, 999_995.0).id
    try:
        planned = book.plan(incident, scope="exe", by="local:uid=0", reason="our helper")
    except ValueError:
        store.close()
        return      # refused (asks for the id by name, or for content): what should happen
    book.commit(planned)
    kept = book.check(_exe_finding(_file_id(miner), "198.51.100.66"))
    store.close()
    assert kept is None, f"the miner (same inode, other content, other destination) was " \
        f"kept back by {kept.scope_kind}={kept.scope_value}"


def test_an_executable_path_cannot_write_lines_into_the_alertmanager_annotations(
        snap, tmp_path: Path):
    """The anomaly summary names executables by path (attacker-chosen: any byte but NUL
    and /), and reaches Alertmanager's annotations raw: a path with a newline forges
    lines in the security team's Slack/e-mail notification. The CLI escapes such text
    (README, "Free text is cleaned"); the notification should too."""
    from agent.config import Alerts
    from agent.report.alerts import Notifier, to_alert

    forged = "/tmp/x\nRESOLVED by secops: benign (ticket SEC-1), no action needed\n"
    eng = AnomalyEngine.restore(config(), NODE, snap)
    evs = benign(3, 3000, 3300) + [ev("proc.exec", 3101, "pid:9", exe=forged,
                                      exe_id="8:1:4343", exe_sha256=MINER_SHA,
                                      cgroup=WEB, container=WEB_ID)]
    found = [f for _, f in replay(eng, evs, 3000, 3300) if f.rule_id == "anomaly.newexe"]
    assert found and "\n" in found[0].evidence["summary"]      # precondition
    store = Store(tmp_path / "state.db")
    incident = store.record_finding(found[0], 999_990.0, 999_995.0)
    cfg = Alerts(url="http://127.0.0.1:9")
    notes = Notifier(cfg, store, NODE)._investigation_notes(incident)
    alert = to_alert(cfg, incident, NODE, 1_000_000.0, "", notes)
    store.close()
    bad = {k: v for k, v in alert["annotations"].items()
           if any(ord(c) < 0x20 or 0x7f <= ord(c) < 0xa0 for c in v)}
    assert not bad, f"control characters reach Alertmanager: {bad}"


def test_a_decoy_executable_does_not_buy_an_hour_without_findings(snap):
    """Dedup is per (workload, detector, kind of driver) for dedup_s (3600 s) unless 100
    times less likely: a decoy never-seen executable at t opens the findings (and maybe
    an operator's false-positive verdict), and a miner started in the same workload ten
    minutes later raises NO finding from any detector -- it is never named to anyone."""
    eng = AnomalyEngine.restore(config(), NODE, snap)
    evs = benign(3, 3000, 4000) + [
        ev("proc.exec", 3101, "pid:9", exe="/tmp/decoy", exe_id="8:1:4242",
           exe_sha256=BENIGN_SHA, cgroup=WEB, container=WEB_ID),
        ev("proc.exec", 3701, "pid:10", exe="/tmp/.miner", exe_id="8:1:6666",
           exe_sha256=MINER_SHA, cgroup=WEB, container=WEB_ID)]
    found = replay(eng, evs, 3000, 4000)
    assert any(BENIGN_SHA in f.evidence["scope"].get("exe_sha256", []) for _, f in found)
    named = [f.rule_id for _, f in found
             if MINER_SHA in f.evidence["scope"].get("exe_sha256", [])]
    assert named, "the miner, a second never-seen executable, raised no finding " \
        "(deduplicated behind the decoy's)"
