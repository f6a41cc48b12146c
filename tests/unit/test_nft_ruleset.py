"""The nftables ruleset as data: partitions, element JSON, the table batch, listing parsing."""
from __future__ import annotations

import ipaddress
import json

import pytest

from agent.config import Config, Enforce, Reroute
from agent.enforce import listing
from agent.enforce.base import EnforceError, UnsupportedMitigation
from agent.enforce.nft import _incremental, _validate
from agent.enforce.ruleset import (CHALLENGE_CHAIN, DNAT_CHAIN, syn_wait_text, FILTER_CHAIN, NAT_CHAIN, Service, Span, desired_contents,
                                   elements_json, parse_service, partition, set_for, table_batch,
                                   timeout_s)
from agent.model import Mitigation, MitigationKind as K

NOW = 1_000_000.0


def span(text: str) -> Span:
    return Span.of(ipaddress.ip_network(text))


def mit(kind: K, target: str, lifetime: float | None = 60.0) -> Mitigation:
    return Mitigation(kind, target, NOW, None if lifetime is None else NOW + lifetime)


def test_span_text_and_json():
    assert str(span("10.0.0.5")) == "10.0.0.5" and span("10.0.0.5").to_json() == "10.0.0.5"
    assert span("10.0.0.0/24").to_json() == {"prefix": {"addr": "10.0.0.0", "len": 24}}
    odd = Span(4, int(ipaddress.ip_address("10.0.0.0")), int(ipaddress.ip_address("10.0.0.4")))
    assert odd.to_json() == {"range": ["10.0.0.0", "10.0.0.4"]}
    assert str(span("fd00::/64")) == "fd00::/64"


def test_partition_gives_each_address_its_latest_expiry():
    parts = partition([(span("10.0.0.0/24"), NOW + 10), (span("10.0.0.5"), NOW + 20)])
    assert [(str(k), v) for k, v in sorted(parts.items())] == [
        ("10.0.0.0-10.0.0.4", NOW + 10), ("10.0.0.5", NOW + 20), ("10.0.0.6-10.0.0.255", NOW + 10)]
    # A covered address with a shorter life disappears into the covering element.
    assert partition([(span("10.0.0.0/24"), None), (span("10.0.0.5"), NOW)]) == {span("10.0.0.0/24"): None}
    # Adjacent equal expiries merge; other versions stay apart.
    merged = partition([(span("10.0.0.0/25"), None), (span("10.0.0.128/25"), None), (span("::1"), None)])
    assert merged == {span("10.0.0.0/24"): None, span("::1"): None}


def test_parse_service_and_set_for():
    assert parse_service("TCP/80") == Service("tcp", 80)
    for bad in ("icmp/1", "tcp/0", "tcp/65536", "tcp", "udp/x"):
        with pytest.raises(EnforceError, match="not a service"):
            parse_service(bad)
    cfg = Config()
    assert set_for(mit(K.BLOCK_IP, "10.0.0.1"), cfg) == ("block_v4", span("10.0.0.1"))
    assert set_for(mit(K.RATE_LIMIT, "fd00::/64"), cfg) == ("ratelimit_v6", span("fd00::/64"))
    with pytest.raises(UnsupportedMitigation):
        set_for(mit(K.REROUTE, "10.0.0.1"), cfg)          # reroute not configured
    with pytest.raises(UnsupportedMitigation):
        set_for(mit(K.FREEZE_CGROUP, "x"), cfg)
    with pytest.raises(EnforceError, match="not an IP address"):
        set_for(mit(K.BLOCK_IP, "nonsense"), cfg)


def test_desired_contents_skips_expired_and_foreign_and_collapses_allowlist():
    allow = [ipaddress.ip_network(n) for n in ("127.0.0.0/8", "127.0.0.1/32", "::1/128")]
    ms = [mit(K.BLOCK_IP, "10.0.0.1"), mit(K.BLOCK_IP, "10.0.0.2", 0), mit(K.KILL_PROCESS, "7"),
          mit(K.RATE_LIMIT_SERVICE, "udp/53", None), mit(K.RATE_LIMIT_SERVICE, "udp/53", 5)]
    c = desired_contents(ms, Config(), NOW, allow)
    assert c["block_v4"] == {span("10.0.0.1"): NOW + 60}
    assert c["allow_v4"] == {span("127.0.0.0/8"): None}
    assert c["svc_ratelimit"] == {Service("udp", 53): None}


