"""One door to the control API: each unix socket the server listens on checks its caller.

The public socket refuses a uid it does not allow (SO_PEERCRED); gRPC's private socket
answers only the connections the front relayed, so a caller that reaches it directly,
root or nobody, is refused on every service and a refused act is audited as unverified.
Audit rows carry the caller's real uid. Clients run as uid 65534 with setpriv, with the
sockets' modes loosened so that only the credential checks stand in the way. Non-root
`run` and `cleanup` exit 5. Free text with escapes is refused at the API and printed
cleaned by the CLI.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from agent.control.server import private_socket
from agent.model import MitigationKind
from agent.proto.swarm.control.v1 import control_pb2 as pb
from agent.proto.swarm.control.v1 import control_pb2_grpc
from tests.integration.test_control_api import Served, _wait, code_of, make_cfg

pytestmark = pytest.mark.privileged
Code = grpc.StatusCode
NOBODY = 65534
CLI = [sys.executable, "-m", "agent.cli.main"]
BLOCK = pb.ApplyMitigationRequest(target="198.51.100.30", ttl_s=60, reason="door test")

# Debian's python and grpc only (the repository is not readable to nobody): calls one
# method with a serialized request given in hex; prints the status code's name.
RAW_CALL = """
import sys, grpc
sock, method, hexreq = sys.argv[1:4]
with grpc.insecure_channel("unix:" + sock) as ch:
    try:
        ch.unary_unary(method)(bytes.fromhex(hexreq), timeout=5)
        print("OK")
    except grpc.RpcError as e:
        print(e.code().name)
