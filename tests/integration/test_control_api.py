"""The control API against a real grpc.aio server on a unix socket in a temp dir, real
stubs, a real SQLite store and the real responder; the only stand-in is the enforcer's
own dry-run twin (no nftables here: test_control_cli.py drives a real agent for that).
"""
from __future__ import annotations

import asyncio
import math
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from agent.config import Allowlist, Config, Control
from agent.control.server import ControlServer
from agent.daemon import Agent
from agent.enforce.base import DryRunEnforcer
from agent.model import EventClass, Finding, MitigationState, Severity, mono_ns
from agent.proto.grpc.health.v1 import health_pb2, health_pb2_grpc
from agent.proto.grpc.reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from agent.proto.swarm.control.v1 import control_pb2 as pb
from agent.proto.swarm.control.v1 import control_pb2_grpc
from agent.respond.engine import Responder
from agent.state.store import Store

Code = grpc.StatusCode


class Served:
    """A real Agent (rules, status, reload) without probe or nftables, served by a
    ControlServer on its own event-loop thread; `close()` stops both and the store."""

    def __init__(self, cfg: Config):
        self.agent = Agent(cfg)
        self.agent.store = Store(cfg.db_path)
        self.enforcer = DryRunEnforcer([str(n) for n in cfg.allowlist.networks()])
        self.agent.enforcer = self.enforcer
        self.agent.responder = Responder(cfg, self.agent.store, self.enforcer)
        self.agent.ready = True
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = ControlServer(self.agent, allowed_uids=(0, os.geteuid()))
        self.on_loop(self.server.start())

    def on_loop(self, coro, timeout_s: float = 15.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def handle(self, finding: Finding):
        """Feed a finding to the responder on the loop thread, as the detector does."""
        async def go():
            return self.agent.responder.handle(finding)
        return self.on_loop(go())

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"unix:{self.agent.cfg.control_socket}")

    def close(self) -> None:
        self.on_loop(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.agent.store.close()


def make_cfg(tmp_path: Path, **control) -> Config:
    return Config(state_dir=str(tmp_path / "state"), run_dir=str(tmp_path / "run"),
                  allowlist=Allowlist(management=("192.0.2.0/24",)),
                  control=Control(**control))


@pytest.fixture
def served(tmp_path):
    """A control server for a fresh store in tmp_path; stopped after the test."""
    s = Served(make_cfg(tmp_path))
    yield s
    s.close()


@pytest.fixture
def stub(served):
    with served.channel() as ch:
        yield control_pb2_grpc.ControlStub(ch)


def finding(addr: str = "203.0.113.9") -> Finding:
    now = mono_ns()
    return Finding("net.syn_flood", 1, EventClass.SYSTEM_ATTACK, Severity.HIGH, f"ip:{addr}",
                   "block", now - 50_000_000, now, {"syn_per_s": 9000, "dport": 8080})


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def test_status_health_and_reflection(served, stub):
    st = stub.GetStatus(pb.GetStatusRequest(), timeout=10)
    assert st.ready and st.pid == os.getpid() and st.version
    assert {c.event_class for c in st.classes} == {c.value for c in EventClass}
    assert "net.syn_flood@2" in st.rules

    with served.channel() as ch:
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
        ok = health.Check(health_pb2.HealthCheckRequest(service="swarm.control.v1.Control"))
        assert ok.status == health_pb2.HealthCheckResponse.SERVING
        assert code_of(lambda: health.Check(health_pb2.HealthCheckRequest(service="nope")))[0] \
            is Code.NOT_FOUND

        # What grpcurl does: list services, then fetch the descriptor of one.
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        answers = list(refl.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="swarm.control.v1.Control"),
            reflection_pb2.ServerReflectionRequest(file_by_filename="no/such.proto"),
        ]), timeout=10))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"swarm.control.v1.Control", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    from google.protobuf import descriptor_pb2
    fd = descriptor_pb2.FileDescriptorProto.FromString(
        answers[1].file_descriptor_response.file_descriptor_proto[0])
    assert fd.name == "swarm/control/v1/control.proto" and fd.service[0].name == "Control"
    assert answers[2].error_response.error_code == Code.NOT_FOUND.value[0]


