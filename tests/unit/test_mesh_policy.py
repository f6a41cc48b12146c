"""The mesh's trust policy (mesh/policy.py): every refusal reason, corroboration across
distinct nodes and providers, the rate limit, lifetime caps and staged rollout."""
from __future__ import annotations

import pytest

from agent.fleet.decision import MAX_LIFETIME_S
from mesh.policy import Policy, PolicyConfig

NOW = 1_800_000_000.0


def prop(node="n1", provider="p1", target="203.0.113.7/32", pid=None, **kw):
    p = {"proposal_id": pid or f"{node}-{target}", "node": node, "provider": provider,
         "target": target, "rule": "net.ssh_bruteforce", "rule_version": "2",
         "incident_id": "i1", "operator": "", "evidence": {"handshakes": 40},
         "created_at": NOW - 5, "ttl_s": 0, "event_class": "system_attack",
         "received_at": NOW - 1}
    p.update(kw)
    return p


def policy(**cfg) -> Policy:
    return Policy(PolicyConfig.from_dict(cfg))


def evaluate(pol, p, votes=(), node_count=1, latest=None, known=()):
    return pol.evaluate(p, now=NOW, node_count=node_count, votes=list(votes), latest=latest,
                        known_nodes=known)


# -- configuration ---------------------------------------------------------------------------
def test_defaults():
    c = PolicyConfig.from_dict(None)
    assert (c.max_prefix_v4, c.max_prefix_v6, c.rate_limit, c.rate_window_s) == (24, 48, 30, 600)
    assert (c.min_nodes, c.min_providers, c.corroboration_window_s) == (3, 2, 1800)
    assert (c.default_ttl_s, c.max_ttl_s, c.stage_s, c.stage_canary) == (3600, 86400, 60, 0)


