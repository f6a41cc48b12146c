"""`swarm-mesh init` and `swarm-mesh enroll` (mesh/setup.py, mesh/enroll.py, mesh/pki.py):
the files and their modes, idempotence, refusals, and the certificates checked with
`cryptography` (subject, extensions, the chain to the CA). Everything in tmp_path."""
from __future__ import annotations

import grp
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent import config as agent_config
from agent.fleet.decision import load_private_key, load_public_key
from mesh import cli, pki
from mesh.config import MeshConfigError, from_dict, load
from mesh.decide import Decider
from mesh.enroll import enroll
from mesh.cli import UsageError
from mesh.setup import SERVICE_READS, Layout, init_mesh, share_with_group

REPO = Path(__file__).resolve().parents[2]
NAMES = ["mesh.example", "203.0.113.5"]


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def make(tmp: Path, **kw):
    kw.setdefault("names", NAMES)
    kw.setdefault("listen", "0.0.0.0:7443")
    kw.setdefault("nats_listen", "0.0.0.0:4222")
    kw.setdefault("state", tmp / "state")
    return init_mesh(tmp / "mesh", **kw)


def swarm_mesh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mesh", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_init_makes_every_file_with_its_mode_and_a_config_that_loads(tmp_path: Path):
    steps, names = make(tmp_path)
    lay = Layout(tmp_path / "mesh")
    assert all(s.made for s in steps) and len(steps) == 10
    assert mode(lay.dir) == 0o700 and mode(lay.nats_dir) == 0o700
    for secret in (lay.ca_key, lay.key, lay.signing_key, lay.nats_conf, lay.mesh_password,
                   lay.node_password):
        assert mode(secret) == 0o600, secret
    assert names == [*NAMES, "localhost", "127.0.0.1", "::1"]

    cfg = load(lay.config)
    assert (cfg.listen, cfg.store) == ("0.0.0.0:7443", f"sqlite:///{tmp_path / 'state/mesh.db'}")
    cfg.require_tls()
    assert cfg.nats == {"url": "tls://127.0.0.1:4222", "user": "mesh",
                        "password_file": str(lay.mesh_password), "tls_ca": str(lay.ca_cert)}
    assert cfg.nats_server.config == str(lay.nats_conf) and cfg.nats_server.log_file is None
    assert cfg.policy == {}                     # every default shown, commented out
    assert "# min_nodes: 3" in lay.config.read_text()
    # The decision lock lives in the state directory: a sandboxed service writes only there.
    assert cfg.signing["lock_file"] == str(tmp_path / "state/decisions.lock")
    Decider.from_config(None, cfg.nats, cfg.signing, cfg.policy)     # signing key, policy ok

    conf = lay.nats_conf.read_text()
    assert 'listen: "0.0.0.0:4222"' in conf and str(tmp_path / "state/jetstream") in conf
    assert f'cert_file: "{lay.cert}"' in conf and "verify" not in conf   # passwords, not certs
    assert 'user: "mesh"' in conf and 'user: "node"' in conf
    assert load_private_key(lay.signing_key) and load_public_key(lay.signing_pub)


def test_init_group_shares_what_the_service_reads_and_not_the_ca_key(tmp_path: Path):
    """--group (the packaged service's): the service's group reads its config, keys and
    nats files but owns none of them; the CA key, node password and ledger stay private."""
    group = grp.getgrgid(os.getgid() if os.getgid() else 1)     # root: daemon (gid 1)
    lay = Layout(tmp_path / "mesh")
    make(tmp_path)
    share_with_group(lay, group.gr_name)
    for d in (lay.dir, lay.nats_dir):
        assert (mode(d), d.stat().st_gid) == (0o750, group.gr_gid), d
    for name in SERVICE_READS:
        path = getattr(lay, name)
        assert (mode(path), path.stat().st_gid) == (0o640, group.gr_gid), path
        assert path.stat().st_uid == os.getuid()
    assert mode(lay.ca_key) == 0o600 and mode(lay.node_password) == 0o600
    with pytest.raises(UsageError, match="no such group"):
        share_with_group(lay, "no-such-group-swarm")
    out = swarm_mesh("init", "--dir", str(lay.dir), "--state-dir", str(tmp_path / "state"),
                     "--name", "mesh.example", "--group", group.gr_name)
    assert out.returncode == 0 and mode(lay.config) == 0o640, out.stderr


