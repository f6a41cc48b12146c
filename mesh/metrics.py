"""Prometheus metrics of the mesh service (config `metrics_listen`, loopback by default).

What a platform team alerts on: nodes gone stale, live incidents across the fleet by
class, decisions stuck pending (nats-server away: the oldest pending decision's age), decisions
nats-server refused for good, the decision service's connection to NATS, refusals by reason
(a flood of proposals, an allowlisted target asked for), calls refused for an unidentified
or a revoked certificate, store failures, and restarts of the embedded nats-server.

Counted in process (reset by a restart): the reporting API's counters (mesh/server.py),
the decision service's publish failures, stream re-creations and reaped consumers, and the
embedded nats-server's restarts. Read from the store at a scrape, so they survive restarts
and never drift, in one read transaction cached for CACHE_S (a scraper every second costs
the store one read every CACHE_S): nodes by status, live incidents by class, decisions by
state and action, blocks in force, the oldest pending decision, refusals by reason,
revoked node names.
`swarm_mesh_store_up` is 0 when that read failed (the store-read figures are then absent).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from agent import __version__
from agent.report.promserve import Endpoint
from mesh.store import LATEST, LIVE_STATES, Store, StoreError

log = logging.getLogger("swarm_mesh")

PREFIX = "swarm_mesh"
CACHE_S = 10.0
# The reporting API's counters (ReportingService.counters): name, help.
SERVICE_COUNTERS = {
    "batches": ("report_batches", "Report batches stored"),
    "reports": ("reports", "Reports received in stored batches"),
    "duplicates": ("reports_duplicate", "Reports received again (same node and id)"),
    "mismatched": ("reports_claiming_another_node",
                   "Reports whose node_id is not their certificate's node (stored under the certificate's)"),
    "rejected": ("reports_rejected", "Reports kept raw, not understood as their kind"),
    "unknown": ("reports_unknown", "Reports of a kind this version does not know, kept raw"),
    "skipped": ("reports_skipped", "Reports without a usable id, neither kept nor acknowledged"),
    "refused_calls": ("calls_unidentified", "Calls refused: the caller's certificate names no node"),
    "revoked_calls": ("calls_revoked", "Calls refused: the node's certificate is revoked"),
    "store_errors": ("store_errors", "Batches the store failed to take (the node retries)"),
    "proposals": ("proposals", "Proposals received"),
    "proposals_dropped": ("proposals_queue_dropped",
                          "Proposals not queued for the decider (still in the store)"),
    "proposals_deferred": ("proposals_queue_deferred",
                           "Proposals not queued: their node held its share of the queue "
                           "(still in the store, swept)"),
}


# A refusal's reason is a sentence (mesh/policy.py) naming nodes, targets and numbers: as
# a label it would make a series per sentence. The label is its kind, by the sentence's form.
REFUSAL_KINDS = (
    ("rate_limit", "rate limit:%"),
    ("invalid_target", "invalid target:%"),
    ("too_wide", "prefix /%"),
    ("allowlisted", "% overlaps the allowlisted %"),
    ("stale", "stale:%"),
    ("operator_revocation", "revoked by operator %"),
    ("operator_revocation", "overlaps %, revoked by operator %"),
    ("no_provenance", "the proposal names neither%"),
    ("revoked_node", "the certificate of node %"),
    ("allowlisted", "% carries % (6to4): %"),
    ("too_wide", "% carries the IPv4 network % (6to4), wider %"),
    ("nothing_to_revoke", "% has no active block to revoke"),
)
_REFUSAL_KIND = ("CASE " + " ".join("WHEN reason LIKE ? THEN ?" for _ in REFUSAL_KINDS)
                 + " ELSE 'other' END")


class MeshMetrics(Endpoint):
    """The registry and its HTTP server. `counters()` gives the reporting API's counters,
    `decider` and `embedded` (optional) the decision service and the embedded nats-server."""

    def __init__(self, store: Store, counters: Callable[[], dict[str, int]], *,
                 decider: Any = None, embedded: Any = None, stale_s: float = 90.0,
                 clock: Callable[[], float] = time.time):
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(store, counters, decider, embedded, stale_s, clock))


class _Collector:
    def __init__(self, store: Store, counters: Callable[[], dict[str, int]], decider: Any,
                 embedded: Any, stale_s: float, clock: Callable[[], float]):
        self.store, self.counters, self.decider, self.embedded = store, counters, decider, embedded
        self.stale_s, self.clock = stale_s, clock
        self._cache: tuple[float, dict[str, Any] | None] = (float("-inf"), None)
        self._lock = threading.Lock()      # one store read at a time, whoever scrapes

    def collect(self):
        info = GaugeMetricFamily(f"{PREFIX}_build_info", "The running version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        counts = self.counters()
        for key, (name, text) in SERVICE_COUNTERS.items():
            yield CounterMetricFamily(f"{PREFIX}_{name}", text, value=counts.get(key, 0))
        yield from self._decider()
        state = self._state()
        yield GaugeMetricFamily(f"{PREFIX}_store_up", "1 when the last read of the store worked",
                                value=0 if state is None else 1)
        if state is not None:
            yield from _store_families(state)

    def _decider(self):
        d = self.decider
        enabled = GaugeMetricFamily(f"{PREFIX}_decisions_enabled",
                                    "1 when this service decides and publishes (signing: set)",
                                    value=int(d is not None))
        yield enabled
        if d is not None:
            pub = d.publisher
            yield GaugeMetricFamily(f"{PREFIX}_nats_connected",
                                    "1 while the decision service is connected to nats-server",
                                    value=int(bool(getattr(pub, "connected", False))))
            yield CounterMetricFamily(f"{PREFIX}_publish_failures",
                                      "Publishes of decisions that failed (retried)",
                                      value=d.publish_failures)
            yield CounterMetricFamily(f"{PREFIX}_stream_resets",
                                      "Times the decision stream was missing and made again",
                                      value=getattr(pub, "stream_resets", 0))
            yield CounterMetricFamily(f"{PREFIX}_consumers_reaped",
                                      "Node consumers deleted for breaking the consumer rules",
                                      value=getattr(pub, "consumers_reaped", 0))
        if self.embedded is not None:
            yield CounterMetricFamily(f"{PREFIX}_nats_server_restarts",
                                      "Restarts of the embedded nats-server",
                                      value=self.embedded.restarts)

    def _state(self) -> dict[str, Any] | None:
        with self._lock:
            at, state = self._cache
            now = self.clock()
            if state is not None and 0 <= now - at < CACHE_S:
                return state
            try:
                state = read_state(self.store, now, self.stale_s)
            except StoreError as e:
                log.warning("metrics: the store cannot be read", extra={"error": str(e)})
                state = None
            self._cache = (now, state)
            return state


def read_state(store: Store, now: float, stale_s: float) -> dict[str, Any]:
    """The store's figures, in one read transaction."""
    live = ", ".join("?" * len(LIVE_STATES))
    with store.tx(write=False) as cur:
        nodes = cur.one("SELECT COUNT(*) AS n, COALESCE(SUM(CASE WHEN last_seen >= ? THEN 1 "
                        "ELSE 0 END), 0) AS alive FROM nodes", (now - stale_s,))
        incidents = cur.all(f"SELECT event_class, COUNT(*) AS n FROM incidents WHERE state IN "
                            f"({live}) GROUP BY event_class", LIVE_STATES)
        decisions = cur.all("SELECT state, action, COUNT(*) AS n FROM decisions "
                            "GROUP BY state, action")
        pending = cur.one("SELECT MIN(issued_at) AS oldest FROM decisions WHERE state = 'pending'")
        refusals = cur.all(f"SELECT {_REFUSAL_KIND} AS kind, COUNT(*) AS n FROM refusals "
                           "GROUP BY kind", [v for pair in REFUSAL_KINDS for v in pair[::-1]])
        revoked = cur.one("SELECT COUNT(DISTINCT node) AS n FROM node_revocations")
        in_force = cur.one(f"SELECT COUNT(*) AS n FROM decisions d WHERE {LATEST} AND "
                           "d.expires_at > ? AND d.action = 'block'", (now,))
    oldest = pending["oldest"] if pending else None
    return {
        "nodes": {"alive": int(nodes["alive"]), "stale": int(nodes["n"]) - int(nodes["alive"])},
        "incidents": {r["event_class"]: int(r["n"]) for r in incidents},
        "decisions": {(r["state"], r["action"]): int(r["n"]) for r in decisions},
        "in_force": int(in_force["n"]) if in_force else 0,
        "revoked": int(revoked["n"]) if revoked else 0,
        "pending_age": max(0.0, now - float(oldest)) if oldest is not None else 0.0,
        "refusals": {r["kind"]: int(r["n"]) for r in refusals},
    }


