"""Enrolment from a CSR (mesh/csr.py, `swarm-mesh enroll --csr`, `swarm-agent mesh-csr`):
the node's key stays on the node, and a CSR is read as an attacker's file: its subject and
extensions are ignored, a bad signature, a foreign key type, garbage or a huge file is one
sentence and writes nothing, a key is certified once. And enrolment after a revocation:
the new certificate starts after it. Everything in tmp_path, certificates checked with
`cryptography`."""
from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.cli import main as agent_main
from agent.cli.meshcsr import make
from mesh import cli, pki
from mesh.config import load
from mesh.enroll import enroll
from mesh.identity import from_pem
from mesh.setup import Layout, init_mesh
from mesh.store import open_store


@pytest.fixture
def mesh_dir(tmp_path: Path) -> Path:
    init_mesh(tmp_path / "mesh", ["mesh.example", "203.0.113.5"], "0.0.0.0:17443",
              "0.0.0.0:14222", tmp_path / "state")
    return tmp_path / "mesh"


def csr_file(path: Path, key=None, cn: str = "gpu-1", extensions=(), der: bool = False,
             org: str | None = None) -> Path:
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        name.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(name))
    for ext, critical in extensions:
        b = b.add_extension(ext, critical=critical)
    csr = b.sign(key, hashes.SHA256())
    path.write_bytes(csr.public_bytes(serialization.Encoding.DER if der
                                      else serialization.Encoding.PEM))
    return path


def names(cert: x509.Certificate, oid) -> list[str]:
    return [a.value for a in cert.subject.get_attributes_for_oid(oid)]


def test_a_csr_from_the_node_is_certified_without_its_key_leaving_the_node(
        mesh_dir: Path, tmp_path: Path):
    node_dir = tmp_path / "node"
    made = make(node_dir, "whatever-the-host-says")
    assert stat.S_IMODE(os.stat(made["key"]).st_mode) == 0o600
    out = tmp_path / "out"
    result = enroll(mesh_dir, "gpu-1", "acme", out, str(node_dir), csr=Path(made["csr"]))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["node.pem", "ca.pem", "decisions.pub", "nats.password", "agent-fleet.yaml"])
    cert = pki.load_cert(out / "node.pem")
    key = serialization.load_pem_private_key(Path(made["key"]).read_bytes(), None)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert pki.signed_by(cert, pki.load_cert(Layout(mesh_dir).ca_cert))
    who = from_pem(pki.cert_pem(cert))
    assert (who.node, who.provider) == ("gpu-1", "acme")
    assert result["csr_ignored"] == ["subject CN=whatever-the-host-says"]
    ledger = json.loads(Layout(mesh_dir).ledger.read_text())["nodes"]["gpu-1"]
    assert (ledger["key"], ledger["key_sha256"]) == ("node", made["key_sha256"])
    assert "beside node.key" in (out / "agent-fleet.yaml").read_text()


def test_a_hostile_csr_gets_the_meshs_subject_and_extensions_only(mesh_dir: Path, tmp_path: Path):
    asks = [(x509.BasicConstraints(ca=True, path_length=None), True),
            (x509.SubjectAlternativeName([x509.DNSName("mesh.example"),
                                          x509.IPAddress(__import__("ipaddress")
                                                         .ip_address("203.0.113.5"))]), False),
            (x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                           content_commitment=False, key_encipherment=False,
                           data_encipherment=False, key_agreement=False, encipher_only=False,
                           decipher_only=False), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)]
    path = csr_file(tmp_path / "evil.csr", cn="mesh.example", org="swarm-mesh\x1b[2J",
                    extensions=asks)
    result = enroll(mesh_dir, "gpu-2", "acme", tmp_path / "out", "/p", csr=path)
    cert = pki.load_cert(tmp_path / "out" / "node.pem")
    assert names(cert, NameOID.COMMON_NAME) == ["gpu-2"]
    assert names(cert, NameOID.ORGANIZATION_NAME) == ["acme"]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == \
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert result["csr_ignored"] == [
        "subject O=swarm-mesh\\x1b[2J,CN=mesh.example",       # no terminal control
        "extensions BasicConstraints, SubjectAlternativeName, KeyUsage, ExtendedKeyUsage"]


def bad_signature(path: Path) -> Path:
    good = x509.load_pem_x509_csr(csr_file(path).read_bytes())
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01                                   # inside the ECDSA signature's integers
    path.write_bytes(bytes(der))
    return path


def foreign_key(path: Path, kind: str) -> Path:
    key = rsa.generate_private_key(65537, 1024) if kind == "rsa" else \
        ec.generate_private_key(ec.SECP384R1())
    return csr_file(path, key=key)


@pytest.mark.parametrize("make_file, says", [
    (lambda p: (p.write_bytes(b"\x00garbage\xff" * 3), p)[1], "is not a certificate signing request"),
    (lambda p: (p.write_text("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"), p)[1],
     "is not a certificate signing request"),
    (lambda p: (p.write_bytes(b""), p)[1], "is empty"),
    (lambda p: (p.write_bytes(b"A" * (64 * 1024 + 1)), p)[1], "is larger than 64 KiB"),
    (lambda p: Path("/dev/zero"), "is not a regular file"),
    (lambda p: p.parent, "cannot read the CSR"),
    (bad_signature, "does not verify"),
    (lambda p: foreign_key(p, "rsa"), "carries a RSA key; the mesh certifies EC P-256"),
    (lambda p: foreign_key(p, "p384"), "carries a EC secp384r1 key"),
], ids=["garbage", "broken-pem", "empty", "huge", "dev-zero", "directory", "bad-signature",
        "rsa", "p384"])
