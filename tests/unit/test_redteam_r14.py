"""Red team r14: the node identity lifecycle (node revocation, CSR enrolment, the packaged
launcher, the mesh's metrics). test_finding_* fail while the weakness is there;
test_holds_* are attacks the code withstands. Everything in tmp_path (a throwaway
PostgreSQL for the one race that needs a real server's locking, tests/pgcluster.py)."""
from __future__ import annotations

import ast
import json
import os
import socket
import threading
import time
from pathlib import Path

import psycopg2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import generate_latest

from agent.proto.swarm.mesh.v1 import mesh_pb2
from mesh import cli, csr as csrs
from mesh.enroll import enroll
from mesh.metrics import MeshMetrics
from mesh.revocation import NodeRevoked
from mesh.setup import Layout, init_mesh
from mesh.store import open_store
from tests.pgcluster import pg_cluster, pg_url  # noqa: F401  (fixtures)

T0 = 1_800_000_000.0
NOBODY = 65534
LAUNCHER = Path(__file__).resolve().parents[2] / "packaging" / "swarm-mesh"


@pytest.fixture
def mesh_dir(tmp_path: Path) -> Path:
    init_mesh(tmp_path / "mesh", ["mesh.example"], "0.0.0.0:17443", "0.0.0.0:14222",
              tmp_path / "state")
    return tmp_path / "mesh"


def csr_der(key=None, cn: str = "gpu-1") -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(b)]) + b


def _tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(body)) + body


def hostile_csr(change) -> bytes:
    """A CSR whose request info `change(tbs)` altered, signed again with its own key: its
    signature verifies, so only the parser stands between it and the operator."""
    key = ec.generate_private_key(ec.SECP256R1())
    tbs = x509.load_der_x509_csr(csr_der(key, "AAAA")).tbs_certrequest_bytes
    tbs = change(tbs)
    sig = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    ecdsa_sha256 = _tlv(0x30, _tlv(0x06, bytes.fromhex("2a8648ce3d040302")))
    return _tlv(0x30, tbs + ecdsa_sha256 + _tlv(0x03, b"\x00" + sig))


# ---- a hostile node's CSR
@pytest.mark.parametrize("what,change", [
    ("version 2", lambda tbs: tbs.replace(b"\x02\x01\x00", b"\x02\x01\x01", 1)),
    ("a CN that is not UTF-8", lambda tbs: tbs.replace(b"\x0c\x04AAAA", b"\x0c\x04\xff\xfe\xc0\x80")),
    ("a CN as an OCTET STRING", lambda tbs: tbs.replace(b"\x0c\x04AAAA", b"\x04\x04AAAA")),
])
def test_finding_a_malformed_csr_is_an_unexpected_failure_not_one_sentence(
        mesh_dir: Path, tmp_path: Path, capsys, what: str, change):
    """csr.parse catches ValueError/TypeError/UnsupportedAlgorithm, but cryptography (38,
    Debian 12's) raises x509.InvalidVersion and exceptions.InternalError (an OpenSSL error
    stack) for these: `swarm-mesh enroll --csr` ends in "unexpected failure", exit 1,
    with OpenSSL's text, instead of the one sentence every other bad CSR gets."""
    path = tmp_path / "hostile.csr"
    path.write_bytes(hostile_csr(change))
    with pytest.raises(SystemExit) as e:
        cli.main(["enroll", "gpu-1", "--provider", "acme", "--dir", str(mesh_dir),
                  "--out", str(tmp_path / "out"), "--csr", str(path)])
    err = capsys.readouterr().err
    assert e.value.code == cli.EXIT_USAGE and "unexpected failure" not in err, \
        f"a CSR with {what}: exit {e.value.code}: {err.strip()[:200]}"


