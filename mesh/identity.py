"""Who is calling: a node's identity from its verified client certificate.

The node is the certificate subject's one Common Name (CN), its provider the subject's
one Organization (O). gRPC has already verified the chain to the configured CA (mutual TLS
with require_client_auth); here the PEM gRPC hands over (`x509_pem_cert` in the call's
auth context) is parsed with cryptography, because gRPC reports only the first CN and no
O at all. A certificate with several CNs or several Os names no one: it is refused.
Its notBefore comes along: a node revocation covers the certificates of that node issued
at or before it (mesh/revocation.py).
"""
from __future__ import annotations

import datetime
import functools
from dataclasses import dataclass
from typing import Any, Mapping

from cryptography import x509
from cryptography.x509.oid import NameOID

MAX_NAME = 200


@dataclass(frozen=True)
class Identity:
    node: str           # the subject CN
    provider: str       # the subject O; "" when the certificate names none
    not_before: float = 0.0     # the certificate's notBefore, in seconds since the epoch


class IdentityError(ValueError):
    """The caller cannot be identified; the message says why, for the refusal."""


def from_auth_context(auth: Mapping[str, Any] | None) -> Identity:
    """The caller of a mutual-TLS call (context.auth_context())."""
    auth = auth or {}
    if auth.get("transport_security_type") != [b"ssl"]:
        raise IdentityError("the call did not come over TLS")
    pems = auth.get("x509_pem_cert") or []
    if len(pems) != 1:
        raise IdentityError("the call carries no client certificate")
    return from_pem(bytes(pems[0]))


@functools.lru_cache(maxsize=4096)
def from_pem(pem: bytes) -> Identity:
    """The identity a PEM certificate names (cached: nodes send the same one each call)."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise IdentityError(f"the client certificate cannot be read: {e}") from None
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    orgs = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    if len(cns) != 1 or not isinstance(cns[0], str) or not cns[0].strip():
        raise IdentityError(f"the client certificate's subject has {len(cns)} Common Names "
                            "(CN); a node is named by exactly one")
    if len(orgs) > 1:
        raise IdentityError(f"the client certificate's subject has {len(orgs)} Organizations "
                            "(O); a node's provider is named by at most one")
    node = cns[0]
    provider = orgs[0] if orgs and isinstance(orgs[0], str) else ""
    for what, value in (("CN", node), ("O", provider)):
        if len(value) > MAX_NAME or not value.isprintable():
            raise IdentityError(f"the client certificate's {what} is longer than {MAX_NAME} "
                                "characters or not printable")
    not_before = cert.not_valid_before.replace(tzinfo=datetime.timezone.utc).timestamp()
    return Identity(node, provider, not_before)