"""


def as_nobody(sock: Path, method: str, request: bytes = b"") -> str:
    done = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                           "--clear-groups", "/usr/bin/python3", "-c", RAW_CALL, str(sock),
                           method, request.hex()],
                          capture_output=True, text=True, timeout=30, cwd="/")
    assert done.stdout.strip(), done.stderr
    return done.stdout.strip()


@pytest.fixture
def open_served(tmp_path, setpriv):
    """A server whose run_dir, private directory and both sockets anyone may open, so
    only the credential checks refuse; the front allows `served.server.front.allowed_uids`."""
    open_dir = Path(tempfile.mkdtemp(prefix="swarm-door-"))
    os.chmod(open_dir, 0o755)
    s = Served(replace(make_cfg(tmp_path), run_dir=str(open_dir)))
    s.server.front.allowed_uids = (0,)
    backend = private_socket(s.agent.cfg)
    os.chmod(backend.parent, 0o755)
    for sock in (s.agent.cfg.control_socket, backend):
        os.chmod(sock, 0o666)
    yield s
    s.close()
    shutil.rmtree(open_dir, ignore_errors=True)


STATUS = "/swarm.control.v1.Control/GetStatus"
APPLY = "/swarm.control.v1.Control/ApplyMitigation"
HEALTH = "/grpc.health.v1.Health/Check"


def test_each_socket_refuses_nobody(open_served):
    s = open_served
    # The public socket: closed at accept for the uid.
    assert as_nobody(s.agent.cfg.control_socket, STATUS) == "UNAVAILABLE"
    assert s.server.front.refused >= 1
    # The private socket: no credential check was made, so no call of any service.
    backend = private_socket(s.agent.cfg)
    for method, request in ((STATUS, b""), (HEALTH, b""), (APPLY, BLOCK.SerializeToString())):
        assert as_nobody(backend, method, request) == "PERMISSION_DENIED", method
    assert s.agent.store.mitigations() == []
    rows = s.agent.store.audit()   # refused Control calls, reads too
    assert [(r["identity"], r["role"], r["method"], r["result"]) for r in rows] == [
        ("unverified:unix:", "none", "ApplyMitigation", "PERMISSION_DENIED"),
        ("unverified:unix:", "none", "GetStatus", "PERMISSION_DENIED")]
    assert all("credential check" in r["detail"] for r in rows)


def test_private_socket_refuses_root_too(open_served):
    """Root that skips the front is not trusted either: the audit would not know who."""
    backend = private_socket(open_served.agent.cfg)
    with grpc.insecure_channel(f"unix:{backend}") as ch:
        stub = control_pb2_grpc.ControlStub(ch)
        code, details = code_of(lambda: stub.ApplyMitigation(BLOCK, timeout=5))
        assert code is Code.PERMISSION_DENIED and "credential check" in details
        assert code_of(lambda: stub.GetStatus(pb.GetStatusRequest(), timeout=5))[0] \
            is Code.PERMISSION_DENIED
    with open_served.channel() as ch:   # the door: root through the front
        assert control_pb2_grpc.ControlStub(ch).GetStatus(pb.GetStatusRequest(),
                                                            timeout=5).ready


def test_audit_carries_the_real_uid(open_served):
    s = open_served
    s.server.front.allowed_uids = (0, NOBODY)   # as a deployment could allow a service uid
    assert as_nobody(s.agent.cfg.control_socket, APPLY, BLOCK.SerializeToString()) == "OK"
    with s.channel() as ch:
        control_pb2_grpc.ControlStub(ch).LiftMitigation(
            pb.LiftMitigationRequest(target=BLOCK.target), timeout=5)
    rows = s.agent.store.audit()
    assert [(r["identity"], r["method"], r["result"]) for r in rows] == [
        ("local:uid=0", "LiftMitigation", "OK"),
        (f"local:uid={NOBODY}", "ApplyMitigation", "OK")]
    _wait(lambda: not s.server.front.peers)   # each relayed connection unregistered on close


@pytest.mark.parametrize("command", ["run", "cleanup"])
def test_non_root_run_and_cleanup_exit_5(tmp_path, command, setpriv):
    cfg = tmp_path / "config.yaml"   # unreadable to nobody: the privilege is checked first
    cfg.write_text(f"state_dir: {tmp_path}/state\nrun_dir: {tmp_path}/run\n")
    done = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                           *CLI, command, "--config", str(cfg)], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).parents[2])
    assert done.returncode == 5, done.stderr
    assert done.stderr.count("\n") == 1 and "permission denied" in done.stderr


HOSTILE = "\x1b[2J\x1b[31mred\ninjected line\u202eevil\r"


def test_control_characters_refused_as_input(tmp_path):
    s = Served(make_cfg(tmp_path))
    try:
        with s.channel() as ch:
            stub = control_pb2_grpc.ControlStub(ch)
            req = pb.ApplyMitigationRequest(target="198.51.100.31", ttl_s=60, reason=HOSTILE)
            code, details = code_of(lambda: stub.ApplyMitigation(req, timeout=5))
            assert code is Code.INVALID_ARGUMENT
            assert details == ("reason holds a control character (U+001B at position 0); "
                               "give plain text on one line")
        assert s.agent.store.mitigations() == []
    finally:
        s.close()


def test_cli_prints_free_text_cleaned(tmp_path):
    """A reason that reached the store by another path (the responder's own, an older
    agent) is shown with its escapes visible, one table row per mitigation."""
    s = Served(make_cfg(tmp_path))
    try:
        async def apply():
            return s.agent.responder.apply_manual(MitigationKind.BLOCK_IP, "198.51.100.32",
                                                  60, HOSTILE)
        m = s.on_loop(apply())
        cfg = tmp_path / "cli.yaml"
        cfg.write_text(f"state_dir: {tmp_path}/state\nrun_dir: {tmp_path}/run\n")
        human = subprocess.run([*CLI, "mitigations", "--config", str(cfg)],
                               capture_output=True, text=True, timeout=60)
        assert human.returncode == 0, human.stderr
        lines = human.stdout.splitlines()
        assert len(lines) == 2 and m.id[:12] in lines[1]
        assert not any(c in human.stdout for c in "\x1b\r\u202e")
        assert lines[1].endswith(r"\x1b[2J\x1b[31mred\ninjected line\u202eevil\r")
        raw = subprocess.run([*CLI, "mitigations", "--json", "--config", str(cfg)],
                             capture_output=True, text=True, timeout=60)
        assert "\x1b" not in raw.stdout and json.loads(raw.stdout)[0]["reason"] == HOSTILE
    finally:
        s.close()