def test_block_and_lift_take_the_responders_path(served, stub):
    m = stub.ApplyMitigation(pb.ApplyMitigationRequest(kind=pb.BLOCK, target="198.51.100.7/32",
                                                       ttl_s=120, reason="test"), timeout=10)
    assert (m.kind, m.target, m.state) == ("block_ip", "198.51.100.7", "active")
    assert 110 < m.expires_at - time.time() <= 120
    assert ("apply", "block_ip", "198.51.100.7") in served.enforcer.actions
    listed = stub.ListMitigations(pb.ListMitigationsRequest(), timeout=10).mitigations
    assert [x.id for x in listed] == [m.id]

    default = stub.ApplyMitigation(pb.ApplyMitigationRequest(kind=pb.RATE_LIMIT,
                                                             target="2001:db8::/64"))
    assert default.expires_at - default.created_at == pytest.approx(600, abs=1)

    lifted = stub.LiftMitigation(pb.LiftMitigationRequest(target="198.51.100.7"), timeout=10)
    assert [x.id for x in lifted.lifted] == [m.id] and lifted.lifted[0].state == "lifted"
    assert served.agent.store.mitigation(m.id).state is MitigationState.LIFTED
    assert code_of(lambda: stub.LiftMitigation(pb.LiftMitigationRequest(id=m.id)))[0] \
        is Code.FAILED_PRECONDITION

    audit = stub.ListAudit(pb.ListAuditRequest(), timeout=10).entries
    assert [(e.method, e.result) for e in audit] == [
        ("LiftMitigation", "FAILED_PRECONDITION"), ("LiftMitigation", "OK"),
        ("ApplyMitigation", "OK"), ("ApplyMitigation", "OK")]
    assert {e.identity for e in audit} == {"local:uid=0"}


BAD_APPLY = [
    (dict(target="300.1.1.1"), Code.INVALID_ARGUMENT, "not an IP address or CIDR"),
    (dict(target="10.0.0.0/33"), Code.INVALID_ARGUMENT, "not an IP address or CIDR"),
    (dict(target=""), Code.INVALID_ARGUMENT, "not an IP address or CIDR"),
    (dict(target="16.0.0.0/4"), Code.INVALID_ARGUMENT, "too broad"),
    (dict(target="0.0.0.0/0"), Code.INVALID_ARGUMENT, "cannot be blocked"),
    (dict(target="198.51.100.1", ttl_s=0), Code.INVALID_ARGUMENT, "ttl_s must be more than 0"),
    (dict(target="198.51.100.1", ttl_s=-5), Code.INVALID_ARGUMENT, "got -5"),
    (dict(target="198.51.100.1", ttl_s=1e12), Code.INVALID_ARGUMENT, "at most 86400"),
    (dict(target="198.51.100.1", ttl_s=math.nan), Code.INVALID_ARGUMENT, "ttl_s"),
    (dict(target="192.0.2.5"), Code.FAILED_PRECONDITION, "allowlisted"),
    (dict(target="198.51.100.1", reason="x" * 2000), Code.RESOURCE_EXHAUSTED, "limit is 1024"),
    (dict(target="198.51.100.1", reason="x" * 100_000), Code.RESOURCE_EXHAUSTED, ""),
]


@pytest.mark.parametrize("fields, code, message", BAD_APPLY,
                         ids=[f"{c.name}-{i}" for i, (_, c, _) in enumerate(BAD_APPLY)])
def test_bad_mitigation_requests_change_nothing(served, stub, fields, code, message):
    got, details = code_of(lambda: stub.ApplyMitigation(pb.ApplyMitigationRequest(**fields),
                                                        timeout=10))
    assert got is code and message in details
    assert served.agent.store.mitigations() == []
    assert not [a for a in served.enforcer.actions if a[0] == "apply"]
    audit = stub.ListAudit(pb.ListAuditRequest()).entries
    if code is not Code.RESOURCE_EXHAUSTED or message:   # gRPC refuses before any handler
        assert [(e.method, e.result) for e in audit] == [("ApplyMitigation", code.name)]


def test_bad_lookups(stub):
    cases = [
        (lambda: stub.GetIncident(pb.GetIncidentRequest(id="f" * 32)), Code.NOT_FOUND),
        (lambda: stub.GetIncident(pb.GetIncidentRequest()), Code.INVALID_ARGUMENT),
        (lambda: stub.ResolveIncident(pb.ResolveIncidentRequest(id="nope")), Code.NOT_FOUND),
        (lambda: stub.AcknowledgeIncident(pb.AcknowledgeIncidentRequest(id="nope")),
         Code.NOT_FOUND),
        (lambda: stub.LiftMitigation(pb.LiftMitigationRequest(id="nope")), Code.NOT_FOUND),
        (lambda: stub.LiftMitigation(pb.LiftMitigationRequest(target="198.51.100.3")),
         Code.NOT_FOUND),
        (lambda: stub.LiftMitigation(pb.LiftMitigationRequest()), Code.INVALID_ARGUMENT),
        (lambda: stub.ListIncidents(pb.ListIncidentsRequest(states=["bogus"])),
         Code.INVALID_ARGUMENT),
        (lambda: stub.ListIncidents(pb.ListIncidentsRequest(limit=5000)), Code.INVALID_ARGUMENT),
    ]
    for call, code in cases:
        assert code_of(call)[0] is code


