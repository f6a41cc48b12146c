"""swarm.control.v1.Control: the calls, their validation, authorization and audit.

Every handler runs on the agent's event loop thread (grpc.aio), the thread the detector
runs on, and calls the responder synchronously: host changes stay serialised, and a
manual block takes the same path as an automatic one. A call is checked whole before
anything changes, so an error status means nothing changed. Mutating calls, refused ones
included, are written to the audit table before the answer leaves.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import math
import time
import unicodedata
from typing import Any, Callable

import grpc
from google.protobuf import json_format

from agent.control import convert
from agent.control import bundles, feedback, fleetlist, gpu, isolation
from agent.control.auth import OPERATOR, VIEWER, Authenticator, Caller, denied
from agent.control.errors import CallError
from agent.control.watch import WatchHub
from agent.enforce.base import AllowlistedError, EnforceError
from agent.enforce.ifaddr import AddressReader
from agent.model import EventClass, IncidentState, MitigationKind, MitigationState
from agent.proto.swarm.control.v1 import control_pb2 as pb
from agent.proto.swarm.control.v1 import control_pb2_grpc
from agent.respond import policy

log = logging.getLogger("swarm_agent")
Code = grpc.StatusCode

DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
MAX_TEXT = 1024                  # comment, reason: longer is an oversized request
AUDIT_ARGS_MAX = 16 * 1024       # what the audit log keeps of one request's arguments
_NOT_TEXT = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}   # controls, format, separators
MIN_PREFIX = {4: 8, 6: 16}       # broader targets than these are refused as absurd
KINDS = {pb.MITIGATION_KIND_UNSPECIFIED: MitigationKind.BLOCK_IP,
         pb.BLOCK: MitigationKind.BLOCK_IP, pb.RATE_LIMIT: MitigationKind.RATE_LIMIT,
         pb.REROUTE: MitigationKind.REROUTE}
CLOSED = (IncidentState.RESOLVED, IncidentState.FALSE_POSITIVE)
IN_FORCE = (MitigationState.ACTIVE, MitigationState.DRY_RUN)


def rpc(role: str, mutating: bool) -> Callable:
    """Wrap a handler `fn(self, request, caller) -> (response, detail)`: authorize,
    audit mutating calls (and any refused for the role), turn CallError into a status."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        async def handler(self: ControlService, request, context):
            caller = self.auth.caller(context)
            name = fn.__name__
            if not caller.may(role):
                err = CallError(Code.PERMISSION_DENIED, denied(caller, name, role))
                self.audit_call(caller, name, request, err.code.name, err.message)
                await context.abort(err.code, err.message)
            try:
                answer = fn(self, request, caller)
                # A coroutine handler (a rules reload) runs on the loop too; while it
                # awaits, the detector goes on with the rules in use.
                response, detail = await answer if inspect.isawaitable(answer) else answer
            except CallError as err:
                if mutating:
                    self.audit_call(caller, name, request, err.code.name, err.message)
                await context.abort(err.code, err.message)
            except Exception as e:  # a bug or a host failure: say so, never a traceback
                log.exception("control call failed", extra={"method": name})
                message = f"{name} failed: {e}"
                if mutating:
                    self.audit_call(caller, name, request, Code.INTERNAL.name, message)
                await context.abort(Code.INTERNAL, message)
            if mutating:
                self.audit_call(caller, name, request, "OK", detail)
            return response
        return handler
    return wrap