def test_timeouts_round_up_with_a_floor():
    assert timeout_s(None, NOW) is None
    assert timeout_s(NOW + 1.2, NOW) == 2
    assert timeout_s(NOW + 0.01, NOW) == 1
    assert elements_json({span("10.0.0.1"): NOW + 5, span("10.0.0.9"): None}, NOW) == [
        {"elem": {"val": "10.0.0.1", "timeout": 5}}, "10.0.0.9"]


def _rules(batch, chain):
    return [c["add"]["rule"]["expr"] for c in batch if "rule" in c.get("add", {})
            and c["add"]["rule"]["chain"] == chain]


def test_table_batch_order_and_options():
    cfg = Config(enforce=Enforce(set_size=123, reroute=Reroute(sinkhole_v4="10.9.9.9", mark=7)))
    batch = table_batch(cfg, {}, NOW)
    assert [list(c) for c in batch[:3]] == [["add"], ["delete"], ["add"]]
    filt = _rules(batch, FILTER_CHAIN)
    assert [r[-1] for r in filt[:2]] == [{"accept": None}] * 2        # allowlist first
    assert [r[0]["match"]["right"] for r in filt[:4]] == ["@allow_v4", "@allow_v6", "@block_v4", "@block_v6"]
    assert any("mangle" in e and e["mangle"]["value"] == 7 for r in filt for e in r)
    nat = _rules(batch, NAT_CHAIN)
    assert nat[0][-1] == {"accept": None} and nat[-1][-1]["dnat"] == {"family": "ip", "addr": "10.9.9.9"}
    sizes = {c["add"]["set"]["name"]: c["add"]["set"].get("size") for c in batch if "set" in c.get("add", {})}
    assert sizes["block_v4"] == 123 and sizes["allow_v4"] is None
    assert not _rules(table_batch(Config(), {}, NOW), NAT_CHAIN)



def test_challenges_take_their_own_sets_and_chain():
    assert set_for(mit(K.CHALLENGE, "10.0.0.7"), Config()) == ("challenge_v4", span("10.0.0.7"))
    assert set_for(mit(K.CHALLENGE, "2001:db8::/64"), Config())[0] == "challenge_v6"
    assert set_for(mit(K.CHALLENGE_SERVICE, "udp/53"), Config()) == ("svc_challenge", Service("udp", 53))
    with pytest.raises(EnforceError):
        set_for(mit(K.CHALLENGE_SERVICE, "10.0.0.7"), Config())
    got = desired_contents([mit(K.CHALLENGE_SERVICE, "tcp/80"), mit(K.RATE_LIMIT_SERVICE, "tcp/80")],
                           Config(), NOW, [])
    assert got["svc_challenge"] == {Service("tcp", 80): NOW + 60} == got["svc_ratelimit"]
    batch = table_batch(Config(), {}, NOW)
    # Challenged SYNs skip conntrack before it runs; the SYN proxy answers them after it.
    # Only those to this host that are not DNAT'd (an untracked SYN is never translated):
    # a service's when a local socket takes them, a source's unless its port was seen DNAT'd.
    notrack = [r for r in _rules(batch, FILTER_CHAIN) if {"notrack": None} in r]
    assert len(notrack) == 6 and sum("syn" in str(r[0]) for r in notrack) == 5
    assert all('"fib"' in json.dumps(r) for r in notrack)
    for r in notrack:
        text = json.dumps(r)
        assert ('"socket"' in text) != ("@dnat_ports" in text), r
        assert "@dnat_ports" not in text or "@challenge_v" in text     # sources only
    text = syn_wait_text()      # a second, text transaction: the SYN wait of tracked ones
    assert "policy = { syn_sent: 5, syn_recv: 5 }" in text and text.count("ct timeout set") == 3
    learn = _rules(batch, DNAT_CHAIN)
    assert len(learn) == 4 and all('"dnat"' in json.dumps(r) and "@dnat_ports" in json.dumps(r)
                                   and "@reroute_v" in json.dumps(r) for r in learn)
    chain = _rules(batch, CHALLENGE_CHAIN)
    assert [r[-1] for r in chain[:3]] == [{"accept": None}] * 3       # allowlist, established
    proxied = [r for r in chain if "synproxy" in r[-1]]
    assert len(proxied) == 3
    assert all(any(e.get("match", {}).get("right") == ["invalid", "untracked"] for e in r)
               for r in proxied)
    # Nothing else of a challenged source is dropped outright: only over its own limit.
    drops = [r for r in chain if r[-1] == {"drop": None}]
    assert all(any("synproxy" in str(e) or "limit" in str(e) or e.get("match", {}).get("right")
                   == ["invalid", "untracked"] for e in r) for r in drops)


