"""ListFleet: the fleet decisions in force on this agent and those it refused, from its
database (agent/state/fleet.py) and the subscriber's counters. A viewer's call."""
from __future__ import annotations

from typing import Any

import grpc

from agent.control.errors import CallError
from agent.proto.swarm.control.v1 import control_pb2 as pb
from agent.state import fleet as fleetdb

DEFAULT_LIMIT, MAX_LIMIT = 100, 100_000


def listing(agent: Any, request: pb.ListFleetRequest, now: float) -> pb.ListFleetResponse:
    if request.limit > MAX_LIMIT:
        raise CallError(grpc.StatusCode.INVALID_ARGUMENT,
                        f"limit must be at most {MAX_LIMIT}, got {request.limit}")
    limit = request.limit or DEFAULT_LIMIT
    st = agent.fleet_status()
    out = pb.ListFleetResponse(enabled=bool(st.get("enabled")))
    if not out.enabled:
        return out
    out.connected = bool(st.get("connected"))
    out.seq, out.lag = int(st.get("seq") or 0), int(st.get("lag") or 0)
    out.last_error = str(st.get("last_error") or "")
    for reason, n in (st.get("refused") or {}).items():
        out.refused_by_reason[str(reason)] = int(n)
    total, entries = fleetdb.in_force(agent.store, now, 0 if request.refused else limit)
    out.in_force = total
    if request.refused:
        for r in fleetdb.refusals(agent.store, limit):
            out.refusals.add(at=r["at"], seq=int(r["seq"] or 0), subject=r["subject"] or "",
                             target=r["target"] or "", reason=r["reason"] or "",
                             detail=r["detail"] or "")
        return out
    for e in entries:
        out.decisions.add(target=e.target, decision_id=e.id, action=e.action,
                          issued_at=e.issued_at, expires_at=e.expires_at, seq=int(e.seq),
                          applied_at=e.applied_at, reason=e.reason or "",
                          provenance_json=e.provenance or "{}")
    return out