class ControlService(control_pb2_grpc.ControlServicer):
    """Serves one agent: `agent` has cfg, store, responder, status(), reload_rules() and
    rule_listing();
    `auth` says who each caller is."""

    def __init__(self, agent: Any, hub: WatchHub, auth: Authenticator,
                 clock: Callable[[], float] = time.time):
        self.agent, self.hub, self.auth, self.clock = agent, hub, auth, clock

    @property
    def store(self):
        return self.agent.store

    def audit_call(self, caller: Caller, method: str, request, result: str, detail: str) -> None:
        args = (bundles.audit_args(request) if isinstance(request, pb.ApplyBundleRequest)
                else json_format.MessageToDict(request, preserving_proto_field_name=True))
        size = len(json.dumps(args, sort_keys=True))
        if size > AUDIT_ARGS_MAX:        # an oversized request (refused): its size, not it
            args = {"oversized_request_bytes": request.ByteSize(),
                    "sha256": hashlib.sha256(request.SerializeToString()).hexdigest()[:16]}
        self.store.record_audit(self.clock(), caller.identity, caller.role, method, args,
                                result, detail)

    # -- reading ---------------------------------------------------------------------------

    @rpc(VIEWER, mutating=False)
    def GetStatus(self, request, caller):
        now = self.clock()
        active = len(self.store.active_mitigations(now))
        return convert.status(self.agent.status(), self.store.counts_by_class(), active,
                              now), ""

    @rpc(VIEWER, mutating=False)
    def ListIncidents(self, request, caller):
        states = [_enum(IncidentState, s, "state") for s in request.states] or None
        cls = _enum(EventClass, request.event_class, "event_class") if request.event_class else None
        found = self.store.incidents(state=states, event_class=cls,
                                     entity=request.entity or None,
                                     since=request.since or None, limit=_limit(request.limit))
        return pb.ListIncidentsResponse(incidents=[convert.incident(i) for i in found]), ""

    @rpc(VIEWER, mutating=False)
    def GetIncident(self, request, caller):
        i = self._incident(request.id)
        timeline = self.store.incident_events(i.id)
        return pb.IncidentDetail(
            incident=convert.incident(i, timeline),
            timeline=[convert.timeline_entry(e) for e in timeline],
            mitigations=[convert.mitigation(m)
                         for m in self.store.mitigations(incident_id=i.id)]), ""

    @rpc(VIEWER, mutating=False)
    def ListMitigations(self, request, caller):
        now = self.clock()
        states = [_enum(MitigationState, s, "state") for s in request.states]
        kind = _enum(MitigationKind, request.kind, "kind") if request.kind else None
        target = _target(request.target) if request.target else None
        found = self.store.mitigations(state=states or IN_FORCE, kind=kind, target=target,
                                       incident_id=request.incident_id or None,
                                       live_at=None if states else now)
        found = found[-_limit(request.limit):]   # the newest, oldest first
        return pb.ListMitigationsResponse(mitigations=[convert.mitigation(m) for m in found]), ""

    @rpc(VIEWER, mutating=False)
    def ListAudit(self, request, caller):
        entries = self.store.audit(since=request.since or None,
                                   identity=request.identity or None,
                                   limit=_limit(request.limit))
        return pb.ListAuditResponse(entries=[convert.audit_entry(e) for e in entries]), ""

    async def WatchIncidents(self, request, context):
        caller = self.auth.caller(context)
        if not caller.may(VIEWER):
            await context.abort(Code.PERMISSION_DENIED,
                                denied(caller, "WatchIncidents", VIEWER))
        initial = []
        if request.initial:
            live = self.store.incidents(state=(IncidentState.OPEN, IncidentState.MITIGATED,
                                               IncidentState.ESCALATED), limit=MAX_LIMIT)
            initial = [pb.Change(incident=convert.incident(i)) for i in reversed(live)]
        async for change in self.hub.subscribe(context, initial):
            yield change

    # -- acting ------------------------------------------------------------------------------

    @rpc(OPERATOR, mutating=True)
    def AcknowledgeIncident(self, request, caller):
        comment = _text("comment", request.comment)
        i = self._incident(request.id, open_only=True)
        self.store.add_incident_event(i.id, convert.ACK_EVENT,
                                      f"acknowledged by {caller.identity}" +
                                      (f": {comment}" if comment else ""), self.clock(),
                                      {"by": caller.identity, "comment": comment})
        self.agent.responder.notify("incident", i)
        return convert.incident(i, self.store.incident_events(i.id)), "acknowledged"

    @rpc(OPERATOR, mutating=True)
    def ResolveIncident(self, request, caller):
        comment = _text("comment", request.comment)
        i = self._incident(request.id, open_only=True)
        state = IncidentState.FALSE_POSITIVE if request.false_positive else IncidentState.RESOLVED
        # Checked whole before anything changes: a refused scope leaves the incident open.
        records = feedback.plan(self.agent, request, i.id, caller.identity, comment)
        lifted = []
        if request.false_positive:
            # A false positive's mitigations were wrong: lift them (the usual lift path).
            for m in self.store.mitigations(incident_id=i.id, state=IN_FORCE):
                lifted.append(self.agent.responder.lift(m.id).id)
        note = f"{state.value} by {caller.identity}" + (f": {comment}" if comment else "")
        with self.store.batch():      # the verdict and its feedback records together
            done = self.agent.responder.set_incident_state(i.id, state, note)
            if records:
                self.agent.feedback.commit(records)
        detail = state.value + (f", lifted {', '.join(lifted)}" if lifted else "") + "".join(
            f", feedback {r.id} ({r.action} {r.rule} on {r.scope_kind} {r.scope_value})"
            for r in records)
        return convert.incident(done, self.store.incident_events(i.id)), detail

    @rpc(OPERATOR, mutating=True)
    def ApplyMitigation(self, request, caller):
        kind = KINDS.get(request.kind)
        if kind is None:
            raise CallError(Code.INVALID_ARGUMENT, f"unknown mitigation kind {request.kind}")
        target = _target(request.target, broad_ok=False)
        ttl_s = self._ttl(request)
        reason = _text("reason", request.reason) or f"manual, by {caller.identity}"
        try:
            m = self.agent.responder.apply_manual(kind, target, ttl_s, reason,
                                                  operator=caller.identity)
        except AllowlistedError as e:
            raise CallError(Code.FAILED_PRECONDITION, str(e)) from None
        except EnforceError as e:
            raise CallError(Code.INTERNAL, f"the host refused {kind.value} {target}: {e}") from None
        return convert.mitigation(m), f"{m.kind.value} {m.target} {m.state.value} id {m.id}"

    @rpc(OPERATOR, mutating=True)
    def LiftMitigation(self, request, caller):
        if request.id:
            m = self.store.mitigation(request.id)
            if m is None:
                raise CallError(Code.NOT_FOUND, f"no mitigation with id {request.id!r}")
            if m.state not in IN_FORCE:
                raise CallError(Code.FAILED_PRECONDITION,
                                f"mitigation {m.id} is not in force (it is {m.state.value})")
            todo = [m]
        elif request.target:
            target = _target(request.target)
            kind = KINDS.get(request.kind) if request.kind else None
            if request.kind and kind is None:
                raise CallError(Code.INVALID_ARGUMENT, f"unknown mitigation kind {request.kind}")
            todo = self.store.mitigations(state=IN_FORCE, target=target, kind=kind,
                                          live_at=self.clock())
            if not todo:
                raise CallError(Code.NOT_FOUND, f"no mitigation in force on {target}")
        else:
            raise CallError(Code.INVALID_ARGUMENT, "give a mitigation id or a target")
        lifted = [self.agent.responder.lift(m.id) for m in todo]
        return (pb.LiftMitigationResponse(lifted=[convert.mitigation(m) for m in lifted]),
                "lifted " + ", ".join(f"{m.kind.value} {m.target}" for m in lifted))

    @rpc(OPERATOR, mutating=True)
    def Isolate(self, request, caller):
        m = isolation.isolate(self.agent, request, caller, self._ttl_or_none(request),
                              _text("reason", request.reason))
        return convert.mitigation(m), f"{m.kind.value} {m.target} {m.state.value} id {m.id}"

    @rpc(OPERATOR, mutating=True)
    def Release(self, request, caller):
        lifted = isolation.release(self.agent, request, self.clock())
        return (pb.LiftMitigationResponse(lifted=[convert.mitigation(m) for m in lifted]),
                "released " + ", ".join(f"{m.kind.value} {m.target}" for m in lifted))

    @rpc(OPERATOR, mutating=True)
    async def ReloadRules(self, request, caller):
        try:
            done = await self.agent.reload_rules(f"control:{caller.identity}")
        except ValueError as e:   # ConfigError / RuleError: the rules in use stay
            raise CallError(Code.FAILED_PRECONDITION, str(e)) from None
        rs = done.ruleset
        detail = (f"{len(rs.rules)} rules, {rs.version}"
                  + ("" if done.changed else " (unchanged)"))
        return pb.ReloadRulesResponse(rules=rs.names, ruleset_version=rs.version,
                                      changed=done.changed, took_s=done.took_s), detail

    @rpc(VIEWER, mutating=False)
    def ListRules(self, request, caller):
        return convert.rule_listing(self.agent.rule_listing()), ""

    @rpc(OPERATOR, mutating=True)
    def AuthorizeGpu(self, request, caller):
        return gpu.authorize(self.agent, request, caller, self.clock())

    @rpc(OPERATOR, mutating=True)
    def RevokeGpu(self, request, caller):
        return gpu.revoke(self.agent, request)

    @rpc(VIEWER, mutating=False)
    def ListGpuAuthorizations(self, request, caller):
        return pb.GpuAuthorizations(authorizations=gpu.listing(self.agent)), ""

    @rpc(VIEWER, mutating=False)
    def ListFeedback(self, request, caller):
        return feedback.listing(self.agent, request, _limit(request.limit), self.clock()), ""

    @rpc(OPERATOR, mutating=True)
    def RevertFeedback(self, request, caller):
        return feedback.revert(self.agent, request, caller.identity,
                               _text("comment", request.comment), self.clock())

    @rpc(OPERATOR, mutating=True)
    async def ApplyBundle(self, request, caller):
        return await bundles.apply(self.agent, request, caller,
                                   _text("comment", request.comment))

    @rpc(VIEWER, mutating=False)
    def ListBundles(self, request, caller):
        return bundles.listing(self.agent), ""

    @rpc(OPERATOR, mutating=True)
    async def RollbackBundle(self, request, caller):
        _text("comment", request.comment)
        return await bundles.rollback(self.agent)

    @rpc(VIEWER, mutating=False)
    def ListFleet(self, request, caller):
        return fleetlist.listing(self.agent, request, self.clock()), ""

    # -- checks ------------------------------------------------------------------------------

    def _incident(self, incident_id: str, open_only: bool = False):
        if not incident_id:
            raise CallError(Code.INVALID_ARGUMENT, "an incident id is required")
        if len(incident_id) > 64:
            raise CallError(Code.INVALID_ARGUMENT, "an incident id is at most 64 characters")
        i = self.store.incident(incident_id)
        if i is None:
            raise CallError(Code.NOT_FOUND, f"no incident with id {incident_id!r}")
        if open_only and i.state in CLOSED:
            raise CallError(Code.FAILED_PRECONDITION,
                            f"incident {i.id} is already closed ({i.state.value})")
        return i

    def _ttl_or_none(self, request) -> float | None:
        """An isolation's lifetime: unset gives mitigation.isolation_ttl_s (None: until
        released)."""
        if not request.HasField("ttl_s"):
            return self.agent.cfg.mitigation.isolation_ttl_s
        return self._ttl(request)

    def _ttl(self, request) -> float:
        pol = self.agent.cfg.mitigation
        if not request.HasField("ttl_s"):
            return pol.default_ttl_s
        ttl = request.ttl_s
        if not math.isfinite(ttl) or ttl <= 0 or ttl > pol.max_ttl_s:
            raise CallError(Code.INVALID_ARGUMENT,
                            f"ttl_s must be more than 0 and at most {pol.max_ttl_s:g} s "
                            f"(mitigation.max_ttl_s), got {ttl:g}")
        return ttl


