"""The feedback calls (false-positive verdicts with ResolveIncident, ListFeedback,
RevertFeedback): request checks and error mapping around agent.respond.feedbackbook, so
service.py stays a list of calls. A refused scope, lifetime or id is one sentence and
changes nothing: the records are planned (and checked) before the incident is touched."""
from __future__ import annotations

import math
from typing import Any

import grpc

from agent.control import convert
from agent.control.errors import CallError
from agent.model import Feedback
from agent.proto.swarm.control.v1 import control_pb2 as pb

Code = grpc.StatusCode
MAX_SCOPE = 512


def plan(agent: Any, request: pb.ResolveIncidentRequest, incident_id: str, by: str,
         comment: str) -> list[Feedback]:
    """The records a false-positive verdict makes ([] with no_feedback); CallError if the
    request's scope or lifetime is refused."""
    if not request.false_positive:
        if request.scope or request.learn or request.HasField("ttl_s") or request.force:
            raise CallError(Code.INVALID_ARGUMENT, "scope, learn, ttl_s and force go with "
                            "false_positive: a resolved incident changes no detection")
        return []
    if request.no_feedback:
        if request.scope or request.learn or request.HasField("ttl_s"):
            raise CallError(Code.INVALID_ARGUMENT,
                            "no_feedback makes no record: drop scope, learn and ttl_s")
        return []
    if agent.feedback is None:
        # Not reachable in the agent (the control server starts after prepare() made the
        # book); an agent assembled without one (tests' harnesses) records the verdict only.
        if request.scope or request.learn or request.HasField("ttl_s"):
            raise CallError(Code.FAILED_PRECONDITION, "this agent keeps no feedback")
        return []
    if not comment:
        raise CallError(Code.INVALID_ARGUMENT, "a false positive that changes detection needs "
                        "a comment (why it was benign: the reviewers' record); or give "
                        "no_feedback")
    if len(request.scope) > MAX_SCOPE:
        raise CallError(Code.INVALID_ARGUMENT, f"scope is at most {MAX_SCOPE} characters")
    ttl_s = request.ttl_s if request.HasField("ttl_s") else None
    if ttl_s is not None and not math.isfinite(ttl_s):
        raise CallError(Code.INVALID_ARGUMENT, "ttl_s must be a finite number of seconds")
    try:
        return agent.feedback.plan(incident_id, scope=request.scope or None,
                                   learn=request.learn, ttl_s=ttl_s, force=request.force,
                                   by=by, reason=comment)
    except ValueError as e:
        raise CallError(Code.INVALID_ARGUMENT, f"no feedback recorded: {e}") from None


def listing(agent: Any, request: pb.ListFeedbackRequest, limit: int,
            now: float) -> pb.ListFeedbackResponse:
    if len(request.incident_id) > 64:
        raise CallError(Code.INVALID_ARGUMENT, "an incident id is at most 64 characters")
    found = agent.feedback.records(include_all=request.all, limit=limit,
                                   incident_id=request.incident_id or None)
    return pb.ListFeedbackResponse(records=[convert.feedback(r, now) for r in found])


def revert(agent: Any, request: pb.RevertFeedbackRequest, by: str, comment: str,
           now: float) -> tuple[pb.FeedbackRecord, str]:
    if not request.id or len(request.id) > 64:
        raise CallError(Code.INVALID_ARGUMENT, "a feedback id (at most 64 characters) is "
                        "required")
    try:
        done = agent.feedback.revert(request.id, by, comment)
    except KeyError:
        raise CallError(Code.NOT_FOUND, f"no feedback with id {request.id!r}") from None
    except ValueError as e:
        raise CallError(Code.FAILED_PRECONDITION, str(e)) from None
    return (convert.feedback(done, now),
            f"reverted feedback {done.id}: {done.rule} on {done.scope_kind} "
            f"{done.scope_value}")
