"""Who is calling, and what they may do.

Two ways in: the private socket behind the local front (agent.control.local), which only
root reaches, and the TCP listener, which only completes a TLS handshake with a client
certificate signed by control.tls_ca. A local caller is an operator; a remote one gets the
role its certificate's identity (CN or a SAN) is listed under in control.viewers /
control.operators, else none.
"""
from __future__ import annotations

from dataclasses import dataclass

from agent.config import Control

VIEWER, OPERATOR, NONE = "viewer", "operator", "none"
LOCAL_IDENTITY = "local:uid=0"
_RANK = {NONE: 0, VIEWER: 1, OPERATOR: 2}


@dataclass(frozen=True, slots=True)
class Caller:
    identity: str
    role: str

    def may(self, role: str) -> bool:
        """Whether this caller holds `role` or a stronger one."""
        return _RANK[self.role] >= _RANK[role]


def _names(auth: dict[str, list[bytes]]) -> list[str]:
    # gRPC puts the subject CN and each SAN into the auth context; SANs first, then CN.
    out = []
    for key in ("x509_subject_alternative_name", "x509_common_name"):
        out.extend(v.decode(errors="replace") for v in auth.get(key, []))
    return out


def caller_of(context, cfg: Control) -> Caller:
    """The Caller behind a grpc.aio ServicerContext."""
    auth = context.auth_context() or {}
    if auth.get("transport_security_type") != [b"ssl"]:
        return Caller(LOCAL_IDENTITY, OPERATOR)
    names = _names(auth)
    for role, listed in ((OPERATOR, cfg.operators), (VIEWER, cfg.viewers)):
        for name in names:
            if name in listed:
                return Caller(name, role)
    cn = auth.get("x509_common_name", [b""])
    return Caller(cn[0].decode(errors="replace") or (names[0] if names else "unknown"), NONE)