def _limit(n: int) -> int:
    if n > MAX_LIMIT:
        raise CallError(Code.INVALID_ARGUMENT, f"limit must be at most {MAX_LIMIT}, got {n}")
    return n or DEFAULT_LIMIT


def _text(name: str, value: str) -> str:
    """A comment or reason: at most MAX_TEXT characters of plain text on one line (no
    control or format characters: escapes, newlines, bidi overrides are refused)."""
    if len(value) > MAX_TEXT:
        raise CallError(Code.RESOURCE_EXHAUSTED,
                        f"{name} is {len(value)} characters long; the limit is {MAX_TEXT}")
    for i, c in enumerate(value):
        if unicodedata.category(c) in _NOT_TEXT:
            raise CallError(Code.INVALID_ARGUMENT,
                            f"{name} holds a control character (U+{ord(c):04X} at position "
                            f"{i}); give plain text on one line")
    return value.strip()


def _enum(cls: type, value: str, name: str):
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(v.value for v in cls)
        raise CallError(Code.INVALID_ARGUMENT,
                        f"unknown {name} {value!r} (one of {choices})") from None


def _target(text: str, broad_ok: bool = True) -> str:
    """A normalised address or CIDR, as the responder stores it."""
    if len(text) > 64:
        raise CallError(Code.INVALID_ARGUMENT, "a target is at most 64 characters")
    try:
        target = policy.check_target(MitigationKind.BLOCK_IP, text)
    except ValueError as e:
        raise CallError(Code.INVALID_ARGUMENT, str(e)) from None
    net = policy.parse_target(target)
    if not broad_ok and net.prefixlen < MIN_PREFIX[net.version]:
        raise CallError(Code.INVALID_ARGUMENT,
                        f"{target} is too broad: the shortest prefix accepted is "
                        f"/{MIN_PREFIX[net.version]} for IPv{net.version}")
    if not broad_ok and (subnet := _broadcast_of(net)) is not None:
        raise CallError(Code.INVALID_ARGUMENT,
                        f"{target} is the broadcast address of this host's subnet {subnet}; "
                        "it is never a source and cannot be blocked")
    return target


def _broadcast_of(net) -> str | None:
    """The on-link IPv4 subnet whose broadcast address `net` (a single address) is, or
    None. Only the host's own subnets are knowable: elsewhere a.b.c.255 may be a host."""
    if net.version != 4 or net.prefixlen != 32:
        return None
    try:
        reader = AddressReader()
        try:
            ifaces = reader.interfaces()
        finally:
            reader.close()
    except OSError:
        return None
    for iface in ifaces:
        if iface.version == 4 and iface.network.prefixlen <= 30 and \
                iface.network.broadcast_address == net.network_address:
            return str(iface.network)
    return None
