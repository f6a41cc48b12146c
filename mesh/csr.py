"""A node's certificate signing request (CSR), read as the hostile input it may be.

`swarm-agent mesh-csr` makes the node's key on the node and a CSR for it; `swarm-mesh
enroll NODE --provider P --csr FILE` signs it, so the private key never leaves the node.
Whoever hands the operator the CSR chooses every byte of it. What the mesh takes from it
is the public key, and only once the CSR's own signature proves the sender holds the
private key. Subject, extensions (CA:true, SANs, key usages) and attributes are ignored:
the certificate's subject, extensions and lifetime are the mesh's (mesh/pki.py), and
`ignored()` lists what was asked for, so the operator sees it. The file is read up to
MAX_CSR_BYTES (a CSR is about 500 bytes); a bigger one is refused without being read
further, and anything but a regular file (a FIFO, /dev/zero) without being read at all:
it is opened O_NONBLOCK, so a FIFO nobody writes cannot hang `enroll` in open().

A key is recognised by key_id(), computed from one canonical encoding (the uncompressed
point), whatever form the CSR sent it in: the same key as a compressed point is the same
key. key_ids() also gives the id of the form it was sent in, which ledgers written before
this was canonical may hold.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InternalError, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.cli.text import clean

MAX_CSR_BYTES = 64 * 1024
_HOW = "swarm-agent mesh-csr on the node makes a key and a CSR for it"
# What cryptography (38, OpenSSL) raises for a CSR it cannot parse or verify: besides
# ValueError, InvalidVersion (a version other than 1) and InternalError (OpenSSL's error
# stack, e.g. a name that is not valid DER/UTF-8, or a key the signature algorithm does
# not fit).
_BAD = (ValueError, TypeError, UnsupportedAlgorithm, InternalError, x509.InvalidVersion)


class CsrError(ValueError):
    """The CSR cannot be used; one sentence."""


def read(path: Path) -> bytes:
    """The file's bytes, at most MAX_CSR_BYTES + 1; only a regular file is read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise CsrError(f"cannot read the CSR {path}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CsrError(f"cannot read the CSR {path}: it is not a regular file (a FIFO, "
                           "a device or a directory); give the file swarm-agent mesh-csr wrote")
        data = b""
        while len(data) <= MAX_CSR_BYTES:
            chunk = os.read(fd, MAX_CSR_BYTES + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as e:
        raise CsrError(f"cannot read the CSR {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_CSR_BYTES:
        raise CsrError(f"the CSR {path} is larger than {MAX_CSR_BYTES // 1024} KiB; a CSR is "
                       f"under 1 KiB ({_HOW})")
    if not data.strip():
        raise CsrError(f"the CSR {path} is empty ({_HOW})")
    return data


def parse(data: bytes, shown: str) -> x509.CertificateSigningRequest:
    """A CSR from PEM or DER whose signature verifies and whose key is EC P-256."""
    try:
        csr = (x509.load_pem_x509_csr(data) if b"-----BEGIN" in data
               else x509.load_der_x509_csr(data))
        csr.subject                           # parsed lazily: a bad name fails here
    except _BAD:
        raise CsrError(f"{shown} is not a certificate signing request (PEM or DER; {_HOW})") \
            from None
    try:
        key = csr.public_key()
        valid = csr.is_signature_valid
    except _BAD:
        raise CsrError(f"the CSR {shown} carries a key or signature of a kind the mesh does "
                       f"not take (EC P-256 only; {_HOW})") from None
    if not valid:
        raise CsrError(f"the signature of the CSR {shown} does not verify: it was not made "
                       "with the private key of the public key it carries")
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        kind = f"EC {key.curve.name}" if isinstance(key, ec.EllipticCurvePublicKey) \
            else type(key).__name__.removeprefix("_").replace("PublicKey", "")
        raise CsrError(f"the CSR {shown} carries a {kind} key; the mesh certifies EC P-256 "
                       f"keys only ({_HOW})")
    return csr


def load(path: Path) -> x509.CertificateSigningRequest:
    return parse(read(path), str(path))


def _spki_id(public_key: ec.EllipticCurvePublicKey) -> str:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(public_key.public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    return digest.finalize().hex()


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 of the public key's SubjectPublicKeyInfo (DER) with the point uncompressed,
    hex: how the enrolment ledger recognises a key certified before. The key is rebuilt
    from its numbers first: cryptography re-encodes a key in the point form it was read
    in, so the same key sent compressed would otherwise get another id."""
    return _spki_id(public_key.public_numbers().public_key())


def key_ids(public_key: ec.EllipticCurvePublicKey) -> set[str]:
    """key_id() and the id of the encoding the key came in (what a ledger written before
    key ids were canonical recorded for a key sent compressed)."""
    return {key_id(public_key), _spki_id(public_key)}


def ignored(csr: x509.CertificateSigningRequest) -> list[str]:
    """What the CSR asked for that the certificate does not take from it (printable)."""
    out = []
    if len(csr.subject):          # the attacker's text: cleaned for the operator's terminal
        out.append(f"subject {clean(csr.subject.rfc4514_string()[:200])}")
    try:
        exts = [e.oid.dotted_string if isinstance(e.value, x509.UnrecognizedExtension)
                else type(e.value).__name__ for e in csr.extensions]
    except (*_BAD, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        exts = ["(unreadable)"]
    if exts:
        out.append("extensions " + ", ".join(exts)[:200])
    return out