def test_finding_a_fifo_as_the_csr_hangs_enroll(tmp_path: Path):
    """mesh/csr.py says a FIFO is refused without being read further; open() of a FIFO
    blocks until some writer opens it, so a FIFO planted where the operator expects the
    node's CSR (a shared upload directory) hangs `swarm-mesh enroll` forever."""
    fifo = tmp_path / "node.csr"
    os.mkfifo(fifo)
    got: list = []

    def read() -> None:
        try:
            got.append(csrs.read(fifo))
        except csrs.CsrError as e:
            got.append(e)
    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(1.0)
    hung = t.is_alive()
    if hung:                      # let the reader go: a writer that closes at once is EOF
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(5.0)
    assert not hung, "csr.read() of a FIFO was still blocked in open() after 1 s"


def test_finding_a_key_certified_long_ago_can_be_certified_again(mesh_dir: Path, tmp_path: Path):
    """"A key is certified once": the ledger keeps only the last PREVIOUS_KEYS_MAX (100)
    key ids of a node, so the key of its first certificate (say stolen, then revoked) is
    forgotten after 100 more enrolments and a CSR for it is certified again. The 100
    enrolments are written into the ledger directly (ids of keys that do not matter)."""
    old = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "old.csr").write_bytes(csr_der(old))
    enroll(mesh_dir, "gpu-1", "acme", tmp_path / "o1", "/p", csr=tmp_path / "old.csr")
    lay = Layout(mesh_dir)
    ledger = json.loads(lay.ledger.read_text())
    rec = ledger["nodes"]["gpu-1"]
    rec["previous_keys"] = [rec["key_sha256"]] + [f"{i:064x}" for i in range(99)]
    rec["key_sha256"] = f"{999:064x}"
    lay.ledger.write_text(json.dumps(ledger))
    (tmp_path / "new.csr").write_bytes(csr_der())
    enroll(mesh_dir, "gpu-1", "acme", tmp_path / "o2", "/p", force=True,
           csr=tmp_path / "new.csr")
    (tmp_path / "again.csr").write_bytes(csr_der(old))
    with pytest.raises(cli.UsageError, match="certified before"):
        enroll(mesh_dir, "gpu-1", "acme", tmp_path / "o3", "/p", force=True,
               csr=tmp_path / "again.csr")


def test_holds_a_csr_for_a_revoked_nodes_old_key_is_refused(mesh_dir: Path, tmp_path: Path):
    """The thief has the old key: the operator re-enrolling the node from a CSR made with
    it (or the thief sending one under another node's name) is refused."""
    old = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "old.csr").write_bytes(csr_der(old))
    enroll(mesh_dir, "gpu-1", "acme", tmp_path / "o1", "/p", csr=tmp_path / "old.csr")
    (tmp_path / "thief.csr").write_bytes(csr_der(old, "gpu-2"))
    for node, force in (("gpu-1", True), ("gpu-2", False)):
        with pytest.raises(cli.UsageError, match="certified before"):
            enroll(mesh_dir, node, "acme", tmp_path / f"x-{node}", "/p", force=force,
                   csr=tmp_path / "thief.csr")


# ---- a local unprivileged user on the mesh host
def test_finding_enroll_writes_a_nodes_trust_files_into_a_directory_another_user_owns(
        mesh_dir: Path, tmp_path: Path):
    """`swarm-mesh enroll ... --out /tmp/gpu-1` (root, AS_ROOT in the launcher) takes an
    empty --out that a local user made beforehand and only chmods it 0700: the directory
    stays that user's, who can then rename away and replace ca.pem, decisions.pub and
    agent-fleet.yaml (their own NATS and decision key) before the operator copies them to
    the node. (The key files stay root's 0600, but the node's trust does not.)"""
    if os.geteuid() != 0:
        pytest.skip("needs root to give the directory to another user")
    out = tmp_path / "shared" / "gpu-1"
    out.mkdir(parents=True)
    os.chown(out, NOBODY, NOBODY)
    try:
        enroll(mesh_dir, "gpu-1", "acme", out, "/p")
    except cli.UsageError:
        return                               # refused: what the test asks for
    assert os.stat(out).st_uid == os.geteuid(), \
        f"enroll wrote decisions.pub and agent-fleet.yaml into {out}, owned by uid " \
        f"{os.stat(out).st_uid}, who may replace them"


