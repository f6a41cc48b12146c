"""A block as a fleet proposal (mesh.proto Proposal): what the mesh needs to decide
whether the fleet enforces it, from the mitigation and the finding that asked for it."""
from __future__ import annotations

import ipaddress
import json
import uuid
from typing import Any

from agent.model import Finding, Mitigation

EVIDENCE_MAX = 300      # characters of the one-line evidence summary


def body(m: Mitigation, now: float, finding: Finding | None, operator: str) -> dict[str, Any] | None:
    """The outbox payload of a proposal for block `m`, or None when its target is no
    address or network (nothing the fleet could block)."""
    try:
        target = str(ipaddress.ip_network(m.target, strict=False))
    except ValueError:
        return None
    rule, version = "", 0
    if finding is not None:
        rule, version = finding.rule_id, int(finding.rule_version)
    ttl = m.params.get("ttl_s")
    return {"proposal_id": uuid.uuid4().hex, "target": target, "rule": rule,
            "rule_version": version, "incident_id": m.incident_id or "",
            "operator": "" if finding is not None else operator[:200],
            "evidence": summary(finding) if finding is not None else (m.reason or "manual block")[:EVIDENCE_MAX],
            "created_at": now, "ttl_s": float(ttl) if ttl is not None else 0.0,
            "event_class": finding.event_class.value if finding is not None else ""}


def summary(f: Finding) -> str:
    """One line: the rule and its evidence's scalar fields ("net.scan@1: ports=120 ...")."""
    parts = [f"{k}={v}" for k, v in sorted(f.evidence.items())
             if isinstance(v, (int, float, str, bool)) and len(str(v)) <= 64]
    text = f"{f.rule} on {f.entity}: " + " ".join(parts) if parts else \
        f"{f.rule} on {f.entity}: " + json.dumps(dict(f.evidence), default=str, sort_keys=True)
    return text[:EVIDENCE_MAX]
