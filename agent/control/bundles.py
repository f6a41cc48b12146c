"""The bundle calls (ApplyBundle, ListBundles, RollbackBundle): request checks and error
mapping around agent.bundles, so service.py stays a list of calls. A malformed request
(names, a part without a validator, a part its validator refuses) is INVALID_ARGUMENT;
an oversized one (over 1 MiB, over 64 files) RESOURCE_EXHAUSTED; a rule set that does not
load with the bundle, or nothing to roll back, FAILED_PRECONDITION. Nothing changed on
any error.
The audit log records the bundle's names, sizes and digest, never its content."""
from __future__ import annotations

import hashlib
from typing import Any, Mapping

import grpc

from agent.bundles import MAX_BYTES, BundleConflict, BundleError, BundleTooLarge
from agent.control.auth import Caller
from agent.control.errors import CallError
from agent.proto.swarm.control.v1 import control_pb2 as pb

Code = grpc.StatusCode


def info(meta: Mapping[str, Any]) -> pb.BundleInfo:
    return pb.BundleInfo(number=int(meta.get("number") or 0), version=meta.get("version", ""),
                         label=meta.get("label", ""), applied_at=meta.get("applied_at", 0.0),
                         by=meta.get("by", ""), comment=meta.get("comment", ""),
                         previous=int(meta.get("previous") or 0),
                         files=list(meta.get("files") or []), parts=list(meta.get("parts") or []),
                         in_force=bool(meta.get("in_force")), problem=meta.get("problem", ""))


def _files(what: str, files) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for f in files:
        if f.name in out:
            raise CallError(Code.INVALID_ARGUMENT, f"{what} {f.name!r} given twice")
        out[f.name] = f.content
    return out


async def apply(agent: Any, request: pb.ApplyBundleRequest, caller: Caller,
                comment: str) -> tuple[pb.ApplyBundleResponse, str]:
    if request.ByteSize() > MAX_BYTES + 64 * 1024:
        raise CallError(Code.RESOURCE_EXHAUSTED, f"the bundle request is {request.ByteSize()} "
                        f"bytes; a bundle is at most {MAX_BYTES} (1 MiB)")
    rules, parts = _files("rule file", request.rules), _files("config part", request.parts)
    try:
        meta = await agent.apply_bundle(rules, parts, request.label, comment, caller.identity)
    except BundleConflict as e:
        raise CallError(Code.FAILED_PRECONDITION, str(e)) from None
    except BundleTooLarge as e:
        raise CallError(Code.RESOURCE_EXHAUSTED, str(e)) from None
    except BundleError as e:
        raise CallError(Code.INVALID_ARGUMENT, str(e)) from None
    rs = agent.rulebook.ruleset
    return (pb.ApplyBundleResponse(bundle=info({**meta, "in_force": True}),
                                   ruleset_version=rs.version, rules=rs.names),
            f"bundle {meta['number']} {meta['version']}"
            + (f" ({meta['label']})" if meta.get("label") else "")
            + f" in force: {len(rs.rules)} rules, {rs.version}")


def listing(agent: Any) -> pb.ListBundlesResponse:
    return pb.ListBundlesResponse(bundles=[info(m) for m in agent.bundles.listing()],
                                  in_force=agent.bundles.in_force,
                                  problem=agent.bundles.problem)


async def rollback(agent: Any) -> tuple[pb.RollbackBundleResponse, str]:
    try:
        was, now = await agent.rollback_bundle()
    except BundleError as e:
        raise CallError(Code.FAILED_PRECONDITION, str(e)) from None
    rs = agent.rulebook.ruleset
    return (pb.RollbackBundleResponse(rolled_back=was, in_force=now, ruleset_version=rs.version),
            f"bundle {was} rolled back; in force now: "
            + (f"bundle {now}" if now else "no bundle") + f", {rs.version}")


def audit_args(request: pb.ApplyBundleRequest) -> dict[str, Any]:
    """What the audit log keeps of an ApplyBundle: names, sizes and digests, no content."""
    def files(fs) -> list[dict[str, Any]]:
        return [{"name": f.name, "bytes": len(f.content),
                 "sha256": hashlib.sha256(f.content).hexdigest()[:16]} for f in fs]
    return {"rules": files(request.rules), "parts": files(request.parts),
            "label": request.label, "comment": request.comment}