def test_holds_metrics_name_no_node_and_no_reason(tmp_path: Path):
    """A local user can scrape 127.0.0.1:9465: it learns counts, never a node's name, a
    revocation's reason or a target."""
    store = open_store(f"sqlite:///{tmp_path}/mesh.db")
    try:
        store.record_reports("gpu-secret-17", "acme-secret", [], T0, T0 - 10)
        store.revoke_node("gpu-secret-17", "stolen from rack 4", "alice", T0 + 5)
        text = generate_latest(MeshMetrics(store, dict, clock=lambda: T0 + 6).registry).decode()
    finally:
        store.close()
    assert "swarm_mesh_nodes_revoked 1.0" in text
    for secret in ("gpu-secret", "acme-secret", "rack 4", "alice"):
        assert secret not in text


def _launcher_function(name: str):
    tree = ast.parse(LAUNCHER.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    ns: dict = {"os": os}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(LAUNCHER), "exec"), ns)
    return ns[name]


def test_holds_the_launcher_cannot_be_talked_into_root_by_an_argument_named_like_a_root_command():
    """Which command runs as root is the first word not starting with '-', and swarm-mesh
    has no global option taking a value: a node or target named "enroll" or "init" is an
    argument of a command that drops to the service user."""
    command = _launcher_function("command")
    assert command(["node-revoke", "enroll", "--force"]) == "node-revoke"
    assert command(["--version"]) is None
    assert command(["block", "init", "--reason", "enroll"]) == "block"


# ---- the careless operator and the race
def test_holds_revoking_a_names_other_spelling_is_refused_without_force(tmp_path: Path):
    """The node reported as gpu-1: revoking GPU-1, ' gpu-1' or gpu-1 with a homoglyph
    writes nothing (no silent revocation of nobody), and the real one stays working."""
    store = open_store(f"sqlite:///{tmp_path}/mesh.db")
    try:
        store.record_reports("gpu-1", "acme", [], T0, T0 - 10)
        for wrong in ("GPU-1", " gpu-1", "gpu-1 ", "gpu\u20111"):
            assert store.revoke_node(wrong, "", "op", T0 + 5) is None
        assert store.node_revoked_at("gpu-1") is None
    finally:
        store.close()


def _heartbeat(rid: str) -> mesh_pb2.Report:
    r = mesh_pb2.Report(id=rid, node_id="gpu-1", created_at=T0)
    r.heartbeat.CopyFrom(mesh_pb2.Heartbeat(seq=1, version="1.0"))
    return r


def test_finding_on_postgresql_a_batch_in_flight_is_stored_after_node_revoke_returned(
        pg_url: str):  # noqa: F811
    """Store.record_reports reads MAX(revoked_at) and then writes, under READ COMMITTED and
    with nothing the revocation's transaction also locks: a revocation that commits
    between the check and the batch's commit (here: while the batch waits on the nodes row,
    which a third connection holds; in service, a big batch's inserts) does not stop it.
    `swarm-mesh node-revoke` has returned, and the revoked certificate's reports are still
    stored after that (what the gate's docstring says cannot happen)."""
    store, revoker = open_store(pg_url), open_store(pg_url)
    holder, watcher = psycopg2.connect(pg_url), psycopg2.connect(pg_url)
    watcher.autocommit = True           # pg_stat_activity is a snapshot per transaction
    try:
        store.record_reports("gpu-1", "acme", [_heartbeat("r1")], T0, T0 - 10)
        with holder.cursor() as cur:
            cur.execute("SELECT 1 FROM nodes WHERE node = 'gpu-1' FOR UPDATE")
        result: list = []

        def batch() -> None:
            try:
                result.append(store.record_reports("gpu-1", "acme", [_heartbeat("r2")],
                                                   T0 + 1, T0 - 10))
            except NodeRevoked as e:
                result.append(e)
        t = threading.Thread(target=batch, daemon=True)
        t.start()
        deadline = time.monotonic() + 5
        with watcher.cursor() as cur:
            while time.monotonic() < deadline:
                cur.execute("SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = "
                            "'Lock' AND datname = current_database()")
                if cur.fetchone()[0]:
                    break
                time.sleep(0.02)
            else:
                pytest.fail("the batch never waited on the nodes row")
        revoker.revoke_node("gpu-1", "stolen", "op", T0 + 2)      # committed: node-revoke returns
        holder.rollback()
        t.join(5)
        assert result and isinstance(result[0], NodeRevoked), \
            f"the batch of a certificate revoked before the batch committed was stored: {result}"
    finally:
        holder.close()
        watcher.close()
        store.close()
        revoker.close()