def test_the_ca_and_the_server_certificate(tmp_path: Path):
    make(tmp_path)
    lay = Layout(tmp_path / "mesh")
    ca, srv = pki.load_cert(lay.ca_cert), pki.load_cert(lay.cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (ca.not_valid_after - ca.not_valid_before).days >= 3650
    assert 729 <= (srv.not_valid_after - srv.not_valid_before).days <= 731
    assert pki.signed_by(srv, ca) and not pki.signed_by(ca, srv)
    assert isinstance(srv.public_key(), ec.EllipticCurvePublicKey)
    eku = srv.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mesh.example", "localhost"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == \
        ["203.0.113.5", "127.0.0.1", "::1"]
    pki.load_authority(lay.ca_cert, lay.ca_key)         # the key is the CA's
    with pytest.raises(pki.PkiError, match="is not the key of"):
        pki.load_authority(lay.ca_cert, lay.key)


def test_a_second_init_keeps_everything_and_fills_gaps(tmp_path: Path):
    make(tmp_path)
    lay = Layout(tmp_path / "mesh")
    before = {p: p.read_bytes() for p in lay.dir.rglob("*") if p.is_file()}
    lay.signing_pub.unlink()
    steps, names = make(tmp_path, names=["other.example"], listen="0.0.0.0:9999")
    made = [s.path for s in steps if s.made]
    assert made == [lay.signing_pub]                    # rebuilt from the private key
    after = {p: p.read_bytes() for p in lay.dir.rglob("*") if p.is_file()}
    assert after == before
    assert names[0] == "mesh.example"                   # the kept certificate's names


def test_init_refuses_half_pairs_and_bad_input(tmp_path: Path):
    make(tmp_path)
    lay = Layout(tmp_path / "mesh")
    lay.ca_key.rename(tmp_path / "away.key")
    with pytest.raises(cli.UsageError, match="ca.pem exists without .*ca.key"):
        make(tmp_path)
    (tmp_path / "away.key").rename(lay.ca_key)
    lay.mesh_password.unlink()
    with pytest.raises(cli.UsageError, match="nats.conf exists but mesh.password does not"):
        make(tmp_path)
    with pytest.raises(cli.UsageError, match="neither an IP address nor a DNS name"):
        make(tmp_path / "b", names=["bad name;"])
    with pytest.raises(MeshConfigError, match="listen must be host:port"):
        make(tmp_path / "c", listen="7443")


def test_init_from_the_command_line_json_and_errors(tmp_path: Path):
    args = ["init", "--dir", str(tmp_path / "m"), "--state-dir", str(tmp_path / "s"),
            "--name", "127.0.0.1", "--json"]
    first = swarm_mesh(*args)
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)
    assert all(f["made"] for f in out["files"]) and out["names"][0] == "127.0.0.1"
    second = json.loads(swarm_mesh(*args).stdout)
    assert not any(f["made"] for f in second["files"])
    human = swarm_mesh(*args[:-1]).stdout
    assert human.count("kept") == 10 and "swarm-mesh run --config" in human
    bad = swarm_mesh("init", "--dir", str(tmp_path / "x"), "--name", "a b")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


# ---- enroll
@pytest.fixture
def mesh_dir(tmp_path: Path) -> Path:
    make(tmp_path, nats_listen="0.0.0.0:14222", listen="0.0.0.0:17443")
    return tmp_path / "mesh"


