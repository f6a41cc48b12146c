"""Egress policy without the kernel: the config's checks (exit-2 sentences), the nft text
built from it, the counter reading and the rate-limited reports, the incident entity."""
from __future__ import annotations

from pathlib import Path

import pytest

from agent import config
from agent.config import Allowlist, Config, ConfigError
from agent.detect.rules import Detector, load_rules
from agent.egresswatch import event_of
from agent.enforce import egress
from agent.enforce.egress import EgressMeter, Scope
from agent.policyconfig import METADATA, EgressRule, Policy

RULES = Path(__file__).resolve().parents[2] / "agent" / "rules" / "egress.yaml"


def load(tmp_path: Path, text: str) -> Config:
    p = tmp_path / "config.yaml"
    p.write_text(text)
    return config.load(p)


def test_default_denies_metadata_to_workloads_only() -> None:
    cfg = config.load(None)
    assert cfg.policy.egress == (METADATA,)
    assert "169.254.169.254/32" in METADATA.destinations and not METADATA.ports
    # The host's own services keep the metadata service (cloud-init, provider agents).
    assert "/system.slice" not in METADATA.cgroups and "/" not in METADATA.cgroups


@pytest.mark.parametrize("entry, message", [
    ("{name: a, destinations: [1.2.3.4]}", "applies to nobody"),
    ("{name: a, cgroups: [/x]}", "would deny everything"),
    ("{name: a, cgroups: [/x], destinations: [1.2.3.400]}", "not an IP address or CIDR"),
    ("{name: a, cgroups: ['/x\"; flush ruleset; \"'], destinations: [1.2.3.4]}", "not a cgroup v2 path"),
    ("{name: a, cgroups: [/], destinations: [1.2.3.4]}", "not a cgroup v2 path"),
    ("{name: a, cgroups: [/a/../b], destinations: [1.2.3.4]}", "not a cgroup v2 path"),
    ("{name: a, interfaces: ['eth0\" accept'], ports: [1]}", "not an interface name"),
    ("{name: a, interfaces: [averyveryverylongname], ports: [1]}", "not an interface name"),
    ("{name: a, cgroups: [/x], ports: [70000]}", "not a port"),
    ("{name: a, cgroups: [/x], ports: ['22']}", "must be an integer"),
    ("{name: a, cgroups: [/x], ports: [22], proto: icmp}", "proto must be one of"),
    ("{name: 'a b', cgroups: [/x], ports: [22]}", "name must be"),
    ("{name: a, cgroups: [/x], ports: [22], port: 3}", "unknown config key policy.egress[0].port"),
    ("{name: a, cgroups: [/x], destinations: [10.9.0.5]}", "inside the management or mesh"),
])
def test_bad_policy_is_one_sentence(tmp_path: Path, entry: str, message: str) -> None:
    text = f"allowlist: {{management: [10.9.0.0/16]}}\npolicy:\n  egress:\n    - {entry}\n"
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load(tmp_path, text)


def test_duplicate_names_and_not_a_list(tmp_path: Path) -> None:
    dup = "policy:\n  egress:\n    - {name: a, cgroups: [/x], ports: [1]}\n    - {name: a, cgroups: [/y], ports: [2]}\n"
    with pytest.raises(ConfigError, match="used twice"):
        load(tmp_path, dup)
    with pytest.raises(ConfigError, match="policy.egress must be a list"):
        load(tmp_path, "policy: {egress: {name: a}}\n")


def test_empty_list_turns_the_default_off(tmp_path: Path) -> None:
    assert load(tmp_path, "policy: {egress: []}\n").policy.egress == ()