def _store_families(s: dict[str, Any]):
    nodes = GaugeMetricFamily(f"{PREFIX}_nodes", "Nodes that ever reported, by status "
                              "(stale: nothing for node_stale_s)", labels=["status"])
    for status, n in s["nodes"].items():
        nodes.add_metric([status], n)
    yield nodes
    yield GaugeMetricFamily(f"{PREFIX}_nodes_revoked", "Node names with a certificate "
                            "revocation (swarm-mesh node-revoke)", value=s["revoked"])
    inc = GaugeMetricFamily(f"{PREFIX}_incidents_live", "Live incidents (open, mitigated, "
                            "escalated) across the fleet, by class", labels=["event_class"])
    for cls, n in sorted(s["incidents"].items()):
        inc.add_metric([cls], n)
    yield inc
    dec = GaugeMetricFamily(f"{PREFIX}_decisions", "Decisions stored, by state and action",
                            labels=["state", "action"])
    for (state, action), n in sorted(s["decisions"].items()):
        dec.add_metric([state, action], n)
    yield dec
    yield GaugeMetricFamily(f"{PREFIX}_blocks_in_force",
                            "Targets whose latest decision is an unexpired block",
                            value=s["in_force"])
    yield GaugeMetricFamily(f"{PREFIX}_oldest_pending_decision_age_seconds",
                            "Age of the oldest decision not yet published (0: none pending)",
                            value=s["pending_age"])
    # A gauge: refusals older than refusals_keep_s are pruned, so the stored count falls.
    ref = GaugeMetricFamily(f"{PREFIX}_refusals_kept", "Refusals of proposals and decisions "
                            "in the store (refusals_keep_s), by the kind of reason "
                            "(`swarm-mesh refusals` has each sentence)",
                              labels=["reason"])
    for reason, n in sorted(s["refusals"].items()):
        ref.add_metric([reason], n)
    yield ref
