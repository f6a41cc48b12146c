"""mesh/identity.py: which certificates signed by the mesh's CA name a node. The mesh's
own CA and server certificates do not; every node certificate the mesh issues does."""
from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID as Eku

from mesh import pki
from mesh.identity import IdentityError, from_pem

CA = pki.make_ca()


def leaf(*extensions: x509.ExtensionType) -> bytes:
    """A certificate for CN=gpu-1, O=acme signed by CA with exactly `extensions`."""
    key = pki.new_key()
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(pki._name("gpu-1", "acme"))
         .issuer_name(CA.cert.subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now)
         .not_valid_after(now + datetime.timedelta(days=1)))
    for ext in extensions:
        b = b.add_extension(ext, critical=False)
    return pki.cert_pem(b.sign(CA.key, hashes.SHA256()))


def test_the_certificates_the_mesh_issues_to_nodes_name_them():
    cert, _ = pki.node_cert(CA, "gpu-1", "acme")
    assert (from_pem(pki.cert_pem(cert)).node, from_pem(pki.cert_pem(cert)).provider) == \
        ("gpu-1", "acme")
    # as tests/meshkit.py makes them with openssl: clientAuth, no BasicConstraints
    assert from_pem(leaf(x509.ExtendedKeyUsage([Eku.CLIENT_AUTH]))).node == "gpu-1"


@pytest.mark.parametrize("extensions, needle", [
    ((), "no extended key usage"),
    ((x509.ExtendedKeyUsage([Eku.CLIENT_AUTH, Eku.SERVER_AUTH]),), "serverAuth"),
    ((x509.ExtendedKeyUsage([Eku.ANY_EXTENDED_KEY_USAGE]),), "anyExtendedKeyUsage"),
    ((x509.ExtendedKeyUsage([Eku.CODE_SIGNING]),), "does not allow clientAuth"),
    ((x509.ExtendedKeyUsage([Eku.CLIENT_AUTH]), x509.BasicConstraints(ca=True, path_length=0)),
     "CA certificate"),
])
def test_a_certificate_not_made_for_a_node_names_no_one(extensions, needle):
    with pytest.raises(IdentityError, match=needle):
        from_pem(leaf(*extensions))


def test_the_meshs_own_certificates_name_no_node():
    server, _ = pki.server_cert(CA, ["mesh.example"])
    for cert in (server, CA.cert):
        with pytest.raises(IdentityError):
            from_pem(pki.cert_pem(cert))
