"""Figures of bench/fleet_scale.py: percentiles, resource deltas between two snapshots, and
the human summary it prints without --json."""
from __future__ import annotations

import math
from typing import Any


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    v = sorted(values)
    return v[max(0, math.ceil(q * len(v)) - 1)]


def summary(seconds: list[float]) -> dict[str, Any]:
    if not seconds:
        return {"n": 0}
    return {"n": len(seconds), "p50_ms": round(pct(seconds, 0.5) * 1000, 1),
            "p99_ms": round(pct(seconds, 0.99) * 1000, 1),
            "max_ms": round(max(seconds) * 1000, 1)}


def delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """CPU seconds spent between snapshots a and b (Bench.usage) by nats-server, the mesh
    service, all simulated nodes together and all real agents together, and nats-server's
    traffic per second (messages, bytes, JetStream API requests) over that time."""
    wall = max(1e-9, b["at"] - a["at"])

    def cpu(x: str) -> float:
        return round(b[x]["cpu_s"] - a[x]["cpu_s"], 2)

    na, nb = a["nats_counters"], b["nats_counters"]
    return {"wall_s": round(wall, 1),
            "cpu_s": {"nats": cpu("nats"), "mesh": cpu("mesh"), "sims": cpu("sims"),
                      "agents": round(sum(y["cpu_s"] for y in b["agents"])
                                      - sum(y["cpu_s"] for y in a["agents"]), 2)},
            "nats_per_s": {k: round((nb[k] - na[k]) / wall, 1) for k in
                           ("in_msgs", "out_msgs", "in_bytes", "out_bytes", "api_requests")}}


def _p(s: dict[str, Any]) -> str:
    if not s.get("n"):
        return "-"
    return f"{s['p50_ms']:.0f} / {s['p99_ms']:.0f} / {s['max_ms']:.0f} ms"


def human(o: dict[str, Any]) -> str:
    c, i, q = o["connect"], o["idle"], o["sequence"]
    n = c["subscribers"]
    before, conn = c["before"], c["connected"]
    lines = [
        f"fleet at scale: {n} simulated nodes, {len(conn['agents'])} real agents, "
        f"{o['machine']['cores']} cores, run {o['run_s']} s",
        f"connect: all {n} following in {c['seconds']} s ({'ok' if c['all_connected'] else 'NOT ALL'})",
        f"nats-server RSS {before['nats']['rss_mib']} -> {conn['nats']['rss_mib']} MiB "
        f"({conn['nats_counters']['connections']} connections, "
        f"{conn['nats_counters']['consumers']} consumers); mesh RSS {conn['mesh']['rss_mib']} MiB",
        f"idle {i['wall_s']} s: CPU nats {i['cpu_s']['nats']} s, mesh {i['cpu_s']['mesh']} s, "
        f"sims {i['cpu_s']['sims']} s; nats {i['nats_per_s']['out_msgs']:.0f} msgs/s out, "
        f"{i['nats_per_s']['api_requests']:.0f} API requests/s",
        f"{q['decisions']} decisions (proposal completing corroboration -> ...), p50 / p99 / max:",
        f"  on the stream            {_p(q['on_stream'])}",
        f"  sims received            {_p(q['sims_received'])}",
        f"  sims in force            {_p(q['sims_in_force'])}",
        f"  last sim in force        {_p(q['last_sim_in_force'])}",
        f"  real agents in nftables  {_p(q.get('agents_in_force', {}))}",
        f"  during: CPU nats {q['cpu_s']['nats']} s, mesh {q['cpu_s']['mesh']} s, "
        f"sims {q['cpu_s']['sims']} s over {q['wall_s']} s",
    ]
    p = o.get("partition")
    if p:
        lines.append(f"partition of {p['group']} for {p['seconds']} s, {p['decisions']} decisions: "
                     f"caught up after heal {_p(p['caught_up_after_heal'])} "
                     f"(reconnected {_p(p['reconnected_after_heal'])}), "
                     f"all: {'yes' if p['all_caught_up'] else 'NO'}")
    s = o["storm"]
    lines += [f"reconnect storm: nats-server restarted in {s['restart_s']} s; all {n} nodes and "
              f"agents following {s['all_following_after_ready_s']} s after it was ready (sims "
              f"reconnected {_p(s['sims_reconnected_after_ready'])}); server CPU until then "
              f"{s['nats_until_all_back']['cpu_s']} s",
              f"  decision after it: last sim {_p(s['decision_after']['last_sim_in_force'])}, "
              f"agents {_p(s['decision_after'].get('agents_in_force', {}))}",
              f"proposal -> decided (mesh's issued_at): {_p(o['proposal_to_decided'])}",
              f"end: nats RSS {o['end']['nats']['rss_mib']} MiB, mesh RSS "
              f"{o['end']['mesh']['rss_mib']} MiB, sims RSS {o['end']['sims']['rss_mib']} MiB"]
    return "\n".join(lines)