def test_finding_a_revoked_nodes_old_key_sent_as_a_compressed_point_is_certified_again(
        mesh_dir: Path, tmp_path: Path):
    """"A key is certified once" compares csr.key_id, the SHA-256 of the key's DER
    SubjectPublicKeyInfo, and cryptography (38, OpenSSL) re-encodes a key in the point
    form it was read in: the very key of a revoked certificate, sent again as an X9.62
    compressed point, has another key id and is certified again. Whoever holds the stolen
    key and can put a CSR before the operator (swapping the node's own on its way) gets a
    working certificate for it."""
    old = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "old.csr").write_bytes(csr_der(old))
    enroll(mesh_dir, "gpu-1", "acme", tmp_path / "o1", "/p", csr=tmp_path / "old.csr")
    pub = old.public_key()
    plain = pub.public_bytes(serialization.Encoding.DER,
                             serialization.PublicFormat.SubjectPublicKeyInfo)
    alg = plain[2:2 + 2 + plain[3]]                 # the AlgorithmIdentifier SEQUENCE
    point = pub.public_bytes(serialization.Encoding.X962,
                             serialization.PublicFormat.CompressedPoint)
    compressed = _tlv(0x30, alg + _tlv(0x03, b"\x00" + point))

    def swap(tbs: bytes) -> bytes:
        body = tbs[2 + (tbs[1] & 0x7f if tbs[1] & 0x80 else 0):]
        return _tlv(0x30, body.replace(plain, compressed))
    key = old
    tbs = swap(x509.load_der_x509_csr(csr_der(old)).tbs_certrequest_bytes)
    sig = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    der = _tlv(0x30, tbs + _tlv(0x30, _tlv(0x06, bytes.fromhex("2a8648ce3d040302")))
               + _tlv(0x03, b"\x00" + sig))
    assert compressed in der
    (tmp_path / "c.csr").write_bytes(der)
    with pytest.raises(cli.UsageError, match="certified before"):
        enroll(mesh_dir, "gpu-1", "acme", tmp_path / "o2", "/p", force=True,
               csr=tmp_path / "c.csr")


def test_finding_idle_connections_to_the_metrics_port_pin_a_thread_each_without_bound(
        tmp_path: Path):
    """The metrics server (agent/report/promserve.py, the mesh's and the agent's) is a
    ThreadingMixIn WSGIServer with no request timeout: every connection that sends nothing
    holds a thread of the mesh service's process for as long as it stays open. Any local
    user (127.0.0.1:9465) opens thousands: the service runs into its task limit, and then
    asyncio.to_thread, which every Report and every revocation check uses, cannot start
    a thread."""
    store = open_store(f"sqlite:///{tmp_path}/mesh.db")
    metrics = MeshMetrics(store, dict)
    metrics.serve("127.0.0.1:0")
    socks: list[socket.socket] = []
    try:
        before = threading.active_count()
        for _ in range(8):        # 5 at a time: the listen backlog is 5 (no SYN retries)
            socks += [socket.create_connection(metrics.address, timeout=2) for _ in range(5)]
            deadline = time.monotonic() + 0.25     # a thread starts in milliseconds
            while time.monotonic() < deadline and \
                    threading.active_count() - before < len(socks):
                time.sleep(0.01)
        pinned = threading.active_count() - before
    finally:
        for s in socks:
            s.close()
        metrics.close()
        store.close()
    assert pinned < 32, f"40 idle connections hold {pinned} threads of the service"