LISTING = {"nftables": [
    {"metainfo": {"version": "1.0.6"}},
    {"set": {"family": "inet", "table": "swarm_agent", "name": "block_v4", "handle": 4,
             "elem": [{"elem": {"val": {"prefix": {"addr": "10.0.0.0", "len": 24}}, "timeout": 10,
                                "expires": 9}}, "10.0.1.5",
                      {"elem": {"val": {"range": ["10.0.2.0", "10.0.2.6"]}, "timeout": 5, "expires": 4}}]}},
    {"set": {"family": "inet", "table": "swarm_agent", "name": "svc_ratelimit", "handle": 7,
             "elem": [{"concat": ["udp", 53]}]}},
    {"rule": {"family": "inet", "table": "swarm_agent", "chain": "c", "handle": 9,
              "expr": [{"counter": {"packets": 5, "bytes": 100}}, {"accept": None}]}},
]}


def test_listing_elements_and_fingerprint():
    objs = listing.objects(LISTING)
    have = listing.elements(objs)
    assert have["block_v4"] == {span("10.0.0.0/24"): 9.0, span("10.0.1.5"): None,
                                Span(4, int(ipaddress.ip_address("10.0.2.0")),
                                     int(ipaddress.ip_address("10.0.2.6"))): 4.0}
    assert have["svc_ratelimit"] == {Service("udp", 53): None}
    # Counters, handles and elements do not make the structure differ.
    changed = listing.objects({"nftables": [
        {"set": {"family": "inet", "table": "swarm_agent", "name": "block_v4", "handle": 99}},
        {"set": {"family": "inet", "table": "swarm_agent", "name": "svc_ratelimit"}},
        {"rule": {"family": "inet", "table": "swarm_agent", "chain": "c",
                  "expr": [{"counter": {"packets": 0, "bytes": 0}}, {"accept": None}]}}]})
    assert listing.fingerprint(objs) == listing.fingerprint(changed)
    assert listing.fingerprint(objs) != listing.fingerprint(changed[:2])


def test_diff_tolerates_small_timeout_differences():
    want = {span("10.0.0.1"): NOW + 10, span("10.0.0.2"): None, span("10.0.0.3"): NOW + 50}
    have = {span("10.0.0.1"): 9.0, span("10.0.0.2"): 30.0, span("10.0.0.4"): None, span("10.0.0.3"): 20.0}
    added, removed = listing.diff_set(want, have, NOW)
    assert added == [span("10.0.0.2"), span("10.0.0.3")]
    assert removed == [span("10.0.0.2"), span("10.0.0.3"), span("10.0.0.4")]


def test_incremental_readds_before_delete_and_validate_guards_the_table():
    old = {span("10.0.0.1"): NOW + 10}
    new = {span("10.0.0.1"): NOW + 30, span("10.0.0.2"): None}
    cmds = _incremental("block_v4", old, new, NOW)
    assert [list(c)[0] for c in cmds] == ["add", "delete", "add"]
    assert cmds[2]["add"]["element"]["elem"] == [{"elem": {"val": "10.0.0.1", "timeout": 30}}, "10.0.0.2"]
    assert _incremental("block_v4", old, old, NOW) == []
    with pytest.raises(EnforceError, match="left table"):
        _validate({"nftables": [{"delete": {"table": {"family": "inet", "name": "filter"}}}]})
