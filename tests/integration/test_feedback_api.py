"""The feedback calls of the control API against a real grpc.aio server on a unix socket,
real stubs, a real store and responder (test_control_api.Served): a false-positive
verdict with a refused scope, lifetime or option changes nothing (the incident stays
open), an accepted one is listed, audited and on the incident's timeline, a revert is
audited, and the suppressed/false-positive counts reach status, ListRules and metrics."""
from __future__ import annotations

import json

import grpc
import pytest

from agent.model import EventClass, Finding, Severity, mono_ns
from agent.proto.swarm.control.v1 import control_pb2 as pb
from agent.proto.swarm.control.v1 import control_pb2_grpc
from agent.report.metrics import Metrics
from agent.respond.feedbackbook import FeedbackBook
from tests.integration.test_control_api import Served, code_of, make_cfg

pytestmark = pytest.mark.privileged
Code = grpc.StatusCode


@pytest.fixture
def served(tmp_path):
    """Served (control_api's) with the agent's feedback book on the same store."""
    s = Served(make_cfg(tmp_path))
    s.agent.feedback = FeedbackBook(s.agent.store, "node-a", max_ttl_s=86400.0)
    yield s
    s.close()


@pytest.fixture
def stub(served):
    with served.channel() as ch:
        yield control_pb2_grpc.ControlStub(ch)


def flood(addr: str) -> Finding:
    now = mono_ns()
    return Finding("net.syn_flood", 2, EventClass.SYSTEM_ATTACK, Severity.HIGH, f"ip:{addr}",
                   "challenge", now - 10**8, now, {"syn_per_s": 9000, "dport": 8080})


def handled(served: Served, finding: Finding) -> str | None:
    """The finding through Agent.handle_findings on the loop: the id of the incident it
    was recorded in, or None when feedback kept it back (no incident counted it)."""
    async def go():
        before = {i.id: i.findings for i in served.agent.store.incidents()}
        served.agent.handle_findings([finding])
        grew = [i.id for i in served.agent.store.incidents()
                if i.findings > before.get(i.id, 0)]
        return grew[0] if grew else None
    return served.on_loop(go())


def test_refused_verdicts_change_nothing(served, stub):
    inc = handled(served, flood("203.0.113.9"))
    for req, code, words in [
        (pb.ResolveIncidentRequest(id=inc, false_positive=True, comment="c",
                                   scope="address=203.0.0.0/8"),
         Code.INVALID_ARGUMENT, "wider than /16"),
        (pb.ResolveIncidentRequest(id=inc, false_positive=True, comment="c",
                                   scope="address=198.51.100.1"),
         Code.INVALID_ARGUMENT, "does not cover this incident"),
        (pb.ResolveIncidentRequest(id=inc, false_positive=True, comment="c",
                                   scope="pid=1"),
         Code.INVALID_ARGUMENT, "unknown scope kind"),
        (pb.ResolveIncidentRequest(id=inc, false_positive=True, comment="c",
                                   ttl_s=86401),
         Code.INVALID_ARGUMENT, "at most 86400"),
        (pb.ResolveIncidentRequest(id=inc, scope="node"), Code.INVALID_ARGUMENT,
         "go with false_positive"),
        (pb.ResolveIncidentRequest(id=inc, false_positive=True, no_feedback=True, learn=True),
         Code.INVALID_ARGUMENT, "no_feedback makes no record"),
        (pb.ResolveIncidentRequest(id=inc, false_positive=True, comment=" "),
         Code.INVALID_ARGUMENT, "needs a comment"),
    ]:
        got, text = code_of(lambda: stub.ResolveIncident(req, timeout=10))
        assert got is code and words in text, text
    assert served.agent.store.incident(inc).state.value == "mitigated"   # as it was
    assert [m.state.value for m in served.agent.store.mitigations(incident_id=inc)] == \
        ["active"]                                                   # nothing lifted
    assert list(stub.ListFeedback(pb.ListFeedbackRequest(all=True), timeout=10).records) == []
    refused = [e for e in served.agent.store.audit() if e["method"] == "ResolveIncident"]
    assert len(refused) == 7 and {e["result"] for e in refused} == {"INVALID_ARGUMENT"}
    assert code_of(lambda: stub.RevertFeedback(pb.RevertFeedbackRequest(id="nope"),
                                               timeout=10))[0] is Code.NOT_FOUND


def test_verdict_listed_audited_counted_and_reverted(served, stub):
    inc = handled(served, flood("203.0.113.9"))
    done = stub.ResolveIncident(pb.ResolveIncidentRequest(
        id=inc, false_positive=True, comment="load test", ttl_s=3600), timeout=10)
    assert done.state == "false_positive"
    [rec] = stub.ListFeedback(pb.ListFeedbackRequest(), timeout=10).records
    assert (rec.rule, rec.rule_version, rec.scope_kind, rec.scope_value, rec.action) == \
        ("net.syn_flood", 2, "address", "203.0.113.9/32", "suppress")
    assert rec.live and rec.reason == "load test" and rec.incident_id == inc
    assert 3590 < rec.expires_at - rec.created_at <= 3600
    audit = served.agent.store.audit()[0]
    assert audit["method"] == "ResolveIncident" and rec.id in audit["detail"]

    assert handled(served, flood("203.0.113.9")) is None         # kept back
    assert handled(served, flood("203.0.113.10")) is not None    # another source alerts
    st = stub.GetStatus(pb.GetStatusRequest(), timeout=10)
    assert st.counters["findings_suppressed.net.syn_flood@2"] == 1
    assert st.counters["false_positives.net.syn_flood@2"] == 1
    listed = {r.id: r for r in stub.ListRules(pb.ListRulesRequest(), timeout=10).rules}
    assert (listed["net.syn_flood"].false_positives, listed["net.syn_flood"].suppressed) == (1, 1)
    metrics = Metrics(served.agent.store, feedback=served.agent.feedback.counts)
    assert metrics.registry.get_sample_value(
        "swarm_agent_false_positives_total", {"rule": "net.syn_flood@2"}) == 1
    assert metrics.registry.get_sample_value(
        "swarm_agent_findings_suppressed_total", {"rule": "net.syn_flood@2"}) == 1

    detail = stub.GetIncident(pb.GetIncidentRequest(id=inc), timeout=10)
    [line] = [e for e in detail.timeline if e.kind == "feedback"]
    assert json.loads(line.data_json)["id"] == rec.id and "do not alert" in line.text

    back = stub.RevertFeedback(pb.RevertFeedbackRequest(id=rec.id, comment="oops"), timeout=10)
    assert back.reverted_at and not back.live
    assert served.agent.store.audit()[0]["method"] == "RevertFeedback"
    assert handled(served, flood("203.0.113.9")) is not None     # alerts again
    assert code_of(lambda: stub.RevertFeedback(pb.RevertFeedbackRequest(id=rec.id),
                                               timeout=10))[0] is Code.FAILED_PRECONDITION
    assert list(stub.ListFeedback(pb.ListFeedbackRequest(), timeout=10).records) == []
    assert len(stub.ListFeedback(pb.ListFeedbackRequest(all=True), timeout=10).records) == 1
