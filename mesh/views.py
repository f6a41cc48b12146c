"""The fleet view for people: pure functions from store rows to table lines.

Every free-text field goes through agent.cli.text.clean, so nothing a node or a
certificate put in a field can move the terminal's cursor or hide a line; --json output
is json.dumps and needs no cleaning.
"""
from __future__ import annotations

from typing import Any, Sequence

from agent.cli.text import clean


def node_status(node: dict[str, Any], now: float, stale_s: float) -> str:
    """"revoked" when its latest revocation covers the newest certificate it reported
    with, else "alive" when the node reported within stale_s, else "stale"."""
    if node.get("revoked"):
        return "revoked"
    return "alive" if now - float(node["last_seen"]) <= stale_s else "stale"


def with_status(nodes: list[dict[str, Any]], now: float, stale_s: float) -> list[dict[str, Any]]:
    return [{**n, "status": node_status(n, now, stale_s),
             "age_s": round(max(0.0, now - float(n["last_seen"])), 3)} for n in nodes]


def ago(t: float, now: float) -> str:
    """"12s ago", "5m ago", "3h ago", "2d ago"; "-" for 0 (never)."""
    if not t:
        return "-"
    s = max(0.0, now - t)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{int(s // size)}{unit} ago"
    return f"{int(s)}s ago"


def by_class(counts: dict[str, int]) -> str:
    return " ".join(f"{clean(k)}={v}" for k, v in sorted(counts.items())) or "-"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Left-aligned columns, two spaces apart; every cell cleaned."""
    cells = [[clean(str(c)) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return out


def nodes_lines(nodes: list[dict[str, Any]], now: float) -> list[str]:
    rows = [(n["node"], n["provider"] or "-", n["status"], ago(n["last_seen"], now),
             n["version"] or "-", n["ruleset_version"] or "-", n["fleet_seq"],
             "yes" if n["ready"] else "no", by_class(n["open_incidents"]))
            for n in nodes]
    alive = sum(1 for n in nodes if n["status"] == "alive")
    revoked = sum(1 for n in nodes if n["status"] == "revoked")
    return table(("NODE", "PROVIDER", "STATUS", "LAST SEEN", "VERSION", "RULES", "FLEET SEQ",
                  "READY", "OPEN INCIDENTS"), rows) + [
        f"{len(nodes)} nodes: {alive} alive, {len(nodes) - alive - revoked} stale"
        + (f", {revoked} revoked (swarm-mesh node-revocations)" if revoked else "")]


def incidents_lines(incidents: list[dict[str, Any]], now: float) -> list[str]:
    rows = [(i["node"], i["event_class"], i["state"], i["severity"], i["entity"],
             ago(i["updated_at"], now), i["incident_id"][:12], i["summary"])
            for i in incidents]
    counts: dict[str, int] = {}
    for i in incidents:
        counts[i["event_class"]] = counts.get(i["event_class"], 0) + 1
    return table(("NODE", "CLASS", "STATE", "SEVERITY", "ENTITY", "UPDATED", "ID", "SUMMARY"),
                 rows) + [f"{len(incidents)} incidents by class: {by_class(counts)}"]


def proposals_lines(proposals: list[dict[str, Any]], now: float) -> list[str]:
    rows = [(p["node"], p["provider"] or "-", p["target"],
             p["operator"] and f"operator {p['operator']}" or
             f"{p['rule']}@{p['rule_version']}", ago(p["received_at"], now), p["evidence"])
            for p in proposals]
    return table(("NODE", "PROVIDER", "TARGET", "BY", "RECEIVED", "EVIDENCE"), rows) + [
        f"{len(proposals)} proposals"]


def decisions_lines(decisions: list[dict[str, Any]], now: float) -> list[str]:
    rows = []
    for d in decisions:
        left = float(d["expires_at"]) - now
        rows.append((d["id"][:12], d["action"], d["target"], d["state"], d["seq"] or "-",
                     ago(d["issued_at"], now),
                     f"in {int(left)}s" if left > 0 else "expired",
                     (d.get("scope") or {}).get("stage", "-"), d.get("reason", "")))
    return table(("ID", "ACTION", "TARGET", "STATE", "SEQ", "ISSUED", "EXPIRES", "SCOPE",
                  "REASON"), rows) + [f"{len(decisions)} decisions"]


def refusals_lines(refusals: list[dict[str, Any]], now: float) -> list[str]:
    rows = [(ago(r["at"], now), r["node"] or "-", r["provider"] or "-", r["target"] or "-",
             r["source"] or "-", r["reason"]) for r in refusals]
    return table(("WHEN", "NODE", "PROVIDER", "TARGET", "SOURCE", "REASON"), rows) + [
        f"{len(refusals)} refusals"]


def revocations_lines(revocations: list[dict[str, Any]], now: float) -> list[str]:
    def now_state(current: bool | None) -> str:
        return {None: "never reported", True: "refused", False: "re-enrolled since"}[current]
    rows = [(r["node"], ago(r["revoked_at"], now), r["operator"] or "-", now_state(r["current"]),
             r["reason"]) for r in revocations]
    return table(("NODE", "REVOKED", "BY", "NOW", "REASON"), rows) + [
        f"{len(revocations)} revocations (each refuses the node's certificates issued "
        "until then)"]