def test_enroll_writes_the_nodes_files_and_a_certificate_naming_node_and_provider(
        mesh_dir: Path, tmp_path: Path):
    out = tmp_path / "gpu-1"
    result = enroll(mesh_dir, "gpu-1", "acme", out, "/etc/swarm-agent/mesh")
    lay = Layout(mesh_dir)
    assert mode(out) == 0o700 and mode(out / "node.key") == 0o600
    assert mode(out / "nats.password") == 0o600
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["node.pem", "node.key", "ca.pem", "decisions.pub", "nats.password", "agent-fleet.yaml"])
    assert (out / "ca.pem").read_bytes() == lay.ca_cert.read_bytes()
    assert (out / "decisions.pub").read_bytes() == lay.signing_pub.read_bytes()
    assert (out / "nats.password").read_bytes() == lay.node_password.read_bytes()

    cert = pki.load_cert(out / "node.pem")
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gpu-1"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "acme"
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == \
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert pki.signed_by(cert, pki.load_cert(lay.ca_cert))
    from cryptography.hazmat.primitives import serialization
    key = serialization.load_pem_private_key((out / "node.key").read_bytes(), None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    from mesh.identity import from_pem
    assert (from_pem(cert.public_bytes(serialization.Encoding.PEM)).node,
            from_pem(cert.public_bytes(serialization.Encoding.PEM)).provider) == ("gpu-1", "acme")

    ledger = json.loads(lay.ledger.read_text())["nodes"]
    assert ledger["gpu-1"]["provider"] == "acme" and mode(lay.ledger) == 0o600
    assert ledger["gpu-1"]["serial"] == format(cert.serial_number, "x") == result["serial"]

    text = (out / "agent-fleet.yaml").read_text()
    assert 'endpoint: "mesh.example:17443"' in text and 'server_name: "mesh.example"' in text
    assert 'nats_url: "tls://mesh.example:14222"' in text
    assert 'tls_cert: "/etc/swarm-agent/mesh/node.pem"' in text
    assert "#   mesh: [203.0.113.5/32]" in text


def test_the_agent_config_lines_load_in_the_agent(mesh_dir: Path, tmp_path: Path):
    out = tmp_path / "n"
    enroll(mesh_dir, "gpu-2", "acme", out, str(out))     # the files where they are here
    cfg = agent_config.load(out / "agent-fleet.yaml")
    assert (cfg.mesh.node_id, cfg.mesh.tls_cert, cfg.mesh.endpoint) == \
        ("gpu-2", str(out / "node.pem"), "mesh.example:17443")
    assert (cfg.fleet.user, cfg.fleet.password_file, cfg.fleet.keys) == \
        ("node", str(out / "nats.password"), (str(out / "decisions.pub"),))
    assert cfg.fleet.enabled and cfg.fleet.proposing(cfg.mesh.endpoint)


def test_enroll_refuses_unsafe_names_reuse_and_a_non_empty_out(mesh_dir: Path, tmp_path: Path):
    for node, provider in (("../etc", "acme"), ("a b", "acme"), ("", "acme"), ("-x", "acme"),
                           ("n" * 64, "acme"), ("gpu", "ac/me"), ("gpu", "acme\n")):
        with pytest.raises(cli.UsageError, match="is not a safe name"):
            enroll(mesh_dir, node, provider, tmp_path / "o", "/p")
    assert not (tmp_path / "o").exists()
    enroll(mesh_dir, "gpu-3", "acme", tmp_path / "a", "/p")
    first = (tmp_path / "a" / "node.pem").read_bytes()
    with pytest.raises(cli.UsageError, match="gpu-3 was enrolled .* for provider acme"):
        enroll(mesh_dir, "gpu-3", "other", tmp_path / "b", "/p")
    assert not (tmp_path / "b").exists()
    with pytest.raises(cli.UsageError, match="is not empty"):
        enroll(mesh_dir, "gpu-4", "acme", tmp_path / "a", "/p")
    enroll(mesh_dir, "gpu-3", "other", tmp_path / "a", "/p", force=True)
    again = pki.load_cert(tmp_path / "a" / "node.pem")
    assert (tmp_path / "a" / "node.pem").read_bytes() != first
    assert again.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "other"
    assert json.loads(Layout(mesh_dir).ledger.read_text())["nodes"]["gpu-3"]["provider"] == "other"
    with pytest.raises(cli.UsageError, match="run swarm-mesh init"):
        enroll(tmp_path / "nowhere", "gpu-5", "acme", tmp_path / "c", "/p")


def test_enroll_from_the_command_line(mesh_dir: Path, tmp_path: Path):
    r = swarm_mesh("enroll", "gpu-6", "--provider", "acme", "--dir", str(mesh_dir), "--out",
                   str(tmp_path / "g6"), "--endpoint", "10.9.8.7:443", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["endpoint"], out["server_name"], out["nats_url"]) == \
        ("10.9.8.7:443", "10.9.8.7", "tls://mesh.example:14222")
    bad = swarm_mesh("enroll", "gpu;6", "--provider", "acme", "--dir", str(mesh_dir), "--out",
                     str(tmp_path / "g7"))
    assert bad.returncode == 2 and "not a safe name" in bad.stderr and "Traceback" not in bad.stderr


# ---- the nats.server setting
def test_nats_server_is_kept_apart_from_how_the_service_connects():
    cfg = from_dict({"nats": {"url": "nats://127.0.0.1:4222",
                              "server": {"config": "/x/nats.conf", "log_file": "/x/nats.log"}}})
    assert cfg.nats == {"url": "nats://127.0.0.1:4222"}
    assert (cfg.nats_server.config, cfg.nats_server.binary, cfg.nats_server.log_file) == \
        ("/x/nats.conf", "nats-server", "/x/nats.log")
    assert from_dict({"nats": {"url": "nats://h:1"}}).nats_server is None
    for server, needle in (("yes", "nats.server must be a mapping"),
                           ({}, "nats.server needs config"),
                           ({"config": "/c", "bin": "x"}, "unknown config key nats.server.bin"),
                           ({"config": ""}, "nats.server.config must be a non-empty string")):
        with pytest.raises(MeshConfigError, match=needle):
            from_dict({"nats": {"server": server}})


def test_the_example_mesh_config_is_true_to_the_code():
    """packaging/mesh.yaml loads, names every key, and its policy is the defaults."""
    from mesh.config import MeshConfig
    from mesh.policy import PolicyConfig, defaults
    from mesh.publish import NatsOptions
    path = REPO / "packaging" / "mesh.yaml"
    cfg = load(path)
    text = path.read_text()
    for key in set(MeshConfig.__dataclass_fields__) - {"path", "nats_server"}:
        assert f"\n{key}:" in text, key
    for key in [*NatsOptions.__dataclass_fields__, "server", "config", "binary", "log_file",
                "private_key", "lock_file", *defaults()]:
        assert f" {key}:" in text, key
    assert PolicyConfig.from_dict(cfg.policy) == PolicyConfig.from_dict({})
    assert NatsOptions.from_dict(cfg.nats).url == "tls://127.0.0.1:4222"
    assert cfg.nats_server is not None and cfg.store == "sqlite:///var/lib/swarm-mesh/mesh.db"
    assert (cfg.node_stale_s, cfg.report_ids_keep_s, cfg.max_message_bytes) == (
        MeshConfig.node_stale_s, MeshConfig.report_ids_keep_s, MeshConfig.max_message_bytes)
