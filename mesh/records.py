"""Reports as rows: the pure conversion from mesh_pb2.Report to what the store keeps.

`convert(report)` returns a Row: the report's kind, the id of the thing it describes (ref)
and the column values of its table (node and received_at are added by the store). A body
this version does not know (a newer agent's) is kind "unknown": the store keeps the raw
report so nothing a node sent is silently lost.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from agent.fleet.decision import DecisionError, normalize_target
from agent.proto.swarm.mesh.v1 import mesh_pb2

MAX_ID = 200     # characters of a report id or a record id (agents send 32 hex digits)
# The one rule for what a proposal may carry: its free text (rule, incident_id, operator,
# event_class, evidence) is cut to these many characters when it is stored, so one node
# cannot make its proposal, or a decision it votes for, any bigger; the proposal still
# counts. Its identifiers are not cut, since a cut would change what they name: a
# proposal_id over MAX_ID or a target over TARGET_MAX_CHARS makes the report "rejected"
# (kept raw, with the reason; never a vote), and Store.add_proposal a ValueError.
PROPOSAL_TEXT_MAX_CHARS = {"rule": 128, "incident_id": MAX_ID, "operator": 128,
                           "event_class": 64, "evidence": 4096}
TARGET_MAX_CHARS = 64            # as agent.fleet.decision.normalize_target
DEADLINES = {mesh_pb2.DEADLINE_PENDING: "pending", mesh_pb2.DEADLINE_MET: "met",
             mesh_pb2.DEADLINE_MISSED: "missed"}


@dataclass(frozen=True)
class Row:
    kind: str                 # incident, mitigation, heartbeat, evidence, feedback, proposal, unknown
    ref: str                  # incident_id, mitigation_id, ...; "" for heartbeats
    values: dict[str, Any]    # the columns of the kind's table


def convert(r: mesh_pb2.Report) -> Row:
    kind = r.WhichOneof("body")
    if kind == "incident":
        b = r.incident
        return Row(kind, b.incident_id, {
            "incident_id": b.incident_id, "event_class": b.event_class, "entity": b.entity,
            "severity": b.severity, "state": b.state, "first_seen_at": b.first_seen_at,
            "detected_at": b.detected_at, "mitigated_at": b.mitigated_at,
            "resolved_at": b.resolved_at, "rules": json.dumps(list(b.rules)),
            "findings": b.findings, "summary": b.summary,
            "deadline": DEADLINES.get(b.deadline, "pending"),
            "updated_at": b.updated_at or r.created_at})
    if kind == "mitigation":
        b = r.mitigation
        return Row(kind, b.mitigation_id, {
            "mitigation_id": b.mitigation_id, "kind": b.kind, "target": b.target,
            "state": b.state, "incident_id": b.incident_id, "created_at": b.created_at,
            "expires_at": b.expires_at, "updated_at": b.updated_at or r.created_at,
            "reason": b.reason, "rule": b.rule, "params": _json_text(b.params_json, {})})
    if kind == "evidence":
        b = r.evidence
        return Row(kind, b.evidence_id, {
            "evidence_id": b.evidence_id, "incident_id": b.incident_id,
            "collected_at": b.collected_at, "summary": b.summary,
            "bundle": _json_text(b.bundle_json, {})})
    if kind == "feedback":
        b = r.feedback
        # No updated_at on the wire: the report's queueing time orders the snapshots.
        return Row(kind, b.feedback_id, {
            "feedback_id": b.feedback_id, "rule": b.rule, "rule_version": b.rule_version,
            "scope_kind": b.scope_kind, "scope_value": b.scope_value, "action": b.action,
            "created_at": b.created_at, "expires_at": b.expires_at, "reason": b.reason,
            "given_by": b.by, "incident_id": b.incident_id, "reverted_at": b.reverted_at,
            "reverted_by": b.reverted_by, "updated_at": r.created_at})
    if kind == "proposal":
        b = r.proposal
        return Row(kind, b.proposal_id, {
            "proposal_id": b.proposal_id, "target": b.target, "rule": b.rule,
            "rule_version": b.rule_version, "incident_id": b.incident_id,
            "operator": b.operator, "evidence": b.evidence, "created_at": b.created_at,
            "ttl_s": b.ttl_s, "event_class": b.event_class})
    if kind == "heartbeat":
        b = r.heartbeat
        return Row(kind, "", {
            "hb_at": r.created_at, "hb_seq": b.seq, "version": b.version,
            "started_at": b.started_at, "ready": int(b.ready), "dry_run": int(b.dry_run),
            "probes": json.dumps(dict(b.probes), sort_keys=True),
            "active_mitigations": b.active_mitigations, "live_incidents": b.live_incidents,
            "ringbuf_losses": _int64(b.ringbuf_losses), "outbox_depth": b.outbox_depth,
            "outbox_dropped": _int64(b.outbox_dropped), "ruleset_version": b.ruleset_version,
            "rules": json.dumps(list(b.rules)), "fleet_seq": _int64(b.fleet_seq),
            "fleet_active": b.fleet_active, "fleet_refused": _int64(b.fleet_refused)})
    return Row("unknown", "", {})


def problem(r: mesh_pb2.Report) -> str | None:
    """Why a report cannot be stored as what it says it is. The store keeps such a report
    raw as kind "rejected" (and acknowledges it: sending it again would not help); only a
    report without a usable id cannot even be acknowledged (see usable_id)."""
    kind = r.WhichOneof("body")
    if kind in ("incident", "mitigation", "evidence", "feedback", "proposal"):
        ref = convert(r).ref
        if not ref:
            return f"a {kind} report without its {kind} id"
        if len(ref) > MAX_ID:
            return f"a {kind} id longer than {MAX_ID} characters"
    if kind == "proposal" and not r.proposal.target:
        return "a proposal without a target"
    if kind == "proposal":
        return proposal_problem(convert(r).values)
    return None


def proposal_problem(p: dict[str, Any]) -> str | None:
    """Why proposal `p` (its column values) is not kept: an identifier over its limit."""
    for key, limit in (("proposal_id", MAX_ID), ("target", TARGET_MAX_CHARS)):
        value = p.get(key)
        if isinstance(value, str) and len(value) > limit:
            return f"a proposal {key} longer than {limit} characters"
    return None


def bounded_proposal(p: dict[str, Any]) -> dict[str, Any]:
    """`p` with its free text cut to PROPOSAL_TEXT_MAX_CHARS and its target in normal form
    ("203.0.113.7" -> "203.0.113.7/32": one target is one string, or the votes of nodes
    spelling it differently would never meet); a target that is no address or network is
    kept as sent (the policy refuses it)."""
    out = {k: v[:PROPOSAL_TEXT_MAX_CHARS[k]]
           if k in PROPOSAL_TEXT_MAX_CHARS and isinstance(v, str) else v for k, v in p.items()}
    try:
        out["target"] = normalize_target(out["target"])
    except (KeyError, DecisionError):
        pass
    return out


def usable_id(r: mesh_pb2.Report) -> bool:
    return 0 < len(r.id) <= MAX_ID


def _json_text(text: str, empty: Any) -> str:
    """The JSON text a node sent, or a JSON string holding it when it is not JSON."""
    if not text:
        return json.dumps(empty)
    try:
        json.loads(text)
    except ValueError:
        return json.dumps({"unparsed": text})
    return text


def _int64(n: int) -> int:
    """uint64 counters in a signed 64-bit column (both backends)."""
    return min(n, (1 << 63) - 1)
