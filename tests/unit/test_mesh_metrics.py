"""The mesh service's Prometheus endpoint (mesh/metrics.py) over real stores (SQLite and
PostgreSQL), scraped over HTTP and parsed with prometheus_client's own parser."""
from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from mesh import metrics as mm
from mesh.store import Store
from tests.unit.test_mesh_store import decision, heartbeat, incident, store, store_url  # noqa: F401
from tests.pgcluster import pg_cluster, pg_url  # noqa: F401  (fixtures)

NOW = 1_800_000_000.0


def scrape(m: mm.MeshMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    host, port = m.address
    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def fill(store: Store) -> None:
    store.record_reports("n1", "acme", [heartbeat("h1", NOW - 5, node_id="n1"),
                                        incident("i1", "inc-1", cls="system_attack"),
                                        incident("i2", "inc-2", cls="security_breach"),
                                        incident("i3", "inc-3", state="resolved")], NOW - 5)
    store.record_reports("n2", "beta", [heartbeat("h2", NOW - 500, node_id="n2")], NOW - 500)
    store.add_decision(decision("d1", "203.0.113.7/32", NOW - 100, NOW + 500), b"e1")
    store.mark_published("d1", 1, at=NOW - 99)
    store.add_decision(decision("d2", "203.0.113.8/32", NOW - 30, NOW + 500), b"e2")  # pending
    store.add_decision(decision("d3", "203.0.113.9/32", NOW - 900, NOW - 10), b"e3")  # expired
    store.mark_published("d3", 2, at=NOW - 899)
    for reason in ("rate limit: 61 proposals from n9 in 60 s (limit 60)",
                   "rate limit: 62 proposals from n9 in 60 s (limit 60)",
                   "prefix /1 is wider than the limit of /24",
                   "100.64.0.1/32 overlaps the allowlisted CGNAT range 100.64.0.0/10",
                   "overlaps 203.0.113.0/24, revoked by operator alice until 1800000900",
                   "something nobody foresaw"):
        store.add_refusal({"at": NOW - 1, "node": "n9", "target": "x", "reason": reason,
                           "source": "proposal"})
    store.revoke_node("n2", "stolen", "ana", NOW - 2)
    store.revoke_node("n2", "again", "ana", NOW - 1)        # one node, however often


def test_the_fleet_figures_come_from_the_store_and_the_service(store: Store):
    fill(store)
    clock = [NOW]
    counters = {"reports": 7, "revoked_calls": 2, "proposals": 3}
    m = mm.MeshMetrics(store, lambda: counters, stale_s=90.0, clock=lambda: clock[0])
    m.serve("127.0.0.1:0")
    try:
        got = scrape(m)
        assert got[("swarm_mesh_nodes", (("status", "alive"),))] == 1
        assert got[("swarm_mesh_nodes", (("status", "stale"),))] == 1
        assert got[("swarm_mesh_incidents_live", (("event_class", "system_attack"),))] == 1
        assert got[("swarm_mesh_incidents_live", (("event_class", "security_breach"),))] == 1
        assert got[("swarm_mesh_decisions", (("action", "block"), ("state", "published")))] == 2
        assert got[("swarm_mesh_decisions", (("action", "block"), ("state", "pending")))] == 1
        assert got[("swarm_mesh_nodes_revoked", ())] == 1
        assert got[("swarm_mesh_blocks_in_force", ())] == 2          # d1, d2; d3 expired
        assert got[("swarm_mesh_oldest_pending_decision_age_seconds", ())] == 30
        refusals = {dict(k[1])["reason"]: v for k, v in got.items()
                    if k[0] == "swarm_mesh_refusals_kept"}
        assert refusals == {"rate_limit": 2, "too_wide": 1, "allowlisted": 1,
                            "operator_revocation": 1, "other": 1}
        assert got[("swarm_mesh_reports_total", ())] == 7
        assert got[("swarm_mesh_calls_revoked_total", ())] == 2
        assert got[("swarm_mesh_store_errors_total", ())] == 0
        assert got[("swarm_mesh_decisions_enabled", ())] == 0
        assert got[("swarm_mesh_store_up", ())] == 1

        store.mark_published("d2", 3, at=NOW)          # within CACHE_S: the cached read
        assert scrape(m)[("swarm_mesh_oldest_pending_decision_age_seconds", ())] == 30
        clock[0] += mm.CACHE_S
        assert scrape(m)[("swarm_mesh_oldest_pending_decision_age_seconds", ())] == 0

        with store.tx() as cur:                        # the store fails: said, not raised
            cur.run("DROP TABLE refusals")
        clock[0] += mm.CACHE_S
        got = scrape(m)
        assert got[("swarm_mesh_store_up", ())] == 0
        assert ("swarm_mesh_nodes", (("status", "alive"),)) not in got
        assert got[("swarm_mesh_reports_total", ())] == 7
    finally:
        m.close()


def test_connections_beyond_the_cap_get_a_503_and_scrapes_go_on_once_the_idle_ones_leave():
    """agent/report/promserve.py: idle connections hold at most MAX_HANDLERS threads; the
    next one (accepted after them, in order) is answered 503 at once; once the idle ones
    close, their threads end and a scrape is served."""
    import socket
    import time
    import urllib.error

    from prometheus_client import CollectorRegistry, Counter

    from agent.report import promserve

    registry = CollectorRegistry()
    Counter("probe", "a sample", registry=registry).inc()
    server = promserve.serve_registry(registry, "127.0.0.1:0")
    host, port = server.server_address[:2]
    try:
        idle = [socket.create_connection((host, port), timeout=5)
                for _ in range(promserve.MAX_HANDLERS)]
        try:
            with socket.create_connection((host, port), timeout=5) as extra:
                assert extra.recv(200).startswith(b"HTTP/1.0 503")
        finally:
            for s in idle:
                s.close()
        deadline = time.monotonic() + 5
        while True:                      # the idle ones' threads see EOF and end
            try:
                text = urllib.request.urlopen(f"http://{host}:{port}/metrics",
                                              timeout=5).read().decode()
                break
            except urllib.error.HTTPError as e:
                assert e.code == 503 and time.monotonic() < deadline
                time.sleep(0.01)
        assert "probe_total 1.0" in text
    finally:
        server.shutdown()
        server.server_close()