@pytest.mark.parametrize("cfg, message", [
    ({"bogus": 1}, "unknown policy setting 'bogus'"),
    ({"max_prefix_v4": 1}, "policy max_prefix_v4 must be between 16 and 32, not 1"),
    ({"max_prefix_v6": 200}, "policy max_prefix_v6 must be between 32 and 128"),
    ({"rate_limit": 0}, "policy rate_limit must be between 1"),
    ({"rate_limit": 2.5}, "policy rate_limit must be a whole number"),
    ({"min_nodes": "3"}, "policy min_nodes must be a number"),
    ({"min_nodes": 2, "min_providers": 3}, "min_providers cannot be more than min_nodes"),
    ({"max_ttl_s": MAX_LIFETIME_S + 1}, "policy max_ttl_s must be between"),
    ({"default_ttl_s": 7200, "max_ttl_s": 3600}, "default_ttl_s cannot be more than max_ttl_s"),
    ({"infrastructure": "10.0.0.0/8"}, "policy infrastructure (infrastructure) must be a list"),
    ({"allowlist": ["not-a-net"]}, "'not-a-net' is not a network"),
    ({"stage_canary": [""]}, "stage_canary must be a count or a list"),
    ({"stage_operator": "yes"}, "stage_operator must be true or false"),
    ([], "the policy section must be a mapping"),
])
def test_config_errors_are_one_sentence(cfg, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        PolicyConfig.from_dict(cfg)
    assert "\n" not in str(e.value)


# -- refusals --------------------------------------------------------------------------------
@pytest.mark.parametrize("target, reason", [
    ("0.0.0.0/1", "prefix /1 is wider than the limit of /24"),
    ("198.51.0.0/16", "prefix /16 is wider than the limit of /24"),
    ("2001:db8::/32", "prefix /32 is wider than the limit of /48"),
    ("100.64.3.4/32", "overlaps the allowlisted CGNAT range 100.64.0.0/10"),
    ("100.127.255.0/24", "overlaps the allowlisted CGNAT range"),
    ("10.1.2.3", "overlaps the allowlisted private (RFC 1918) range 10.0.0.0/8"),
    ("172.20.0.0/24", "private (RFC 1918) range 172.16.0.0/12"),
    ("192.168.1.1/32", "private (RFC 1918) range 192.168.0.0/16"),
    ("127.0.0.1", "loopback range 127.0.0.0/8"),
    ("169.254.169.254", "link-local range 169.254.0.0/16"),
    ("224.0.0.251", "multicast range 224.0.0.0/4"),
    ("0.0.0.0/32", "unspecified range 0.0.0.0/8"),
    ("255.255.255.255", "broadcast range"),
    ("::1", "loopback range ::1/128"),
    ("::/128", "unspecified range ::/128"),
    ("fe80::1", "link-local range fe80::/10"),
    ("fd00::1", "unique local (private) range fc00::/7"),
    ("ff02::1", "multicast range ff00::/8"),
    ("::ffff:203.0.113.7", "IPv4-mapped range"),
    ("::203.0.113.7", "IPv4-compatible (deprecated) range ::/96"),
    ("64:ff9b::cb00:7107", "IPv4-translated (NAT64) range"),
    ("64:ff9b:1::/48", "local-use NAT64) range 64:ff9b:1::/48"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo (IPv4 tunnelled) range 2001::/32"),
    ("2002:0a00:0001::/48", "carries 10.0.0.1/32 (6to4): 10.0.0.1/32 overlaps the allowlisted"),
    ("203.0.113.7/24", "invalid target"),
    ("not an address", "invalid target"),
    ("", "invalid target"),
])
def test_target_refusals(target, reason):
    out = evaluate(policy(), prop(target=target))
    assert out.kind == "refuse" and reason in out.reason, out


def test_configured_infrastructure_and_cdn_ranges_are_refused():
    pol = policy(infrastructure=["198.51.100.0/28"],
                 allowlist={"cloudflare": ["104.16.0.0/13"], "googlebot": ["66.249.64.0/19"]})
    assert "infrastructure range 198.51.100.0/28" in evaluate(pol, prop(target="198.51.100.9")).reason
    assert "cloudflare range 104.16.0.0/13" in evaluate(pol, prop(target="104.17.1.0/24")).reason
    assert "googlebot range" in evaluate(pol, prop(target="66.249.66.1")).reason
    # A wider proposal that merely contains an allowlisted range is refused too.
    pol = policy(max_prefix_v4=16, infrastructure=["198.51.100.0/28"])
    assert evaluate(pol, prop(target="198.51.0.0/16")).kind == "refuse"


def test_a_6to4_network_is_judged_as_the_ipv4_it_carries():
    pol = policy(infrastructure=["198.51.100.10/32"], max_prefix_v6=32)
    assert evaluate(pol, prop(target="2002:cb00:7107::/48")).kind == "pending"   # 203.0.113.7
    assert "carries 198.51.100.10/32 (6to4)" in evaluate(pol, prop(target="2002:c633:640a::/48")).reason
    assert "carries the IPv4 network 198.51.0.0/16 (6to4), wider than the limit of /24" in \
        evaluate(pol, prop(target="2002:c633::/32")).reason


def test_rate_limit_counts_the_proposal_itself():
    pol = policy(min_nodes=1, min_providers=1)
    assert evaluate(pol, prop(), node_count=30).kind == "decide"
    out = evaluate(pol, prop(), node_count=31)
    assert out.kind == "refuse"
    assert out.reason == "rate limit: 31 proposals from n1 in 600 s (limit 30)"
    assert evaluate(policy(rate_limit=5), prop(), node_count=6).reason.startswith("rate limit")


def test_a_proposal_needs_a_rule_or_an_operator_and_must_be_fresh():
    pol = policy(min_nodes=1, min_providers=1)
    assert "neither a rule nor an operator" in evaluate(pol, prop(rule="")).reason
    assert evaluate(pol, prop(rule="", operator="alice")).kind == "decide"
    old = prop(created_at=NOW - 4000, received_at=NOW - 1)
    assert evaluate(pol, old).reason.startswith("stale")
    expired = prop(created_at=NOW - 100, ttl_s=60)
    assert evaluate(pol, expired).reason.startswith("stale")


# -- corroboration ---------------------------------------------------------------------------
def test_corroboration_needs_distinct_nodes_of_distinct_providers():
    pol = policy()
    first = prop("n1", "p1")
    assert evaluate(pol, first).kind == "pending"
    assert evaluate(pol, first).reason == \
        "waiting for corroboration: 1 of 3 nodes, 1 of 2 providers"
    # The same node proposing again is still one node.
    again = prop("n1", "p1", pid="n1-again")
    assert evaluate(pol, again, votes=[first]).reason.startswith("waiting for corroboration: 1 of 3")
    # Three nodes of one provider: not enough providers.
    same = [prop("n1", "p1"), prop("n2", "p1")]
    out = evaluate(pol, prop("n3", "p1"), votes=same)
    assert out.kind == "pending" and "3 of 3 nodes, 1 of 2 providers" in out.reason
    # Three nodes of two providers: a decision.
    out = evaluate(pol, prop("n3", "p2"), votes=same)
    assert out.kind == "decide"
    d = out.decision
    assert d.action == "block" and d.target == "203.0.113.7/32"
    assert d.provenance["kind"] == "corroborated"
    assert d.provenance["nodes"] == ["n1", "n2", "n3"]
    assert d.provenance["providers"] == ["p1", "p2"]
    assert d.provenance["rules"] == ["net.ssh_bruteforce@2"]
    assert d.provenance["proposals"] == [f"n{i}-203.0.113.7/32" for i in (1, 2, 3)]
    d.check(NOW)


def test_covering_proposals_count_narrower_ones_do_not():
    pol = policy(min_nodes=2, min_providers=2)
    wide = prop("n1", "p1", target="203.0.113.0/24")
    assert evaluate(pol, prop("n2", "p2", target="203.0.113.7/32"), votes=[wide]).kind == "decide"
    narrow = prop("n1", "p1", target="203.0.113.7/32")
    assert evaluate(pol, prop("n2", "p2", target="203.0.113.0/24"), votes=[narrow]).kind == "pending"
    other = prop("n1", "p1", target="203.0.114.0/24")
    assert evaluate(pol, prop("n2", "p2"), votes=[other]).kind == "pending"
    v6 = prop("n1", "p1", target="2001:db8:1::/48")
    assert evaluate(pol, prop("n2", "p2", target="2001:db8:1::5"), votes=[v6]).kind == "decide"


def test_votes_outside_the_window_or_before_the_last_decision_do_not_count():
    pol = policy(min_nodes=2, min_providers=2)
    old = prop("n1", "p1", received_at=NOW - 1801, created_at=NOW - 1802)
    assert evaluate(pol, prop("n2", "p2"), votes=[old]).kind == "pending"
    # A block that expired consumed the votes it was made of.
    recent = prop("n1", "p1", received_at=NOW - 600, created_at=NOW - 601)
    expired = {"id": "d0", "action": "block", "target": "203.0.113.7/32",
               "issued_at": NOW - 300, "expires_at": NOW - 10, "provenance": {}}
    assert evaluate(pol, prop("n2", "p2"), votes=[recent], latest=expired).kind == "pending"
    assert evaluate(pol, prop("n2", "p2"), votes=[recent]).kind == "decide"


def test_refused_proposals_are_no_votes():
    pol = policy(min_nodes=2, min_providers=2, max_prefix_v4=24)
    wide = prop("n1", "p1", target="203.0.0.0/16")
    assert evaluate(pol, prop("n2", "p2"), votes=[wide]).kind == "pending"


def test_an_operator_proposal_is_one_vote():
    pol = policy()
    out = evaluate(pol, prop("n1", "p1", operator="alice", rule=""))
    assert out.kind == "pending"
    votes = [prop("n1", "p1", operator="alice", rule=""), prop("n2", "p2")]
    out = evaluate(pol, prop("n3", "p2"), votes=votes)
    assert out.kind == "decide" and out.decision.provenance["operators"] == ["alice"]


def test_active_block_and_operator_revocation():
    pol = policy(min_nodes=1, min_providers=1)
    block = {"id": "d1", "action": "block", "target": "203.0.113.7/32", "issued_at": NOW - 10,
             "expires_at": NOW + 100, "provenance": {"kind": "corroborated"}}
    assert evaluate(pol, prop(), latest=block).kind == "active"
    revoke = {"id": "d2", "action": "revoke", "target": "203.0.113.7/32", "issued_at": NOW - 5,
              "expires_at": NOW + 100, "provenance": {"kind": "operator", "operator": "bob"}}
    out = evaluate(pol, prop(), latest=revoke)
    assert out.kind == "refuse" and out.reason.startswith("revoked by operator bob until")
    revoke["expires_at"] = NOW - 1
    assert evaluate(pol, prop(received_at=NOW), latest=revoke).kind == "decide"


# -- lifetimes ---------------------------------------------------------------------------------
def test_lifetime_is_the_lower_median_capped():
    pol = policy(min_nodes=3, min_providers=1, max_ttl_s=7200)
    votes = [prop("n1", ttl_s=600), prop("n2", ttl_s=999999)]
    d = evaluate(pol, prop("n3", ttl_s=1800), votes=votes).decision
    assert d.expires_at - d.issued_at == 1800
    votes = [prop("n1", ttl_s=999999), prop("n2", ttl_s=999999)]
    d = evaluate(pol, prop("n3", ttl_s=999999), votes=votes).decision
    assert d.expires_at - d.issued_at == 7200
    d = evaluate(policy(min_nodes=1, min_providers=1), prop()).decision
    assert d.expires_at - d.issued_at == 3600
    assert policy(max_ttl_s=MAX_LIFETIME_S).lifetime([10 * MAX_LIFETIME_S]) == MAX_LIFETIME_S


# -- staging -------------------------------------------------------------------------------------
def test_corroborated_decisions_go_to_a_canary_of_the_proposers_first():
    pol = policy(min_nodes=2, min_providers=2)
    d = evaluate(pol, prop("n2", "p2"), votes=[prop("n1", "p1")]).decision
    assert d.scope == {"stage": "canary", "nodes": ["n1", "n2"]}
    assert d.applies_to("n1") and not d.applies_to("n9")
    named = policy(min_nodes=2, min_providers=2, stage_canary=["c1"])
    d = evaluate(named, prop("n2", "p2"), votes=[prop("n1", "p1")]).decision
    assert d.scope["nodes"] == ["c1", "n1", "n2"]
    drawn = policy(min_nodes=2, min_providers=2, stage_canary=2)
    known = ["n1", "n2", "a", "b", "c", "d"]
    d = evaluate(drawn, prop("n2", "p2"), votes=[prop("n1", "p1")], known=known).decision
    extra = set(d.scope["nodes"]) - {"n1", "n2"}
    assert len(extra) == 2 and extra <= {"a", "b", "c", "d"}
    off = policy(min_nodes=1, min_providers=1, stage_s=0)
    assert evaluate(off, prop()).decision.scope == {"stage": "all"}


def test_promotion_after_stage_s_unless_replaced():
    pol = policy(min_nodes=1, min_providers=1, stage_s=60)
    d = evaluate(pol, prop()).decision.to_dict()
    row = {**d, "state": "published", "seq": 7}
    assert pol.promotion(row, row, NOW + 59) is None
    p = pol.promotion(row, row, NOW + 60)
    assert p.scope == {"stage": "all"} and p.expires_at == d["expires_at"]
    assert p.issued_at == NOW + 60 and p.id != d["id"]
    assert p.provenance["promoted_from"] == d["id"]
    assert pol.promotion(row, {**row, "state": "pending"}, NOW + 60) is None
    assert pol.promotion(row, {**row, "id": "revoke"}, NOW + 60) is None
    assert pol.promotion(row, row, d["expires_at"]) is None
    assert pol.promotion(p.to_dict(), {**p.to_dict(), "state": "published"}, NOW + 200) is None


# -- a human on the mesh ---------------------------------------------------------------------------
def test_operator_block_is_authoritative_but_bounded():
    pol = policy()
    out = pol.operator_block("203.0.113.9", 600, "seen in the SOC", "alice", NOW)
    d = out.decision
    assert out.kind == "decide" and d.scope == {"stage": "all"}
    assert d.provenance == {"kind": "operator", "operator": "alice"}
    assert d.target == "203.0.113.9/32" and d.expires_at == NOW + 600
    assert pol.operator_block("203.0.113.9", 10 ** 9, "", "alice", NOW).decision.expires_at \
        == NOW + 86400
    assert pol.operator_block("203.0.113.9", None, "", "alice", NOW).decision.expires_at \
        == NOW + 3600
    assert pol.operator_block("100.64.0.1", 600, "", "alice", NOW).reason.startswith(
        "100.64.0.1/32 overlaps the allowlisted CGNAT")
    assert pol.operator_block("0.0.0.0/1", 600, "", "alice", NOW).kind == "refuse"
    assert pol.operator_block("203.0.113.9", 600, "", "", NOW).kind == "refuse"
    staged = policy(stage_operator=True, stage_canary=["c1"])
    assert staged.operator_block("203.0.113.9", 600, "", "alice", NOW).decision.scope == \
        {"stage": "canary", "nodes": ["c1"]}


def test_operator_revoke_lasts_until_the_block_would_have_expired():
    pol = policy()
    block = pol.operator_block("203.0.113.9", 600, "", "alice", NOW).decision.to_dict()
    out = pol.operator_revoke("203.0.113.9", block, "false positive", "bob", NOW + 10)
    r = out.decision
    assert r.action == "revoke" and r.revokes == block["id"]
    assert r.expires_at == block["expires_at"] and r.subject == \
        "swarm.decisions.v4.203-0-113-9.32"
    assert r.scope == {"stage": "all"}
    assert pol.operator_revoke("203.0.113.9", None, "", "bob", NOW).reason == \
        "203.0.113.9/32 has no active block to revoke"
    assert pol.operator_revoke("203.0.113.9", block, "", "bob", NOW + 601).kind == "refuse"
    assert pol.operator_revoke("203.0.113.9", r.to_dict(), "", "bob", NOW).kind == "refuse"
