"""Which blocks become fleet proposals (Responder._propose): an operator's, and a rule's
only when every condition of the rule rests on evidence nobody can forge off-path (README
"The response fits the evidence"); a rule blocking on forgeable evidence stays local."""
from __future__ import annotations

import json

from agent.config import Config, Mesh
from agent.detect.rules import Detector, parse_rules
from agent.enforce.base import DryRunEnforcer
from agent.model import Event, MitigationKind
from agent.respond.engine import Responder
from agent.state.store import Store
from tests.unit.test_respond import ALLOW, BASE_S, POLICY, Clock

RULES = parse_rules({"rules": [
    {"id": "t.syn_block", "version": 1, "class": "system_attack", "severity": "high",
     "event": "net.source", "thresholds": {"syns_per_s": 200}, "action": "block"},
    {"id": "t.reset_block", "version": 1, "class": "system_attack", "severity": "high",
     "event": "tcp.reset", "thresholds": {"resets_per_s": 50}, "action": "block"},
    {"id": "t.mixed_block", "version": 1, "class": "system_attack", "severity": "high",
     "match": [{"event": "tcp.established", "thresholds": {"conns_per_s": 100}},
               {"event": "net.source", "thresholds": {"ports": 30}}], "action": "block"},
    {"id": "t.verified_block", "version": 1, "class": "system_attack", "severity": "high",
     "event": "tcp.verified_reset", "thresholds": {"resets_per_s": 50}, "action": "block"},
]})
EVENTS = {"net.source": {"syns": 5000, "packets": 5000, "dport": 80, "proto": "tcp"},
          "tcp.reset": {"resets": 500}, "tcp.established": {"conns": 500},
          "tcp.verified_reset": {"resets": 500}}


def proposals(tmp_path, kind: str | None) -> list[dict]:
    cfg = Config(state_dir=str(tmp_path), allowlist=ALLOW, mitigation=POLICY,
                 mesh=Mesh(endpoint="mesh.example:7443"))
    st = Store(cfg.db_path)
    try:
        clock = Clock()
        r = Responder(cfg, st, DryRunEnforcer([str(n) for n in ALLOW.networks()]), clock,
                      rules=RULES, to_wall=lambda ns: BASE_S + ns / 1e9)
        if kind is None:
            r.apply_manual(MitigationKind.BLOCK_IP, "198.51.100.7", 600, "seen in logs", "ana")
        else:
            now_ns = int(clock.t_s * 1e9)
            ev = Event(kind, "198.51.100.7", now_ns, now_ns - 10**9, EVENTS[kind])
            findings = Detector(RULES, Config(allowlist=ALLOW)).evaluate(ev, now_ns)
            assert findings
            for finding in findings:
                r.handle(finding)
        blocks = [m for m in st.active_mitigations(clock()) if m.kind is MitigationKind.BLOCK_IP]
        assert blocks, "the node itself blocked"
        return [json.loads(p) for (p,) in st._read("SELECT payload FROM outbox WHERE kind = 'proposal'")]
    finally:
        st.close()


def test_a_block_on_verified_handshakes_is_proposed(tmp_path):
    [p] = proposals(tmp_path, "tcp.verified_reset")
    assert (p["rule"], p["target"]) == ("t.verified_block", "198.51.100.7/32")


def test_an_operators_block_is_proposed(tmp_path):
    [p] = proposals(tmp_path, None)
    assert p["operator"] == "ana" and p["rule"] == ""


def test_blocks_on_forgeable_evidence_stay_local(tmp_path):
    assert proposals(tmp_path, "net.source") == []       # SYN rates, ports probed by SYNs
    assert proposals(tmp_path, "tcp.reset") == []        # resets drawn by (spoofed) SYNs


def test_a_rule_with_any_forgeable_condition_is_not_proposed(tmp_path):
    """A `match` rule fires on any one condition and its finding does not say which: one
    forgeable condition keeps all its blocks local, even those of a completed handshake."""
    assert proposals(tmp_path, "tcp.established") == []
