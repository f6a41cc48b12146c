"""Administrator notifications against a real Alertmanager (Debian's
prometheus-alertmanager), started by the test on loopback with a temporary config and
storage, its routing tree matching the labels the agent sets; queried through its v2 API."""
from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from agent.config import Alerts
from agent.model import EventClass, Finding, IncidentState, Severity
from agent.report.alerts import Notifier, labels_for, needs_human
from agent.state.store import Store
from tests.conftest import skip_unsupported

BINARY = "prometheus-alertmanager"
ROUTES = """\
route:
  receiver: default
  group_wait: 1s
  routes:
    - matchers: ['team="security"', 'route="investigation"']
      receiver: security-investigations
    - matchers: ['escalated="true"']
      receiver: security-oncall
    - matchers: ['team="netops"']
      receiver: netops
receivers:
  - name: default
  - name: security-oncall
  - name: netops
  - name: security-investigations
"""
CFG = Alerts(url="", resend_s=30.0, timeout_s=5.0, labels={"cluster": "test"},
             class_labels={"system_attack": {"team": "netops"},
                           "security_breach": {"team": "security"}},
             severity_labels={"critical": {"priority": "P1"}},
             escalation_labels={"page": "security"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> object:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as resp:
        return json.load(resp)


@pytest.fixture
def alertmanager(tmp_path: Path):
    """A real Alertmanager on 127.0.0.1:<free port>, clustering off; its base URL.
    Stopped (and its storage removed with tmp_path) after the test."""
    if shutil.which(BINARY) is None:
        skip_unsupported(f"needs {BINARY} (install.sh --test installs it)")
    (tmp_path / "am.yml").write_text(ROUTES)
    port = free_port()
    proc = subprocess.Popen(
        [BINARY, f"--config.file={tmp_path / 'am.yml'}", f"--storage.path={tmp_path / 'am'}",
         f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                get_json(url + "/api/v2/status")
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "Alertmanager did not start"
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def finding(cls: EventClass, entity: str, severity: Severity = Severity.HIGH) -> Finding:
    return Finding(rule_id="t.rule", rule_version=1, event_class=cls, severity=severity,
                   entity=entity, action="block", first_mono_ns=1, detected_mono_ns=2)


def active_alerts(url: str, count: int) -> dict[str, dict] | None:
    """incident_id -> alert when Alertmanager holds exactly `count` active alerts."""
    alerts = get_json(url + "/api/v2/alerts")
    return {a["labels"]["incident_id"]: a for a in alerts} if len(alerts) == count else None


def test_labels_map_class_and_severity_and_mark_what_needs_a_human(tmp_path):
    with Store(tmp_path / "a.db") as store:
        attack = store.record_finding(finding(EventClass.SYSTEM_ATTACK, "ip:192.0.2.1",
                                              Severity.CRITICAL), 1.0, 2.0)
        breach = store.record_finding(finding(EventClass.SECURITY_BREACH, "process:42"), 1.0, 2.0)
    assert needs_human(CFG, attack) == ""
    assert labels_for(CFG, attack, "n1") == {
        "alertname": "SwarmAgentIncident", "event_class": "system_attack", "severity": "critical",
        "entity": "ip:192.0.2.1", "node": "n1", "escalated": "false", "cluster": "test",
        "team": "netops", "priority": "P1", "incident_id": attack.id}
    labels = labels_for(CFG, breach, "n1")
    assert labels["escalated"] == "true" and labels["page"] == "security"
    assert labels["team"] == "security"


def test_incidents_reach_alertmanager_routed_escalated_and_resolved(tmp_path, alertmanager):
    cfg = Alerts(**{**CFG.__dict__, "url": alertmanager})
    store = Store(tmp_path / "agent.db")
    attack = store.record_finding(finding(EventClass.SYSTEM_ATTACK, "ip:192.0.2.1"), 1.0, 2.0)
    store.mark_mitigated(attack.id, 2.5, False)
    breach = store.record_finding(finding(EventClass.SECURITY_BREACH, "process:42"), 1.0, 2.0)
    failed = store.record_finding(finding(EventClass.SYSTEM_ATTACK, "ip:192.0.2.9"), 1.0, 2.0)
    store.set_incident_state(failed.id, IncidentState.ESCALATED, 3.0,
                             "escalated: block_ip 192.0.2.9 could not be applied")
    sent: list[int] = []
    notifier = Notifier(cfg, store, "node-a", on_sent=sent.append)

    async def wait_for(predicate, timeout_s: float = 20.0):
        deadline = time.monotonic() + timeout_s
        while True:
            value = await asyncio.to_thread(predicate)
            if value:
                return value
            assert time.monotonic() < deadline, "Alertmanager never showed the expected alerts"
            await asyncio.sleep(0.1)

    async def scenario() -> tuple[dict, dict]:
        task = asyncio.create_task(notifier.run())
        try:
            first = await wait_for(lambda: active_alerts(alertmanager, 3))
            # The attack is resolved and the breach's severity rises: the first alert ends,
            # the breach's old label set ends and its new one fires.
            store.set_incident_state(attack.id, IncidentState.RESOLVED, time.time())
            notifier.observe("incident", store.incident(attack.id))
            raised = store.record_finding(finding(EventClass.SECURITY_BREACH, "process:42",
                                                  Severity.CRITICAL), 1.0, 3.0)
            notifier.observe("incident", raised)
            later = await wait_for(
                lambda: (a := active_alerts(alertmanager, 2))
                and a.get(breach.id, {}).get("labels", {}).get("severity") == "critical" and a)
            # Alertmanager may show the alerts before the notifier's post has returned and
            # counted them: wait for the count, not only for what Alertmanager shows.
            await wait_for(lambda: sum(sent) >= 5)
            return first, later
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    first, later = asyncio.run(scenario())
    store.close()
    receivers = {i: [r["name"] for r in a["receivers"]] for i, a in first.items()}
    assert receivers == {attack.id: ["netops"], breach.id: ["security-oncall"],
                         failed.id: ["security-oncall"]}
    assert first[attack.id]["labels"]["escalated"] == "false"
    assert first[attack.id]["annotations"]["state"] == "mitigated"
    assert first[breach.id]["annotations"]["escalation"] == "security_breach needs a human"
    assert first[failed.id]["labels"]["escalated"] == "true"
    # The responder's own escalation note says why (a failure here; an isolation elsewhere).
    assert first[failed.id]["annotations"]["escalation"] == \
        "escalated: block_ip 192.0.2.9 could not be applied"
    assert set(later) == {breach.id, failed.id}
    assert later[breach.id]["labels"]["priority"] == "P1"
    assert sum(sent) >= 5


def test_an_investigation_goes_to_the_security_team_with_its_summary(tmp_path, alertmanager):
    """The default alerts config routes suspicious_activity to the security team; the alert
    carries the finding's summary, its drivers and what the evidence bundle holds."""
    cfg = Alerts(url=alertmanager, resend_s=30.0)          # default class_labels
    store = Store(tmp_path / "agent.db")
    f = Finding(rule_id="anomaly.beacon", rule_version=3,
                event_class=EventClass.SUSPICIOUS_ACTIVITY, severity=Severity.MEDIUM,
                entity="cgroup:/kubepods.slice/pod1", action="investigate", first_mono_ns=1,
                detected_mono_ns=2,
                evidence={"summary": "beacon every 5.1 s +- 9% to 203.0.113.7:443",
                          "drivers": [{"feature": "interval_dispersion", "value": 0.09,
                                       "baseline": 0.8, "contribution": 0.7}]})
    inc = store.record_finding(f, 1.0, 2.0)
    store.set_incident_state(inc.id, IncidentState.ESCALATED, 2.0,
                             "escalated: investigation opened for the security team")
    store.add_incident_event(inc.id, "evidence", "evidence: 3 processes, 1 listening sockets",
                             2.5, {"processes": []})
    notifier = Notifier(cfg, store, "node-a")

    async def scenario() -> dict:
        task = asyncio.create_task(notifier.run())
        try:
            deadline = time.monotonic() + 20
            while not (found := await asyncio.to_thread(active_alerts, alertmanager, 1)):
                assert time.monotonic() < deadline, "the investigation never reached Alertmanager"
                await asyncio.sleep(0.1)
            return found
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    alert = asyncio.run(scenario())[inc.id]
    store.close()
    assert [r["name"] for r in alert["receivers"]] == ["security-investigations"]
    assert alert["labels"]["team"] == "security" and alert["labels"]["escalated"] == "true"
    ann = alert["annotations"]
    assert ann["finding_summary"] == "beacon every 5.1 s +- 9% to 203.0.113.7:443"
    assert ann["drivers"] == "interval_dispersion=0.09 (baseline 0.8)"
    assert ann["evidence"] == "evidence: 3 processes, 1 listening sockets"
    assert ann["escalation"] == "escalated: investigation opened for the security team"
