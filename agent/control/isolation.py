"""The Isolate and Release calls: request checks and error mapping around
agent.respond.isolation (the responder's path), so service.py stays a list of calls.

Statuses: INVALID_ARGUMENT for a malformed scope or target, NOT_FOUND for a cgroup,
interface, peer key or mitigation that does not exist, FAILED_PRECONDITION for a refusal
(no allowlist and not forced, the agent's own cgroup, not a WireGuard interface, an
allowlisted peer, not an isolation). Every one of them leaves everything as it was.
"""
from __future__ import annotations

from typing import Any

import grpc

from agent.control.auth import Caller
from agent.control.errors import CallError
from agent.enforce.base import AllowlistedError, EnforceError
from agent.enforce.cgroup import CgroupError, normalise
from agent.enforce.composite import InvalidTarget, TargetNotFound
from agent.enforce.isolate import IsolationRefused
from agent.enforce.wgapi import WireGuardError
from agent.enforce.wireguard import parse_target
from agent.model import Mitigation, MitigationKind, MitigationState
from agent.proto.swarm.control.v1 import control_pb2 as pb
from agent.respond import isolation, policy

Code = grpc.StatusCode
SCOPES = {pb.NODE: MitigationKind.ISOLATE_NODE, pb.SERVICE: MitigationKind.ISOLATE_SERVICE,
          pb.PEER: MitigationKind.REMOVE_PEER}
MAX_TARGET = 512
IN_FORCE = (MitigationState.ACTIVE, MitigationState.DRY_RUN)


def isolate(agent: Any, request: pb.IsolateRequest, caller: Caller, ttl_s: float | None,
            reason: str) -> Mitigation:
    kind = SCOPES.get(request.scope)
    if kind is None:
        raise CallError(Code.INVALID_ARGUMENT, "give what to isolate: node, service or peer")
    target = _target_text(request.target)
    if kind is MitigationKind.ISOLATE_NODE:
        if target not in ("", "node"):
            raise CallError(Code.INVALID_ARGUMENT, "node isolation takes no target")
        target = "node"
    elif not target:
        need = "a cgroup path" if kind is MitigationKind.ISOLATE_SERVICE else "IFNAME:PUBLIC_KEY"
        raise CallError(Code.INVALID_ARGUMENT, f"{kind.value} needs {need}")
    try:
        return isolation.isolate(agent.responder, kind, target, ttl_s,
                                 reason or f"manual, by {caller.identity}",
                                 force=request.force, by=caller.identity)
    except (ValueError, InvalidTarget) as e:
        raise CallError(Code.INVALID_ARGUMENT, str(e)) from None
    except TargetNotFound as e:
        raise CallError(Code.NOT_FOUND, str(e)) from None
    except (CgroupError, WireGuardError, IsolationRefused, AllowlistedError) as e:
        raise CallError(Code.FAILED_PRECONDITION, str(e)) from None
    except EnforceError as e:     # the host failed after the checks passed
        raise CallError(Code.INTERNAL, f"the host refused {kind.value} {target}: {e}") from None


def release(agent: Any, request: pb.ReleaseRequest, now: float) -> list[Mitigation]:
    store = agent.store
    if request.id:
        m = store.mitigation(request.id)
        if m is None:
            raise CallError(Code.NOT_FOUND, f"no mitigation with id {request.id!r}")
        if m.kind not in policy.ISOLATION_KINDS:
            raise CallError(Code.FAILED_PRECONDITION, f"mitigation {m.id} is a {m.kind.value}, "
                            "not an isolation: use unblock")
        if m.state not in IN_FORCE:
            raise CallError(Code.FAILED_PRECONDITION,
                            f"mitigation {m.id} is not in force (it is {m.state.value})")
        todo = [m]
    elif request.target.strip():
        target = _release_target(_target_text(request.target))
        todo = [m for m in store.mitigations(state=IN_FORCE, target=target, live_at=now)
                if m.kind in policy.ISOLATION_KINDS]
        if not todo:
            raise CallError(Code.NOT_FOUND, f"nothing is isolated or quarantined on {target}")
    else:
        raise CallError(Code.INVALID_ARGUMENT, "give a mitigation id or a target "
                        "(node, a cgroup path or IFNAME:KEY)")
    return [agent.responder.lift(m.id) for m in todo]


def _target_text(text: str) -> str:
    if len(text) > MAX_TARGET:
        raise CallError(Code.INVALID_ARGUMENT, f"a target is at most {MAX_TARGET} characters")
    return text.strip()


def _release_target(target: str) -> str:
    """The target as isolations store it: "node", "/a/b", or "IFNAME:KEY"."""
    if target == "node":
        return target
    try:
        if target.startswith("/"):
            return normalise(target)
        ifname, key = parse_target(target)
    except (CgroupError, WireGuardError) as e:
        raise CallError(Code.INVALID_ARGUMENT, str(e)) from None
    return f"{ifname}:{key}"
