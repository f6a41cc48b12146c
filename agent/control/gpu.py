"""The GPU authorization calls (AuthorizeGpu, RevokeGpu, ListGpuAuthorizations): request
checks and error mapping around agent.gpuguard, so service.py stays a list of calls.
Bad input is INVALID_ARGUMENT with one sentence (nothing stored); revoking a grant the
store does not hold is NOT_FOUND."""
from __future__ import annotations

from typing import Any

import grpc

from agent.control.auth import Caller
from agent.control.errors import CallError
from agent.gpugrant import GrantError
from agent.proto.swarm.control.v1 import control_pb2 as pb

Code = grpc.StatusCode


def listing(agent: Any) -> list[pb.GpuAuthorization]:
    return [pb.GpuAuthorization(**g) for g in agent.gpu_guard.listing()]


def authorize(agent: Any, request: pb.AuthorizeGpuRequest, caller: Caller,
              now: float) -> tuple[pb.GpuAuthorizations, str]:
    try:
        workload, gpus = agent.gpu_guard.authorize(request.workload, list(request.gpus),
                                                   request.job, caller.identity, now)
    except GrantError as e:
        raise CallError(Code.INVALID_ARGUMENT, str(e)) from None
    return (pb.GpuAuthorizations(authorizations=listing(agent)),
            f"authorized {workload} on GPU {', '.join(gpus)}"
            + (f" (job {request.job})" if request.job else ""))


def revoke(agent: Any, request: pb.RevokeGpuRequest) -> tuple[pb.RevokeGpuResponse, str]:
    try:
        removed, rechecked = agent.gpu_guard.revoke(request.workload, list(request.gpus),
                                                    agent.gpu)
    except GrantError as e:
        raise CallError(Code.INVALID_ARGUMENT, str(e)) from None
    except LookupError as e:
        raise CallError(Code.NOT_FOUND, str(e)) from None
    return (pb.RevokeGpuResponse(revoked=removed, rechecked=rechecked,
                                 authorizations=listing(agent)),
            f"revoked {removed} grant(s) of {request.workload}; {rechecked} process(es) on "
            "the GPUs judged again")
