"""Who is calling: a node's identity from its verified client certificate.

The node is the certificate subject's one Common Name (CN), its provider the subject's
one Organization (O). gRPC has already verified the chain to the configured CA (mutual TLS
with require_client_auth); here the PEM gRPC hands over (`x509_pem_cert` in the call's
auth context) is parsed with cryptography, because gRPC reports only the first CN and no
O at all. A certificate with several CNs or several Os names no one: it is refused.
Its notBefore comes along: a node revocation covers the certificates of that node issued
at or before it (mesh/revocation.py).

Only a node certificate names a node: the CA also signs the mesh's own server certificate
(serverAuth, and clientAuth for a NATS that verifies clients), and its key sits on the
mesh readable by the service's group. A node certificate is what mesh/pki.py's node_cert
issues: not a CA (no BasicConstraints CA:true) and an ExtendedKeyUsage that allows
clientAuth and neither serverAuth nor anyExtendedKeyUsage. Anything else is refused, so
the mesh's key cannot report or vote as a node of provider "swarm-mesh".
"""
from __future__ import annotations

import datetime
import functools
from dataclasses import dataclass
from typing import Any, Mapping

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

MAX_NAME = 200
# Usages a node's certificate never carries: whoever holds one is a server (or anything).
_NOT_A_NODE = {ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
               ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage"}


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
    check_node_usage(cert)
    provider = orgs[0] if orgs and isinstance(orgs[0], str) else ""
    for what, value in (("CN", node), ("O", provider)):
        if len(value) > MAX_NAME or not value.isprintable():
            raise IdentityError(f"the client certificate's {what} is longer than {MAX_NAME} "
                                "characters or not printable")
    not_before = cert.not_valid_before.replace(tzinfo=datetime.timezone.utc).timestamp()
    return Identity(node, provider, not_before)


def check_node_usage(cert: x509.Certificate) -> None:
    """Raises unless `cert` is made for a node: a client, not a CA nor a server."""
    try:
        exts = cert.extensions
    except (ValueError, x509.DuplicateExtension) as e:     # gRPC's parser took it
        raise IdentityError(f"the client certificate's extensions cannot be read: {e}") \
            from None
    try:
        if exts.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise IdentityError("the client certificate is a CA certificate, not a node's")
    except x509.ExtensionNotFound:
        pass
    try:
        usages = set(exts.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        raise IdentityError("the client certificate has no extended key usage; a node's "
                            "allows clientAuth") from None
    wrong = sorted(name for oid, name in _NOT_A_NODE.items() if oid in usages)
    if wrong:
        raise IdentityError(f"the client certificate allows {', '.join(wrong)}: it is a "
                            "server's, not a node's")
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        raise IdentityError("the client certificate does not allow clientAuth; a node's does")