def test_a_csr_that_cannot_be_used_is_one_sentence_and_writes_nothing(
        mesh_dir: Path, tmp_path: Path, make_file, says):
    path = make_file(tmp_path / "node.csr")
    ledger = Layout(mesh_dir).ledger
    with pytest.raises(cli.UsageError, match=says) as e:
        enroll(mesh_dir, "gpu-3", "acme", tmp_path / "out", "/p", csr=path)
    assert "\n" not in str(e.value) and len(str(e.value)) < 300
    assert not (tmp_path / "out").exists() and not ledger.exists()


def test_a_key_is_certified_once_and_a_stale_key_file_in_out_goes(mesh_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    enroll(mesh_dir, "gpu-4", "acme", out, "/p")                    # key made on the mesh
    assert (out / "node.key").exists()
    key = ec.generate_private_key(ec.SECP256R1())
    first = csr_file(tmp_path / "a.csr", key=key)
    enroll(mesh_dir, "gpu-4", "acme", out, "/p", force=True, csr=first)
    assert not (out / "node.key").exists()           # it was the replaced certificate's key
    for node in ("gpu-4", "gpu-5"):                   # the same key again, by any name
        with pytest.raises(cli.UsageError, match="was certified before \\(node gpu-4\\)"):
            enroll(mesh_dir, node, "acme", tmp_path / node, "/p", force=True,
                   csr=csr_file(tmp_path / "b.csr", key=key, der=True))
    mesh_key = pki.load_cert(tmp_path / "out" / "node.pem")           # fine: a new key
    enroll(mesh_dir, "gpu-4", "acme", out, "/p", force=True,
           csr=csr_file(tmp_path / "c.csr"))
    ledger = json.loads(Layout(mesh_dir).ledger.read_text())["nodes"]["gpu-4"]
    assert len(ledger["previous_keys"]) == 2 and mesh_key


def test_a_revoked_node_is_enrolled_with_a_certificate_that_starts_after_the_revocation(
        mesh_dir: Path, tmp_path: Path):
    enroll(mesh_dir, "gpu-6", "acme", tmp_path / "before", "/p")    # no store yet: fine
    store = open_store(load(Layout(mesh_dir).config).store)
    at = int(time.time()) - 10 + 0.25                 # pki backdates 300 s: this is later
    revoked_at = store.revoke_node("gpu-6", "stolen", "op", at, unknown_ok=True)
    store.close()
    result = enroll(mesh_dir, "gpu-6", "acme", tmp_path / "after", "/p", force=True)
    cert = pki.load_cert(tmp_path / "after" / "node.pem")
    old = pki.load_cert(tmp_path / "before" / "node.pem")
    assert from_pem(pki.cert_pem(cert)).not_before == int(at) + 1
    assert from_pem(pki.cert_pem(old)).not_before <= revoked_at["revoked_at"]
    assert result["revoked_at"] == revoked_at["revoked_at"]
    store = open_store(load(Layout(mesh_dir).config).store)          # a clock far ahead
    store.revoke_node("gpu-6", "", "op", time.time() + 86400 * 1000, unknown_ok=True)
    store.close()
    with pytest.raises(cli.UsageError, match="in the future of this machine's clock"):
        enroll(mesh_dir, "gpu-6", "acme", tmp_path / "later", "/p", force=True)


def test_enrolment_with_the_store_down_is_one_sentence_and_writes_nothing(mesh_dir: Path,
                                                                         tmp_path: Path):
    cfg = Layout(mesh_dir).config
    cfg.write_text(cfg.read_text().replace(
        load(cfg).store, f"postgresql:///mesh?host={tmp_path}/nowhere&user=postgres"))
    with pytest.raises(cli.UsageError, match="cannot read gpu-7's revocations.*cannot connect"):
        enroll(mesh_dir, "gpu-7", "acme", tmp_path / "out", "/p")
    assert not (tmp_path / "out").exists()


def test_mesh_csr_never_overwrites_a_key_without_force(tmp_path: Path, capsys):
    d = tmp_path / "m"
    assert agent_main.main(["mesh-csr", "--out", str(d), "--node", "gpu-8", "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    key = Path(made["key"]).read_bytes()
    assert agent_main.main(["mesh-csr", "--out", str(d)]) == 2
    assert "node.key exists" in capsys.readouterr().err and Path(made["key"]).read_bytes() == key
    assert agent_main.main(["mesh-csr", "--out", str(d), "--force"]) == 0
    assert Path(made["key"]).read_bytes() != key
    assert stat.S_IMODE(os.stat(made["key"]).st_mode) == 0o600
    csr = x509.load_pem_x509_csr(Path(made["csr"]).read_bytes())
    assert csr.is_signature_valid and not list(tmp_path.glob("m/*.tmp"))
