"""Prometheus metrics, served on loopback by default (config `metrics.listen`).

Counted in process: events and findings per source and rule (a rule's hits, by
"id@version"), what kernel-enforced policies refused per policy rule, time-to-detect and
time-to-mitigate histograms per event class (from the first evidence), mesh deliveries
and failed calls, alerts sent and failed posts. Read from the store and the outbox at each
scrape, so they survive restarts and never drift: incidents per class and state, deadline
hits and misses per class, active mitigations per kind, outbox depth and drops, the
database's health (degraded, failed writes, catch-ups, files moved aside). The probe's
ring-buffer losses and the packets its parser could not follow (by reason) come from the
probe itself; the event queue between probes and detector (depth, high-water mark,
capacity, drops by kind and lane) from the queue, and events or findings that failed in the
pipeline from the daemon's counters through it. The HTTP server is a daemon thread; a
scrape reads the store under its lock, like any other reader thread.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any, Callable, Iterable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from agent.model import Event, Finding, Incident, MitigationKind
from agent.report.gpumetrics import GpuCollector
from agent.report.promserve import Endpoint
from agent.state.store import Store

log = logging.getLogger("swarm_agent")

PREFIX = "swarm_agent"
# From well under the System Attack deadline (30 s) to the Suspicious Activity one (900 s).
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
_SEEN_MAX = 100_000       # incidents remembered so each latency is observed once


class Metrics(Endpoint):
    """The agent's metrics. `observe_event` is called by the pipeline, `observe` is the
    responder's observer hook; `losses()` gives the probe's lost ring-buffer events,
    `unparsed()` the packets its parser could not follow by reason, and `outbox`
    (optional) the mesh outbox."""

    def __init__(self, store: Store, *, losses: Callable[[], int] = lambda: 0,
                 outbox: Any = None, clock: Callable[[], float] = time.time,
                 unparsed: Callable[[], dict[str, int]] = dict,
                 queue: Callable[[], dict[str, Any]] | None = None,
                 gpus: Callable[[], dict[str, Any]] | None = None,
                 policy_denied: Callable[[], dict[tuple[str, str], int]] | None = None,
                 feedback: Callable[[], dict[str, dict[str, int]]] | None = None,
                 fleet: Callable[[], dict[str, Any]] | None = None):
        self.registry = CollectorRegistry()
        self._started_at = clock()
        self._seen_detect: OrderedDict[str, None] = OrderedDict()
        self._seen_mitigate: OrderedDict[str, None] = OrderedDict()
        self._server: WSGIServer | None = None
        r = self.registry
        self.events = Counter(f"{PREFIX}_events", "Events from the sources",
                              ["source", "kind"], registry=r)
        self.findings = Counter(f"{PREFIX}_findings", "Findings (a rule fired)",
                                ["source", "rule"], registry=r)
        self.time_to_detect = Histogram(
            f"{PREFIX}_time_to_detect_seconds",
            "First evidence to the detector's decision, per new incident",
            ["event_class"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.time_to_mitigate = Histogram(
            f"{PREFIX}_time_to_mitigate_seconds",
            "First evidence to the first mitigation in force, per incident",
            ["event_class"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.delivered = Counter(f"{PREFIX}_mesh_reports_delivered",
                                 "Reports the mesh acknowledged", ["kind"], registry=r)
        self.delivery_failures = Counter(f"{PREFIX}_mesh_delivery_failures",
                                         "Failed calls to the mesh (reports stay queued)",
                                         registry=r)
        self.alerts_sent = Counter(f"{PREFIX}_alerts_sent", "Alerts posted to Alertmanager",
                                   registry=r)
        self.alert_failures = Counter(f"{PREFIX}_alert_failures",
                                      "Failed posts to Alertmanager", registry=r)
        self.failed = Counter(f"{PREFIX}_pipeline_failures",
                              "Events (stage=event) or findings (stage=finding) whose "
                              "processing raised; counted and logged, the rest went on",
                              ["stage"], registry=r)
        r.register(_StateCollector(store, losses, outbox, unparsed))
        if queue is not None:
            r.register(_QueueCollector(queue))
        if gpus is not None:    # DCGM exporter names (agent/report/gpumetrics.py)
            r.register(GpuCollector(gpus))
        if policy_denied is not None:
            r.register(_PolicyCollector(policy_denied))
        if feedback is not None:
            r.register(_FeedbackCollector(feedback))
        if fleet is not None:
            r.register(_FleetCollector(fleet))

    # -- hooks ---------------------------------------------------------------------------

    def observe_event(self, event: Event, findings: Iterable[Finding]) -> None:
        source = event.source or "unknown"
        self.events.labels(source, event.kind).inc()
        for f in findings:
            self.findings.labels(source, f.rule).inc()

    def observe(self, kind: str, obj: Any) -> None:
        if kind != "incident":
            return
        incident: Incident = obj
        cls = incident.event_class.value
        # Only incidents detected (mitigated) by this process: the one before it observed
        # the earlier ones.
        if incident.detected_at >= self._started_at and _first(self._seen_detect, incident.id):
            self.time_to_detect.labels(cls).observe(
                max(0.0, incident.detected_at - incident.first_seen_at))
        at = incident.mitigated_at
        if at is not None and at >= self._started_at and _first(self._seen_mitigate, incident.id):
            self.time_to_mitigate.labels(cls).observe(max(0.0, at - incident.first_seen_at))

    def on_delivered(self, counts: dict[str, int]) -> None:
        for kind, n in counts.items():
            self.delivered.labels(kind).inc(n)

    # -- serving -------------------------------------------------------------------------


def _first(seen: OrderedDict[str, None], key: str) -> bool:
    if key in seen:
        return False
    seen[key] = None
    if len(seen) > _SEEN_MAX:
        seen.popitem(last=False)
    return True


class _StateCollector:
    """Metrics read at scrape time from the store, the probe and the outbox."""

    def __init__(self, store: Store, losses: Callable[[], int], outbox: Any,
                 unparsed: Callable[[], dict[str, int]] = dict):
        self._store, self._losses, self._outbox = store, losses, outbox
        self._unparsed = unparsed

    def collect(self):
        incidents = GaugeMetricFamily(f"{PREFIX}_incidents", "Incidents per class and state",
                                      labels=["event_class", "state"])
        misses = CounterMetricFamily(f"{PREFIX}_deadline_misses",
                                     "Incidents mitigated after their class deadline",
                                     labels=["event_class"])
        met = CounterMetricFamily(f"{PREFIX}_deadline_met",
                                  "Incidents mitigated within their class deadline",
                                  labels=["event_class"])
        for cls, counts in self._store.counts_by_class().items():
            for state, n in counts.items():
                if state not in ("total", "deadline_met", "deadline_missed"):
                    incidents.add_metric([cls, state], n)
            misses.add_metric([cls], counts["deadline_missed"])
            met.add_metric([cls], counts["deadline_met"])
        active = GaugeMetricFamily(f"{PREFIX}_active_mitigations",
                                   "Mitigations in force, per kind", labels=["kind"])
        by_kind = dict.fromkeys((k.value for k in MitigationKind), 0)
        for m in self._store.active_mitigations(time.time()):
            by_kind[m.kind.value] += 1
        for kind, n in by_kind.items():
            active.add_metric([kind], n)
        yield from (incidents, misses, met, active)
        yield from _storage(self._store)
        yield CounterMetricFamily(f"{PREFIX}_ringbuf_lost_events",
                                  "Events the kernel could not put in the ring buffer",
                                  value=self._losses())
        unparsed = CounterMetricFamily(f"{PREFIX}_unparsed_packets",
                                       "Packets the XDP parser could not follow, by reason "
                                       "(still counted to their source where it was read)",
                                       labels=["reason"])
        for reason, n in self._unparsed().items():
            unparsed.add_metric([reason], n)
        yield unparsed
        if self._outbox is not None:
            depth = GaugeMetricFamily(f"{PREFIX}_outbox_reports",
                                      "Reports waiting for the mesh", labels=["kind"])
            dropped = CounterMetricFamily(f"{PREFIX}_outbox_dropped",
                                          "Reports dropped at the outbox bound", labels=["kind"])
            for kind, n in self._outbox.depth().items():
                depth.add_metric([kind], n)
                dropped.add_metric([kind], self._outbox.dropped.get(kind, 0))
            yield from (depth, dropped)


class _FleetCollector:
    """Fleet decisions (agent.fleet.subscriber): applied, refused by reason, in force,
    the stream sequence applied and how far behind the stream it is."""

    def __init__(self, fleet: Callable[[], dict[str, Any]]):
        self._fleet = fleet

    def collect(self):
        f = self._fleet()
        if not f.get("enabled"):
            return
        yield GaugeMetricFamily(f"{PREFIX}_fleet_connected", "1 while the decision stream is read",
                                value=1 if f.get("connected") else 0)
        yield GaugeMetricFamily(f"{PREFIX}_fleet_seq", "Last decision stream sequence applied",
                                value=f.get("seq") or 0)
        yield GaugeMetricFamily(f"{PREFIX}_fleet_seq_lag",
                                "Stream sequences not applied yet (as of the last look)",
                                value=f.get("lag") or 0)
        yield GaugeMetricFamily(f"{PREFIX}_fleet_in_force", "Fleet blocks in force",
                                value=f.get("in_force") or 0)
        yield CounterMetricFamily(f"{PREFIX}_fleet_applied", "Fleet decisions applied",
                                  value=f.get("applied") or 0)
        refused = CounterMetricFamily(f"{PREFIX}_fleet_refused", "Fleet decisions refused",
                                      labels=["reason"])
        for reason, n in sorted((f.get("refused") or {}).items()):
            refused.add_metric([reason], n)
        yield refused


class _QueueCollector:
    """The event queue between the probes and the detector (agent.sources.queue)."""

    def __init__(self, queue: Callable[[], dict[str, Any]]):
        self._queue = queue

    def collect(self):
        q = self._queue()
        yield GaugeMetricFamily(f"{PREFIX}_event_queue_depth",
                                "Events waiting between the probes and the detector",
                                value=q["depth"])
        yield GaugeMetricFamily(f"{PREFIX}_event_queue_depth_max",
                                "The most events that waited at once since start",
                                value=q["depth_max"])
        yield GaugeMetricFamily(f"{PREFIX}_event_queue_capacity",
                                "Events the queue holds before it drops (probes.queue_events)",
                                value=q["capacity"])
        dropped = CounterMetricFamily(f"{PREFIX}_events_dropped",
                                      "Events dropped because the queue was full, by kind "
                                      "and lane (urgent: events that matched a severe rule)",
                                      labels=["kind", "lane"])
        for kind, n in q["dropped"].items():
            dropped.add_metric([kind, "ordinary"], n)
        for kind, n in q.get("urgent", {}).get("dropped", {}).items():
            dropped.add_metric([kind, "urgent"], n)
        yield dropped


def _storage(store: Store):
    """The database's health (agent.state.backing): degraded while the state is kept in
    memory, writes that went there instead of the file, write-backs, files moved aside."""
    h = store.health
    yield GaugeMetricFamily(f"{PREFIX}_storage_degraded",
                            "1 while the database cannot be written (state kept in memory)",
                            value=int(h.state != "ok"))
    yield CounterMetricFamily(f"{PREFIX}_storage_write_failures",
                              "Writes that could not go to the database file, kept in memory",
                              value=h.write_failures)
    yield CounterMetricFamily(f"{PREFIX}_storage_catch_ups",
                              "Times the state kept in memory was written back to the file",
                              value=h.catch_ups)
    yield CounterMetricFamily(f"{PREFIX}_storage_catch_up_failures",
                              "Tries to write the state kept in memory back that failed",
                              value=h.catch_up_failures)
    yield CounterMetricFamily(f"{PREFIX}_storage_recovered_files",
                              "Corrupt database files moved aside at start (kept)",
                              value=len(h.recovered))


class _PolicyCollector:
    """What kernel-enforced policies refused, per policy rule, read at each scrape:
    (policy_kind, policy) -> count (egress: packets dropped, counted from the drop
    counters; files: opens refused, counted by the answering thread)."""

    def __init__(self, read: Callable[[], dict[tuple[str, str], int]]):
        self._read = read

    def collect(self):
        c = CounterMetricFamily(f"{PREFIX}_policy_denied",
                                "Actions a kernel-enforced policy refused, per policy rule "
                                "(egress: packets dropped; files: opens refused)",
                                labels=["policy_kind", "policy"])
        for (kind, name), n in sorted(self._read().items()):
            c.add_metric([kind, name], n)
        yield c


class _FeedbackCollector:
    """Operators' verdicts per rule or model ("id@version"), read at each scrape
    (agent.respond.feedbackbook): incidents marked false positive (from the store: they
    survive restarts) and findings that feedback kept from the responder (since start)."""

    def __init__(self, read: Callable[[], dict[str, dict[str, int]]]):
        self._read = read

    def collect(self):
        fp = CounterMetricFamily(f"{PREFIX}_false_positives",
                                 "Incidents marked false positive, per rule of their findings",
                                 labels=["rule"])
        kept = CounterMetricFamily(f"{PREFIX}_findings_suppressed",
                                   "Findings feedback kept from the responder, per rule",
                                   labels=["rule"])
        for rule, c in sorted(self._read().items()):
            fp.add_metric([rule], c.get("false_positives", 0))
            kept.add_metric([rule], c.get("suppressed", 0))
        yield fp
        yield kept
