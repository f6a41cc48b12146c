"""The mesh's own small certificate authority: a CA, the mesh's server certificate and one
client certificate per node, all EC P-256 (what gRPC, nats-server and every TLS stack
take), made with `cryptography`.

The CA lives ten years, the certificates it signs two. A node's key is made here
(node_cert) or on the node, which sends a CSR (node_cert_for, mesh/csr.py). A node's certificate names the
node in its subject CN and the provider in its O: that is how the reporting API knows
who calls (mesh/identity.py). Private keys are written 0600 and never over an existing
file (O_EXCL); certificates are public.
"""
from __future__ import annotations

import datetime
import ipaddress
import math
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
LEAF_DAYS = 730
BACKDATE_S = 300                                # clocks of nodes a little behind the mesh's
_BACKDATE = datetime.timedelta(seconds=BACKDATE_S)


class PkiError(ValueError):
    """A CA or certificate file that cannot be used; one sentence."""


@dataclass(frozen=True)
class Authority:
    """A CA certificate and its private key, loaded."""
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int,
             after: float | None = None) -> x509.CertificateBuilder:
    """notBefore a little in the past (_BACKDATE), or the first whole second after
    `after` (a revocation of the name: mesh/revocation.py) when that is later. X.509
    times are whole seconds."""
    now = datetime.datetime.now(datetime.timezone.utc)
    start = (now - _BACKDATE).replace(microsecond=0)
    if after is not None:
        start = max(start, datetime.datetime.fromtimestamp(math.floor(after) + 1,
                                                           datetime.timezone.utc))
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(now + datetime.timedelta(days=days)))


def make_ca(common_name: str = "swarm-mesh CA") -> Authority:
    """A new self-signed CA (path length 0: it signs leaves only)."""
    key = new_key()
    name = _name(common_name, "swarm-mesh")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (_builder(name, name, key.public_key(), CA_DAYS)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    return Authority(cert, key)


def _leaf(ca: Authority, subject: x509.Name, public_key: ec.EllipticCurvePublicKey,
          usage: list, sans: list[x509.GeneralName] | None,
          after: float | None = None) -> x509.Certificate:
    b = (_builder(subject, ca.cert.subject, public_key, LEAF_DAYS, after)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                      content_commitment=False, data_encipherment=False,
                                      key_agreement=False, key_cert_sign=False, crl_sign=False,
                                      encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                        critical=False))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(ca.key, hashes.SHA256())


def general_name(name: str) -> x509.GeneralName:
    """An IP address SAN for an address, else a DNS name SAN."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def server_cert(ca: Authority, names: list[str]) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The mesh's certificate for the reporting API and nats-server (serverAuth, and
    clientAuth too so the mesh may present it to a NATS that verifies clients)."""
    key = new_key()
    cert = _leaf(ca, _name(names[0], "swarm-mesh"), key.public_key(),
                 [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
                 [general_name(n) for n in names])
    return cert, key


def node_cert(ca: Authority, node: str, provider: str, after: float | None = None
              ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A node's client certificate and its new key: CN=node, O=provider, clientAuth only;
    `after`: the node's latest revocation, which its notBefore must follow."""
    key = new_key()
    return node_cert_for(ca, node, provider, key.public_key(), after), key


def node_cert_for(ca: Authority, node: str, provider: str,
                  public_key: ec.EllipticCurvePublicKey,
                  after: float | None = None) -> x509.Certificate:
    """The same for a key the node keeps (from its CSR, mesh/csr.py): subject, extensions
    and lifetime are the mesh's alone."""
    return _leaf(ca, _name(node, provider), public_key, [ExtendedKeyUsageOID.CLIENT_AUTH],
                 None, after)


def names_of(cert: x509.Certificate) -> list[str]:
    """The SANs of a certificate as strings, in order."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(g.value) for g in san]


def signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether `ca` issued `cert` (issuer name and ECDSA signature)."""
    if cert.issuer != ca.subject:
        return False
    try:
        ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes,
                               ec.ECDSA(cert.signature_hash_algorithm))
    except (InvalidSignature, TypeError, AttributeError):   # or a key of another kind
        return False
    return True


# ---- files
def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_new(path: Path, data: bytes, mode: int) -> None:
    """Writes a file that must not exist yet, with `mode` from the start (no window in
    which a key is readable by others)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_replace(path: Path, data: bytes, mode: int) -> None:
    """Writes a file atomically, replacing what was there."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    write_new(tmp, data, mode)
    os.replace(tmp, path)


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as e:
        raise PkiError(f"cannot read {path}: {e.strerror}") from None
    except ValueError:
        raise PkiError(f"{path} is not a PEM certificate") from None


def load_authority(cert_path: Path, key_path: Path) -> Authority:
    cert = load_cert(cert_path)
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as e:
        raise PkiError(f"cannot read {key_path}: {e.strerror}") from None
    except (ValueError, TypeError):
        raise PkiError(f"{key_path} is not an unencrypted PEM private key") from None
    public = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePrivateKey) or \
            not isinstance(public, ec.EllipticCurvePublicKey) or \
            key.public_key().public_numbers() != public.public_numbers():
        raise PkiError(f"{key_path} is not the key of {cert_path}")
    return Authority(cert, key)