def test_finding_a_root_shells_node_revoke_is_recorded_as_the_service_user():
    """The launcher drops every command but init/enroll/keygen/nats-config to the service
    user and sets USER and LOGNAME to it; operator_of() falls back to getpass.getuser(),
    which reads LOGNAME. From a root login (no sudo: SUDO_USER unset) `swarm-mesh
    node-revoke`, `block` and `revoke` record the service user as the operator: the audit
    trail of who revoked a node names no one. Run in a forked child as the launcher
    would (nobody standing in for swarm-mesh)."""
    if os.geteuid() != 0:
        pytest.skip("the privilege drop needs root")
    import argparse
    import pwd
    from mesh.fleetcmd import operator_of
    as_service_user = _launcher_function("as_service_user")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                    # the child: never returns to pytest
        try:
            os.close(r)
            os.environ.pop("SUDO_USER", None)
            os.environ.update(USER="root", LOGNAME="root")
            as_service_user(pwd.getpwuid(NOBODY))
            os.write(w, operator_of(argparse.Namespace(operator=None)).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        recorded = f.read().decode()
    os.waitpid(pid, 0)
    assert recorded == "root", f"root's node-revoke is recorded as operator {recorded!r}"


def test_finding_the_meshs_own_server_certificate_is_accepted_as_a_node(mesh_dir: Path):
    """mesh.pem carries clientAuth (for a NATS that verifies clients) and chains to the CA
    that the reporting API trusts for nodes; mesh/identity.py takes its CN and O as a
    node and provider ("mesh.example" of provider "swarm-mesh"). Whoever reads mesh.key
    (0640, group swarm-mesh: the service and its nats-server child) reports and votes as
    an extra provider no one enrolled, under a name no `enroll` ledger holds and that
    `node-revoke` only covers with --force."""
    from mesh.identity import IdentityError, from_pem
    pem = Layout(mesh_dir).cert.read_bytes()
    try:
        who = from_pem(pem)
    except IdentityError:
        return                                   # refused: what the test asks for
    pytest.fail(f"the mesh's server certificate identifies as node {who.node!r} of "
                f"provider {who.provider!r}")


def test_finding_a_postgresql_password_given_as_a_url_parameter_is_printed(tmp_path: Path,
                                                                          capsys):
    """libpq takes the password as ?password=... as well as user:password@; the store's
    messages hide only the second. `swarm-mesh enroll` or `node-revoke` while PostgreSQL is
    down prints the password (and the service logs it to the journal)."""
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text('store: "postgresql://mesh@127.0.0.1:1/mesh?password=hunter2'
                   '&connect_timeout=1"\n')
    with pytest.raises(SystemExit):
        cli.main(["node-revoke", "gpu-1", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert "cannot connect" in err and "hunter2" not in err, err


def test_finding_a_clock_stepped_back_lets_a_never_seen_certificate_outlive_its_revocation(
        mesh_dir: Path, tmp_path: Path):
    """revoke_node's time is max(now, previous revocation + 1, newest notBefore the service
    has seen). A certificate stolen from the enrolment's OUT directory before the node ever
    reported (or of a node "enrolled but never started", the case --force is for) is in
    none of those: after the mesh's clock stepped back (a VM snapshot restored, NTP
    correcting a fast clock) by more than the 300 s backdating, `node-revoke --force`
    writes a revocation before its notBefore, and the stolen certificate keeps working.
    The enrolment ledger (enrolled.json) knows that notBefore; node-revoke never reads it."""
    from mesh.identity import from_pem
    from mesh.revocation import covers
    enroll(mesh_dir, "gpu-1", "acme", tmp_path / "out", "/p")
    stolen = from_pem((tmp_path / "out" / "node.pem").read_bytes())
    store = open_store(load_store_url(mesh_dir))
    try:
        done = store.revoke_node("gpu-1", "stolen before install", "op",
                                 time.time() - 3600, unknown_ok=True)
    finally:
        store.close()
    assert covers(done["revoked_at"], stolen.not_before), \
        "the revocation is dated before the stolen certificate's notBefore"


def load_store_url(mesh_dir: Path) -> str:
    from mesh.config import load
    return load(Layout(mesh_dir).config).store
