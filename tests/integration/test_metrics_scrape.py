"""Prometheus metrics, scraped over HTTP and parsed with prometheus_client's own parser:
in process against a real store and outbox, and from a real agent that just stopped an
attack in a lab namespace."""
from __future__ import annotations

import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from swarmlab import attacks
from swarmlab.lab import sh, wait_for
from agent.model import (Event, EventClass, Finding, Mitigation, MitigationKind, Severity,
                         mono_ns)
from agent.report.metrics import Metrics
from agent.state.outbox import Outbox
from swarmlab.scenario import Scenario
from agent.state.store import Store


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(got: dict, name: str, **labels: str) -> float | None:
    return got.get((name, frozenset(labels.items())))


def scrape(host: str, port: int) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{host}:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def test_metrics_cover_the_pipeline_the_store_and_the_outbox(tmp_path):
    store = Store(tmp_path / "agent.db")
    box = Outbox(store.path, max_reports=100, hard_max_reports=200)
    metrics = Metrics(store, losses=lambda: 7, outbox=box, clock=lambda: 0.0,
                      unparsed=lambda: {"chain_too_long": 4, "truncated": 0},
                      policy_denied=lambda: {("egress", "metadata"): 5, ("files", "keys"): 2})
    metrics.serve("127.0.0.1:0")
    try:
        event = Event(kind="syn_alert", subject="192.0.2.1", mono_ns=mono_ns(),
                      first_mono_ns=mono_ns(), source="net")
        f = Finding(rule_id="net.syn_flood", rule_version=1, event_class=EventClass.SYSTEM_ATTACK,
                    severity=Severity.HIGH, entity="ip:192.0.2.1", action="block",
                    first_mono_ns=1, detected_mono_ns=2)
        metrics.observe_event(event, [f])
        inc = store.record_finding(f, 100.0, 100.2)
        metrics.observe("incident", inc)
        store.add_mitigation(Mitigation(kind=MitigationKind.BLOCK_IP, target="192.0.2.1",
                                        created_at=100.3, expires_at=None, incident_id=inc.id))
        store.mark_mitigated(inc.id, 100.3, False)
        inc = store.incident(inc.id)
        metrics.observe("incident", inc)
        metrics.observe("incident", inc)          # a later change: observed once
        metrics.on_delivered({"incident": 2})
        metrics.delivery_failures.inc()
        box.dropped["heartbeat"] += 3
        got = samples(scrape(*metrics.address))
    finally:
        metrics.close()
        box.close()
        store.close()
    assert value(got, "swarm_agent_events_total", source="net", kind="syn_alert") == 1
    assert value(got, "swarm_agent_findings_total", source="net", rule="net.syn_flood@1") == 1
    assert value(got, "swarm_agent_policy_denied_total", policy_kind="egress",
                 policy="metadata") == 5
    assert value(got, "swarm_agent_policy_denied_total", policy_kind="files", policy="keys") == 2
    assert value(got, "swarm_agent_incidents", event_class="system_attack", state="mitigated") == 1
    assert value(got, "swarm_agent_deadline_misses_total", event_class="system_attack") == 0
    assert value(got, "swarm_agent_deadline_met_total", event_class="system_attack") == 1
    assert value(got, "swarm_agent_active_mitigations", kind="block_ip") == 1
    assert value(got, "swarm_agent_time_to_detect_seconds_count", event_class="system_attack") == 1
    assert value(got, "swarm_agent_time_to_mitigate_seconds_count", event_class="system_attack") == 1
    assert value(got, "swarm_agent_time_to_mitigate_seconds_bucket", event_class="system_attack",
                 le="0.5") == 1                   # 0.3 s from the first evidence
    assert value(got, "swarm_agent_ringbuf_lost_events_total") == 7
    assert value(got, "swarm_agent_unparsed_packets_total", reason="chain_too_long") == 4
    assert value(got, "swarm_agent_outbox_reports", kind="incident") == 1
    assert value(got, "swarm_agent_outbox_reports", kind="mitigation") == 1
    assert value(got, "swarm_agent_outbox_dropped_total", kind="heartbeat") == 3
    assert value(got, "swarm_agent_mesh_reports_delivered_total", kind="incident") == 2
    assert value(got, "swarm_agent_mesh_delivery_failures_total") == 1


SCRAPE = ("import urllib.request as u, sys; o = u.build_opener(u.ProxyHandler({})); "
          "sys.stdout.write(o.open('http://127.0.0.1:9464/metrics', timeout=5).read().decode())")


@pytest.mark.privileged
def test_a_running_agent_serves_metrics_on_its_loopback():
    with Scenario() as sc:
        scan = attacks.run(sc.lab.attacker, "port_scan", target=sc.lab.addr("victim"),
                           ports="1000-1400", duration_s=3)
        assert scan["sent"] > 0, scan
        attacker = sc.lab.addr("attacker")

        def blocked() -> bool:
            with sc.agent.store() as store:
                return any(m.target == attacker and m.kind == "block_ip"
                           for m in store.active_mitigations(time.time()))
        wait_for(blocked, timeout_s=10)
        got = samples(sh(sys.executable, "-c", SCRAPE, ns=sc.lab.victim).stdout)
    assert sum(v for (name, labels), v in got.items()
               if name == "swarm_agent_findings_total"
               and ("rule", "net.connect_scan@1") in labels) >= 1
    assert sum(v for (name, _), v in got.items() if name == "swarm_agent_events_total") >= 1
    assert value(got, "swarm_agent_incidents", event_class="system_attack", state="mitigated") == 1
    assert value(got, "swarm_agent_active_mitigations", kind="block_ip") == 1
    assert value(got, "swarm_agent_time_to_mitigate_seconds_count", event_class="system_attack") == 1
    assert value(got, "swarm_agent_ringbuf_lost_events_total") == 0
