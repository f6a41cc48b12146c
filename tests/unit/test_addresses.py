"""Targets as manual and automatic blocks share them (agent.model.parse_target,
agent.respond.policy.check_target), certificate subjects (agent.control.auth) and the
CLI's terminal cleaning (agent.cli.text)."""
from __future__ import annotations

import pytest

from agent.cli.text import clean, cleaned
from agent.control.auth import subject_cns
from agent.model import MitigationKind, parse_target
from agent.proto.swarm.control.v1 import control_pb2 as pb
from agent.respond import policy

BLOCK = MitigationKind.BLOCK_IP


@pytest.mark.parametrize("given, stored", [
    ("::ffff:10.250.1.2", "10.250.1.2"),
    ("::FFFF:0a fa:0102".replace(" ", ""), "10.250.1.2"),
    ("::ffff:10.250.1.2/128", "10.250.1.2"),
    ("::ffff:10.250.0.0/112", "10.250.0.0/16"),
    ("::ffff:10.250.1.7/120", "10.250.1.0/24"),
    (" 198.51.100.7/32 ", "198.51.100.7"),
    ("2001:db8::1", "2001:db8::1"),
    ("fe80::1", "fe80::1"),
    ("64:ff9b::10.0.0.1", "64:ff9b::a00:1"),     # NAT64 is real IPv6 traffic: kept
])
def test_targets_normalised(given, stored):
    assert policy.check_target(BLOCK, given) == stored


def test_mapped_targets_are_ipv4_networks():
    assert parse_target("::ffff:10.250.1.2").version == 4
    assert parse_target("::ffff:0:0/95").version == 6   # wider than the mapped range


@pytest.mark.parametrize("given, why", [
    ("fe80::1%eth0", "fe80::1%eth0 is a scoped address (zone 'eth0'): a block applies on "
                     "every interface, so give the address without its zone"),
    ("fe80::1%eth0/64", "is a scoped address (zone 'eth0')"),
    ("255.255.255.255", "255.255.255.255 is the limited broadcast address; it cannot be "
                        "blocked"),
    ("::ffff:255.255.255.255", "is the limited broadcast address"),
    ("::ffff:0.0.0.0", "is the unspecified address"),
    ("::ffff:224.0.0.1", "is a multicast address"),
    ("10.0.0.0/33", "not an IP address or CIDR"),
])
def test_targets_refused_with_one_sentence(given, why):
    with pytest.raises(ValueError) as err:
        policy.check_target(BLOCK, given)
    assert why in str(err.value) and "\n" not in str(err.value)


def test_unblockable_for_the_detector_path():
    assert policy.unblockable("255.255.255.255") == "is the limited broadcast address"
    assert policy.unblockable("10.0.0.255") is None   # a host on a /23, for all we know


@pytest.mark.parametrize("subject, cns", [
    ("CN=a", ["a"]),
    ("CN=ops.example,CN=viewer.example,O=x\\, CN=evil", ["ops.example", "viewer.example"]),
    ("O=x\\, CN=evil", []),
    ("O=x+CN=y", ["y"]),
    ("cn=a,2.5.4.3=#0c0162", ["a", "#0c0162"]),
    ("OU=x", []),
])
def test_subject_common_names(subject, cns):
    assert subject_cns(subject) == cns


def test_clean_escapes_what_a_terminal_would_obey():
    assert clean("plain text, ünïcode ok") == "plain text, ünïcode ok"
    assert clean("\x1b[31mred\x1b[0m\nnext\r\tx\x7f\x9b2J\u202eevil\u2028") == \
        "\\x1b[31mred\\x1b[0m\\nnext\\r\\tx\\x7f\\x9b2J\\u202eevil\\u2028"


def test_cleaned_walks_nested_and_repeated_strings():
    detail = pb.IncidentDetail(
        incident=pb.Incident(id="i", summary="a\nb", rules=["r\x1b"]),
        timeline=[pb.TimelineEntry(kind="finding", text="\x1b[2J")],
        mitigations=[pb.Mitigation(reason="x\ry")])
    out = cleaned(detail)
    assert (out.incident.summary, list(out.incident.rules)) == ("a\\nb", ["r\\x1b"])
    assert out.timeline[0].text == "\\x1b[2J" and out.mitigations[0].reason == "x\\ry"
    assert detail.incident.summary == "a\nb"       # the original is left alone


def test_detector_path_takes_mapped_sources_as_ipv4(tmp_path):
    """The detector's own path: a source in the mapped form is checked against the IPv4
    allowlist and blocked in IPv4, exactly as a manual block of it would be."""
    from agent.config import Allowlist, Config
    from agent.detect.rules import Detector, load_rules
    from agent.enforce.base import DryRunEnforcer
    from agent.model import Event
    from agent.respond.engine import Responder
    from agent.state.store import Store

    allow = Allowlist(management=("192.0.2.0/24",))
    cfg = Config(state_dir=str(tmp_path), allowlist=allow)
    store = Store(cfg.db_path)
    try:
        enf = DryRunEnforcer([str(n) for n in allow.networks()])
        responder = Responder(cfg, store, enf)
        detector = Detector(load_rules(), cfg)
        for addr in ("::ffff:192.0.2.5", "::ffff:198.51.100.9"):
            ev = Event("net.source", addr, 2_000_000_000, 1_000_000_000,
                       {"syns": 5000, "packets": 5000, "dport": 80, "proto": "tcp"})
            [finding] = detector.evaluate(ev, 2_000_000_000)
            responder.handle(finding)
        assert [a for a in enf.actions if a[0] == "apply"] == \
            [("apply", "challenge", "198.51.100.9")]     # forgeable SYNs: a challenge
        assert [m.target for m in store.mitigations()] == ["198.51.100.9"]
    finally:
        store.close()