def test_text_scopes_families_and_ports() -> None:
    rule = EgressRule(name="mine", interfaces=("br-*",), destinations=("10.0.0.0/8", "2001:db8::/32"),
                      ports=(4444, 3333), proto="any")
    cfg = Config(allowlist=Allowlist(mesh=("192.0.2.0/24",)), policy=Policy(egress=(rule,)))
    eg = egress.desired(cfg)
    text = egress.rules_text(eg)
    assert 'iifname "br-*" ip daddr { 10.0.0.0/8 } meta l4proto { tcp, udp } th dport { 3333, 4444 } ' \
           'counter drop comment "egress #0"' in text
    assert 'ip6 daddr { 2001:db8::/32 }' in text and 'comment "egress #1"' in text
    # Loopback and the mesh come first in both chains: never cut.
    lines = text.splitlines()
    first = [ln for ln in lines if "egress_fwd" in ln and "add rule" in ln][0]
    assert "127.0.0.0/8" in first and "192.0.2.0/24" in first and first.endswith("accept")
    assert eg.scopes == (Scope("mine", "iif:br-*"), Scope("mine", "iif:br-*"))


def test_absent_cgroup_waits() -> None:
    rule = EgressRule(name="m", cgroups=("/swa-no-such-cgroup",), ports=(3333,), proto="tcp")
    eg = egress.desired(Config(policy=Policy(egress=(rule,))))
    assert eg.waiting == ("m: /swa-no-such-cgroup",) and not eg.scopes
    assert eg.status() == {"enforced": {}, "waiting": ["m: /swa-no-such-cgroup"], "uplink_devices": []}


def test_counts_from_a_listing() -> None:
    eg = egress.Egress(scopes=(Scope("a", "iif:x"), Scope("a", "iif:x"), Scope("b", "cgroup:/c")))
    def rule(chain, comment, packets):
        return {"rule": {"chain": chain, "comment": comment,
                         "expr": [{"counter": {"packets": packets, "bytes": 60 * packets}}, {"drop": None}]}}
    objs = [rule("egress_fwd", "egress #0", 2), rule("egress_fwd", "egress #1", 3),
            rule("egress_out", "egress #2", 0), rule("isolate_out", "egress #2", 9),
            rule("egress_out", "egress #7", 9), rule("egress_out", "someone else", 9)]
    assert egress.counts(objs, eg) == {Scope("a", "iif:x"): 5, Scope("b", "cgroup:/c"): 0}


def test_meter_reports_first_at_once_then_rate_limited() -> None:
    s = Scope("a", "cgroup:/c")
    m = EgressMeter(every_s=10)
    assert m.update({s: 0}, 0.0) == []
    assert m.update({s: 2}, 1.0) == [(s, 2)]            # first drops: at once
    assert m.update({s: 5}, 2.0) == []                  # within 10 s: held
    assert m.update({s: 6}, 11.5) == [(s, 4)]           # summed, none lost
    assert m.update({s: 1}, 30.0) == [(s, 1)]           # the table was recreated
    assert m.total[s] == 7


def test_event_becomes_one_incident_entity_per_scope() -> None:
    det = Detector(load_rules(RULES), Config())
    ev = event_of(Scope("metadata", "cgroup:/kubepods.slice"), 3, 3, 1, 2)
    [f] = det.evaluate(ev, 2)
    assert (f.rule, f.entity, f.action) == ("policy.metadata_denied@1",
                                            "egress:metadata:cgroup:/kubepods.slice", "report")
    assert f.event_class.value == "policy_violation" and f.evidence["cgroup"] == "/kubepods.slice"
    [g] = det.evaluate(event_of(Scope("mining", "iif:docker0"), 1, 1, 1, 2), 2)
    assert (g.rule, g.entity) == ("policy.egress_denied@1", "egress:mining:iif:docker0")


def test_an_ipv4_mapped_destination_is_refused():
    # Found by a red-team review: accepted, it became an ip6 rule that IPv4 packets never meet.
    from agent.policyconfig import EgressRule, Policy, check
    rule = EgressRule(name="m", cgroups=("/docker",), destinations=("::ffff:169.254.169.254/128",))
    with pytest.raises(ValueError, match="IPv4-mapped"):
        check(Policy(egress=(rule,)), [])
