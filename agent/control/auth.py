"""Who is calling, and what they may do: one door for every listener.

Two ways in. The local socket <run_dir>/control.sock is served by LocalFront
(agent.control.local), which reads each connection's SO_PEERCRED, refuses other uids, and
relays the rest to gRPC's private socket from an abstract address it registers with the
peer's uid and pid; a connection to the private socket that LocalFront did not make is no
one (it is refused whatever its uid: the credential check was skipped). The TCP listener
only completes a TLS handshake with a client certificate signed by control.tls_ca; its
identity is the certificate's subject Common Name, and only that: SANs are not read, so a
certificate cannot take a role from a second field. A certificate with no CN, or with
several, is no one. The identity gets the role it is listed under in control.operators or
control.viewers (operators win), else none.

`Gate` is a server interceptor that refuses a caller without a role before any handler
(health and reflection included) runs; the Control handlers then check the role a call
needs (service.rpc).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import grpc

from agent.config import Control

VIEWER, OPERATOR, NONE = "viewer", "operator", "none"
_RANK = {NONE: 0, VIEWER: 1, OPERATOR: 2}
CONTROL_PREFIX = "/swarm.control.v1.Control/"


@dataclass(frozen=True, slots=True)
class Caller:
    """`identity` as audited ("local:uid=0", a certificate CN), its role, and for a caller
    without a role the sentence saying why."""

    identity: str
    role: str
    why: str = ""

    def may(self, role: str) -> bool:
        """Whether this caller holds `role` or a stronger one."""
        return _RANK[self.role] >= _RANK[role]


@dataclass(frozen=True, slots=True)
class LocalPeer:
    """A local caller as the kernel reported it (SO_PEERCRED) when it connected."""

    pid: int
    uid: int


class Authenticator:
    """Maps a call's context to its Caller. `local_peers` (gRPC peer string -> LocalPeer)
    is LocalFront's live registry of the connections it relays."""

    def __init__(self, cfg: Control, local_peers: Mapping[str, LocalPeer]):
        self.cfg, self.local_peers = cfg, local_peers

    def caller(self, context: Any) -> Caller:
        auth = context.auth_context() or {}
        if auth.get("transport_security_type") == [b"ssl"]:
            return self._certificate(auth)
        peer = self.local_peers.get(context.peer())
        if peer is None:
            return Caller(f"unverified:{context.peer()}", NONE,
                          "this connection did not come through the control socket's "
                          "credential check")
        return Caller(f"local:uid={peer.uid}", OPERATOR)

    def _certificate(self, auth: Mapping[str, list[bytes]]) -> Caller:
        cns = [v.decode(errors="replace") for v in auth.get("x509_common_name", [])]
        subject = auth.get("x509_subject")
        if subject:   # gRPC reports only the first CN: count them in the whole subject
            count = len(subject_cns(subject[0].decode(errors="replace")))
        else:
            count = len(cns)
        if count > 1:
            return Caller("certificate with several common names", NONE,
                          f"the client certificate's subject has {count} Common Names (CN); "
                          "the agent takes the identity from exactly one")
        if len(cns) != 1 or not cns[0]:
            return Caller("certificate without a common name", NONE,
                          "the client certificate names no subject Common Name (CN), the "
                          "field the agent takes identities from")
        cn = cns[0]
        if cn in self.cfg.operators:
            return Caller(cn, OPERATOR)
        if cn in self.cfg.viewers:
            return Caller(cn, VIEWER)
        return Caller(cn, NONE, f"the client certificate's CN {cn!r} is not listed in "
                                "control.viewers or control.operators")


def subject_cns(subject: str) -> list[str]:
    """The CN values of an RFC 4514 subject string ("CN=a,O=b\\, c+CN=d")."""
    parts, cur, i = [], [], 0
    while i < len(subject):
        ch = subject[i]
        if ch == "\\" and i + 1 < len(subject):
            cur.append(subject[i:i + 2])
            i += 2
            continue
        if ch in ",+":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    found = []
    for part in parts:
        kind, _, value = part.partition("=")
        if kind.strip().upper() in ("CN", "2.5.4.3", "OID.2.5.4.3"):
            found.append(value)
    return found


def denied(caller: Caller, method: str, role: str) -> str:
    """The sentence for a call refused for its caller's role."""
    if caller.role == NONE:
        return f"permission denied: {caller.why}"
    return (f"permission denied: {caller.identity} ({caller.role}) may not call {method}: "
            f"it needs the {role} role")


class Gate(grpc.aio.ServerInterceptor):
    """Refuses every call of a caller without a role, on every service. A refused Control
    call is audited through `audit(caller, method, request, result, detail)`."""

    def __init__(self, auth: Authenticator, audit: Callable[..., None]):
        self.auth, self.audit = auth, audit

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        for name in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            inner = getattr(handler, name)
            if inner is not None:
                return handler._replace(**{name: self._guard(inner, method, name)})
        return handler

    def _guard(self, inner: Callable, method: str, kind: str) -> Callable:
        async def check(request, context) -> None:
            caller = self.auth.caller(context)
            if caller.role != NONE:
                return
            message = f"permission denied: {caller.why}"
            if method.startswith(CONTROL_PREFIX) and not kind.startswith("stream"):
                self.audit(caller, method.removeprefix(CONTROL_PREFIX), request,
                           grpc.StatusCode.PERMISSION_DENIED.name, message)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)

        if inspect.isasyncgenfunction(inner):
            async def streamed(request, context):
                await check(request, context)
                async for item in inner(request, context):
                    yield item
            return streamed

        async def called(request, context):
            await check(request, context)
            result = inner(request, context)
            return await result if inspect.isawaitable(result) else result
        return called