def test_incident_lifecycle_is_watched(served, stub):
    seen: list[pb.Change] = []
    stream = stub.WatchIncidents(pb.WatchIncidentsRequest(initial=True))

    def collect():
        try:
            for change in stream:
                seen.append(change)
        except grpc.RpcError:
            pass   # cancelled at the end of the test

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    time.sleep(0.3)    # the stream is subscribed before the finding arrives
    incident = served.handle(finding())
    _wait(lambda: any(c.HasField("mitigation") for c in seen))

    acked = stub.AcknowledgeIncident(pb.AcknowledgeIncidentRequest(id=incident.id,
                                                                   comment="looking"))
    assert acked.acknowledged_by == "local:uid=0"
    done = stub.ResolveIncident(pb.ResolveIncidentRequest(id=incident.id, false_positive=True,
                                                          comment="our scanner"))
    assert done.state == "false_positive" and done.resolved_at > 0
    # A false positive's mitigations are lifted through the responder.
    assert all(m.state is MitigationState.LIFTED
               for m in served.agent.store.mitigations(incident_id=incident.id))
    assert code_of(lambda: stub.ResolveIncident(pb.ResolveIncidentRequest(id=incident.id)))[0] \
        is Code.FAILED_PRECONDITION

    _wait(lambda: any(c.HasField("incident") and c.incident.state == "false_positive"
                      for c in seen))
    stream.cancel()
    reader.join(5)
    kinds = [c.WhichOneof("change") for c in seen]
    assert kinds[0] == "mitigation" or "incident" in kinds
    assert {(c.mitigation.state) for c in seen if c.HasField("mitigation")} >= {"active", "lifted"}
    detail = stub.GetIncident(pb.GetIncidentRequest(id=incident.id))
    assert {"finding", "mitigation_applied", "acknowledged", "mitigation_lifted"} <= \
        {e.kind for e in detail.timeline}


def test_reload_rules_keeps_old_rules_on_error(tmp_path):
    from agent.config import DEFAULT_RULES

    rules = tmp_path / "rules.yaml"
    rules.write_text((DEFAULT_RULES / "network.yaml").read_text())
    s = Served(replace(make_cfg(tmp_path), rules_file=str(rules)))
    try:
        with s.channel() as ch:
            stub = control_pb2_grpc.ControlStub(ch)
            assert "net.syn_flood@2" in stub.ReloadRules(pb.ReloadRulesRequest()).rules
            rules.write_text("rules: [ {id: broken")
            code, details = code_of(lambda: stub.ReloadRules(pb.ReloadRulesRequest()))
            assert code is Code.FAILED_PRECONDITION and details
            assert "net.syn_flood@2" in stub.GetStatus(pb.GetStatusRequest()).rules
    finally:
        s.close()


@pytest.mark.privileged
def test_local_socket_refuses_other_uids(tmp_path):
    # The run dir where nobody can reach it, and the socket's mode loosened, so that only
    # the credential check stands in the way (pytest's tmp_path is private to root).
    open_dir = Path(tempfile.mkdtemp(prefix="swarm-control-"))
    os.chmod(open_dir, 0o755)
    s = Served(replace(make_cfg(tmp_path), run_dir=str(open_dir)))
    s.server.front.allowed_uids = (0,)
    sock = s.agent.cfg.control_socket
    try:
        os.chmod(sock, 0o666)
        # A separate process (gRPC does not survive fork) as nobody, Debian's python and
        # grpc only, calling GetStatus with raw bytes (an empty request).
        child = subprocess.run(["/usr/bin/python3", "-c", NOBODY_CALL, str(sock)], user=65534,
                               capture_output=True, text=True, timeout=30, cwd="/")
        assert child.stdout.strip() == "UNAVAILABLE", child.stderr
        assert s.server.front.refused >= 1
        with s.channel() as ch:
            assert control_pb2_grpc.ControlStub(ch).GetStatus(pb.GetStatusRequest(), timeout=5).ready
    finally:
        s.close()
        shutil.rmtree(open_dir, ignore_errors=True)


NOBODY_CALL = """
import sys, grpc
with grpc.insecure_channel("unix:" + sys.argv[1]) as ch:
    try:
        ch.unary_unary("/swarm.control.v1.Control/GetStatus")(b"", timeout=5)
        print("OK")
    except grpc.RpcError as e:
        print(e.code().name)
"""


def _wait(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
