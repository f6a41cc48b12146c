"""The authorization matrix over the TCP listener (mutual TLS, loopback only): no client
certificate, one from another CA or an expired one is refused by the handshake, and the
CLI says why with exit 5; a viewer reads and gets PERMISSION_DENIED (audited) when it
acts; an operator acts; an unlisted identity gets nothing. The identity is the subject CN
and nothing else: a SAN naming an operator gives no role, a second CN is refused.
Certificates are made with openssl for each test run.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from agent.proto.swarm.control.v1 import control_pb2 as pb
from agent.proto.swarm.control.v1 import control_pb2_grpc
from tests.conftest import skip_unsupported
from tests.integration.test_control_api import Served, code_of, make_cfg

Code = grpc.StatusCode


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-days", "2", "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.pem",
             cwd=d)


def _leaf(d: Path, ca: str, name: str, cn: str, san: str, days: int = 2) -> None:
    """A certificate signed by `ca`; `cn` may be a whole subject ("/CN=a/CN=b");
    days=-1 makes one that expired yesterday."""
    subject = cn if cn.startswith("/") else f"/CN={cn}"
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-subj", subject, "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", str(days), "-extfile", f"{name}.ext", "-out",
             f"{name}.pem", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, the agent's certificate (127.0.0.1), clients viewer/operator/stranger, and a
    client signed by an unrelated CA."""
    if shutil.which("openssl") is None:
        skip_unsupported("needs the openssl command")
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "rogue-ca")
    _leaf(d, "ca", "server", "agent", "IP:127.0.0.1,DNS:localhost")
    _leaf(d, "ca", "viewer", "viewer.example", "DNS:viewer.example")
    _leaf(d, "ca", "operator", "ops.example", "DNS:ops-host.example")
    _leaf(d, "ca", "stranger", "stranger.example", "DNS:stranger.example")
    _leaf(d, "rogue-ca", "rogue", "ops.example", "DNS:ops.example")
    # One field only: the SAN naming an operator counts for nothing.
    _leaf(d, "ca", "viewer-san-op", "viewer.example", "DNS:ops.example")
    _leaf(d, "ca", "san-op", "someone", "DNS:ops.example,URI:spiffe://x/ops.example")
    _leaf(d, "ca", "two-cns", "/CN=viewer.example/CN=ops.example", "DNS:viewer.example")
    _leaf(d, "ca", "expired", "ops.example", "DNS:ops.example", days=-1)
    return d


@pytest.fixture
def tls_served(tmp_path, pki):
    s = Served(make_cfg(tmp_path, listen="127.0.0.1:0", tls_cert=str(pki / "server.pem"),
                        tls_key=str(pki / "server.key"), tls_ca=str(pki / "ca.pem"),
                        viewers=("viewer.example",), operators=("ops.example",)))
    yield s
    s.close()


def _stub(s: Served, pki: Path, client: str | None) -> tuple[grpc.Channel, control_pb2_grpc.ControlStub]:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(),
        private_key=(pki / f"{client}.key").read_bytes() if client else None,
        certificate_chain=(pki / f"{client}.pem").read_bytes() if client else None)
    ch = grpc.secure_channel(f"127.0.0.1:{s.server.tcp_port}", creds)
    return ch, control_pb2_grpc.ControlStub(ch)


BLOCK = pb.ApplyMitigationRequest(target="198.51.100.20", ttl_s=60)


@pytest.mark.parametrize("client", [None, "rogue", "expired"])
def test_tcp_refuses_clients_without_a_valid_certificate(tls_served, pki, client):
    ch, stub = _stub(tls_served, pki, client)
    with ch:
        code, _ = code_of(lambda: stub.GetStatus(pb.GetStatusRequest(), timeout=5))
    assert code is Code.UNAVAILABLE   # the TLS handshake fails: no call is made
    assert tls_served.agent.store.audit() == []


def test_viewer_reads_and_may_not_act(tls_served, pki):
    ch, stub = _stub(tls_served, pki, "viewer")
    with ch:
        assert stub.GetStatus(pb.GetStatusRequest(), timeout=10).ready
        assert not stub.ListMitigations(pb.ListMitigationsRequest(), timeout=10).mitigations
        code, details = code_of(lambda: stub.ApplyMitigation(BLOCK, timeout=10))
        assert code is Code.PERMISSION_DENIED and "operator" in details
    assert tls_served.agent.store.mitigations() == []
    [entry] = tls_served.agent.store.audit()
    assert (entry["identity"], entry["role"], entry["method"], entry["result"]) == \
        ("viewer.example", "viewer", "ApplyMitigation", "PERMISSION_DENIED")
    assert entry["arguments"]["target"] == "198.51.100.20"


def test_operator_acts(tls_served, pki):
    ch, stub = _stub(tls_served, pki, "operator")
    with ch:
        m = stub.ApplyMitigation(BLOCK, timeout=10)
        assert m.state == "active"
        audit = stub.ListAudit(pb.ListAuditRequest(), timeout=10).entries
    assert [(e.identity, e.role, e.result) for e in audit] == [("ops.example", "operator", "OK")]


def test_rules_viewer_lists_operator_reloads(tls_served, pki):
    ch, stub = _stub(tls_served, pki, "viewer")
    with ch:
        listed = stub.ListRules(pb.ListRulesRequest(), timeout=10)
        assert listed.rules and listed.ruleset.version.startswith("sha256:")
        code, details = code_of(lambda: stub.ReloadRules(pb.ReloadRulesRequest(), timeout=10))
        assert code is Code.PERMISSION_DENIED and "operator" in details
    assert tls_served.agent.rulebook.reloads == 0
    ch, stub = _stub(tls_served, pki, "operator")
    with ch:
        done = stub.ReloadRules(pb.ReloadRulesRequest(), timeout=10)
        assert done.ruleset_version == listed.ruleset.version and not done.changed
    assert [(e["identity"], e["method"], e["result"]) for e in tls_served.agent.store.audit()
            if e["method"] == "ReloadRules"] == [("ops.example", "ReloadRules", "OK"),
                                                  ("viewer.example", "ReloadRules",
                                                   "PERMISSION_DENIED")]


