"""Model objects -> control API messages (agent.proto.swarm.control.v1). Pure functions."""
from __future__ import annotations

import json
from typing import Any, Mapping

from agent.model import EventClass, Incident, IncidentState, Mitigation
from agent.proto.swarm.control.v1 import control_pb2 as pb
from agent.state.store import IncidentEvent

ACK_EVENT = "acknowledged"


def incident(i: Incident, timeline: list[IncidentEvent] | None = None) -> pb.Incident:
    """An incident; with its timeline, also who acknowledged it last."""
    msg = pb.Incident(id=i.id, event_class=i.event_class.value, entity=i.entity,
                      severity=i.severity.value, state=i.state.value,
                      first_seen_at=i.first_seen_at, detected_at=i.detected_at,
                      mitigated_at=i.mitigated_at or 0.0, resolved_at=i.resolved_at or 0.0,
                      rules=i.rules, findings=i.findings, summary=i.summary)
    for ev in reversed(timeline or []):
        if ev.kind == ACK_EVENT:
            msg.acknowledged_by = str(ev.data.get("by", ""))
            msg.acknowledged_at = ev.at
            break
    return msg


def mitigation(m: Mitigation) -> pb.Mitigation:
    return pb.Mitigation(id=m.id, kind=m.kind.value, target=m.target, state=m.state.value,
                         created_at=m.created_at, expires_at=m.expires_at or 0.0,
                         incident_id=m.incident_id or "", reason=m.reason,
                         params_json=json.dumps(m.params, sort_keys=True, default=str))


def timeline_entry(ev: IncidentEvent) -> pb.TimelineEntry:
    return pb.TimelineEntry(at=ev.at, kind=ev.kind, text=ev.text,
                            data_json=json.dumps(ev.data, sort_keys=True, default=str))


def class_stats(counts: Mapping[str, Mapping[str, int]]) -> list[pb.ClassStats]:
    """One entry per event class, zeros included, so a reader sees every deadline."""
    out = []
    for cls in EventClass:
        c = counts.get(cls.value, {})
        out.append(pb.ClassStats(
            event_class=cls.value, total=c.get("total", 0), deadline_s=cls.deadline_s,
            deadline_met=c.get("deadline_met", 0), deadline_missed=c.get("deadline_missed", 0),
            **{s.value: c.get(s.value, 0) for s in IncidentState}))
    return out


def status(st: Mapping[str, Any], counts: Mapping[str, Mapping[str, int]], active: int,
           now: float) -> pb.Status:
    """From the agent's status() dict and the store's counts."""
    probes = [pb.Probe(name=name, state=p.get("state", ""), reason=p.get("reason", ""))
              for name, p in sorted((st.get("probes") or {}).items())]
    return pb.Status(version=st.get("version", ""), host=st.get("host", ""),
                     pid=st.get("pid", 0), started_at=st.get("started_at", 0.0),
                     uptime_s=max(0.0, now - st.get("started_at", now)),
                     ready=bool(st.get("ready")), dry_run=bool(st.get("dry_run")),
                     probes=probes, ringbuf_losses=int(st.get("ringbuf_losses") or 0),
                     counters={k: int(v) for k, v in (st.get("counters") or {}).items()},
                     classes=class_stats(counts), active_mitigations=active,
                     rules=list(st.get("rules") or []),
                     last_drift_at=st.get("last_drift_at") or 0.0,
                     ruleset=ruleset(st.get("ruleset") or {}))


def ruleset(rs: Mapping[str, Any]) -> pb.RuleSetInfo:
    """From agent.rulereload.RuleReloader.status()."""
    return pb.RuleSetInfo(version=rs.get("version", ""), loaded_at=rs.get("loaded_at", 0.0),
                          files=list(rs.get("files") or []), reloads=rs.get("reloads", 0),
                          reload_failures=rs.get("reload_failures", 0),
                          last_error=rs.get("last_error", ""),
                          last_error_at=rs.get("last_error_at", 0.0),
                          bundle=_bundle(rs.get("bundle") or {}),
                          bundle_problem=(rs.get("bundle") or {}).get("problem", ""))


def _bundle(b: Mapping[str, Any]) -> pb.BundleInfo | None:
    """The bundle in force, from agent.bundles.BundleManager.status() (None: no bundle)."""
    if not b.get("number"):
        return None
    return pb.BundleInfo(number=b["number"], version=b.get("version", ""),
                         label=b.get("label", ""), applied_at=b.get("applied_at", 0.0),
                         by=b.get("by", ""), in_force=True)


def rule_listing(listing: Mapping[str, Any]) -> pb.ListRulesResponse:
    """From the agent's rule_listing()."""
    rules = [pb.RuleInfo(id=r["id"], version=r["version"], event_class=r["class"],
                         severity=r["severity"], action=r["action"], scope=r["scope"],
                         description=r["description"], source=r["source"], hits=r["hits"],
                         last_hit_at=r["last_hit_at"],
                         false_positives=r.get("false_positives", 0),
                         suppressed=r.get("suppressed", 0)) for r in listing["rules"]]
    return pb.ListRulesResponse(ruleset=ruleset(listing["ruleset"]), rules=rules,
                                retired_hits=dict(listing["retired_hits"]))


def audit_entry(e: Mapping[str, Any]) -> pb.AuditEntry:
    return pb.AuditEntry(seq=e["seq"], at=e["at"], identity=e["identity"], role=e["role"],
                         method=e["method"],
                         arguments_json=json.dumps(e["arguments"], sort_keys=True),
                         result=e["result"], detail=e["detail"])


def feedback(r: Any, now: float) -> pb.FeedbackRecord:
    """From an agent.model.Feedback."""
    return pb.FeedbackRecord(id=r.id, rule=r.rule, rule_version=max(0, r.rule_version),
                             scope_kind=r.scope_kind, scope_value=r.scope_value,
                             action=r.action, created_at=r.created_at,
                             expires_at=r.expires_at, reason=r.reason, by=r.by,
                             incident_id=r.incident_id, reverted_at=r.reverted_at or 0.0,
                             reverted_by=r.reverted_by, hits=r.hits, live=r.live(now))