@pytest.mark.parametrize("client, why", [
    ("stranger", "CN 'stranger.example' is not listed"),
    ("san-op", "CN 'someone' is not listed"),
    ("two-cns", "has 2 Common Names"),
])
def test_unlisted_identity_gets_nothing(tls_served, pki, client, why):
    ch, stub = _stub(tls_served, pki, client)
    with ch:
        code, details = code_of(lambda: stub.GetStatus(pb.GetStatusRequest(), timeout=10))
        assert code is Code.PERMISSION_DENIED and why in details
        code, _ = code_of(lambda: stub.ApplyMitigation(BLOCK, timeout=10))
        assert code is Code.PERMISSION_DENIED
    assert tls_served.agent.store.mitigations() == []
    assert {(e["role"], e["result"]) for e in tls_served.agent.store.audit()} == \
        {("none", "PERMISSION_DENIED")}


def test_cn_viewer_with_an_operator_san_is_a_viewer(tls_served, pki):
    ch, stub = _stub(tls_served, pki, "viewer-san-op")
    with ch:
        assert stub.GetStatus(pb.GetStatusRequest(), timeout=10).ready
        code, details = code_of(lambda: stub.ApplyMitigation(BLOCK, timeout=10))
    assert code is Code.PERMISSION_DENIED and "viewer.example (viewer)" in details
    assert [(e["identity"], e["role"]) for e in tls_served.agent.store.audit()] == \
        [("viewer.example", "viewer")]


def test_cli_remote(tls_served, pki, tmp_path):
    base = [sys.executable, "-m", "agent.cli.main"]
    remote = ["--remote", f"127.0.0.1:{tls_served.server.tcp_port}", "--ca", str(pki / "ca.pem")]

    def cli(client: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *args, *remote, "--cert", str(pki / f"{client}.pem"),
                               "--key", str(pki / f"{client}.key")],
                              capture_output=True, text=True, timeout=60)

    denied = cli("viewer", "block", "198.51.100.21")
    assert denied.returncode == 5 and "may not call ApplyMitigation" in denied.stderr
    done = cli("operator", "block", "198.51.100.21", "--ttl", "30", "--json")
    assert done.returncode == 0, done.stderr
    assert '"target": "198.51.100.21"' in done.stdout
    missing = subprocess.run([*base, "status", *remote], capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode == 2 and "--remote needs --cert, --key" in missing.stderr


@pytest.mark.parametrize("client, ca, why", [
    ("rogue", "ca", "the agent refused the client certificate: it is not signed by the CA "
                    "in --ca (unknown issuer)"),
    ("expired", "ca", "the agent refused the client certificate: it has expired"),
    ("operator", "rogue-ca", "the agent's certificate failed verification against --ca"),
    ("stranger", "ca", "the client certificate's CN 'stranger.example' is not listed in "
                       "control.viewers or control.operators"),
])
def test_cli_tls_failures_are_permission_denied_with_the_reason(tls_served, pki, client, ca,
                                                                why):
    done = subprocess.run([sys.executable, "-m", "agent.cli.main", "block", "198.51.100.22",
                           "--remote", f"127.0.0.1:{tls_served.server.tcp_port}",
                           "--ca", str(pki / f"{ca}.pem"), "--cert", str(pki / f"{client}.pem"),
                           "--key", str(pki / f"{client}.key")],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (5, ""), done.stderr
    assert done.stderr.startswith("swarm-agent: permission denied: " + why)
    assert done.stderr.count("\n") == 1, done.stderr    # one sentence, no gRPC log lines
    assert tls_served.agent.store.mitigations() == []


def test_gpu_authorizations_viewer_lists_operator_authorizes(tls_served, pki):
    """GPU authorization (agent.gpuguard): a viewer lists, and is refused (audited) when
    it authorizes or revokes; an operator authorizes."""
    from agent.gpuguard import GpuGuard

    agent = tls_served.agent
    agent.gpu_guard = GpuGuard(agent.cfg, agent.store, lambda policy: None, lambda e: None)
    ask = pb.AuthorizeGpuRequest(workload="/kubepods.slice/pod-1", gpus=["0"], job="j1")
    ch, stub = _stub(tls_served, pki, "viewer")
    with ch:
        assert not stub.ListGpuAuthorizations(pb.ListGpuAuthorizationsRequest(),
                                              timeout=10).authorizations
        for call, req in ((stub.AuthorizeGpu, ask),
                          (stub.RevokeGpu, pb.RevokeGpuRequest(workload="/kubepods.slice/pod-1"))):
            code, details = code_of(lambda: call(req, timeout=10))
            assert code is Code.PERMISSION_DENIED and "operator" in details
    assert agent.gpu_guard.listing() == []
    ch, stub = _stub(tls_served, pki, "operator")
    with ch:
        [a] = stub.AuthorizeGpu(ask, timeout=10).authorizations
        assert (a.workload, a.gpu, a.source, a.job, a.by) == \
            ("/kubepods.slice/pod-1", "0", "api", "j1", "ops.example")
    assert [(e["identity"], e["method"], e["result"]) for e in agent.store.audit()] == [
        ("ops.example", "AuthorizeGpu", "OK"),
        ("viewer.example", "RevokeGpu", "PERMISSION_DENIED"),
        ("viewer.example", "AuthorizeGpu", "PERMISSION_DENIED")]
