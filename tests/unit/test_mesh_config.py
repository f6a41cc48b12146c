"""The mesh service's config (mesh/config.py) and its fleet view (mesh/views.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from mesh import views
from mesh.config import (MeshConfig, MeshConfigError, from_dict, load, shown_url, split_listen,
                         store_kind)


def test_defaults_and_the_decision_services_sections_are_kept_as_dicts(tmp_path: Path):
    cfg = from_dict({})
    assert (cfg.listen, cfg.store, cfg.node_stale_s) == \
        ("127.0.0.1:7443", "sqlite:///var/lib/swarm-mesh/mesh.db", 90.0)
    f = tmp_path / "mesh.yaml"
    f.write_text("listen: '[::1]:0'\nstore: /srv/mesh.db\nnode_stale_s: 30\n"
                 "nats: {url: 'nats://127.0.0.1:4222', creds: {a: 1}}\nsigning: {key: /k}\n"
                 "policy: {max_prefix_v4: 24}\nlog_format: plain\n")
    cfg = load(f)
    assert cfg.nats == {"url": "nats://127.0.0.1:4222", "creds": {"a": 1}}
    assert (cfg.signing, cfg.policy) == ({"key": "/k"}, {"max_prefix_v4": 24})
    assert (cfg.listen, cfg.store, cfg.node_stale_s, cfg.log_format, cfg.path) == \
        ("[::1]:0", "/srv/mesh.db", 30.0, "plain", str(f))
    (tmp_path / "empty.yaml").write_text("")
    assert load(tmp_path / "empty.yaml").listen == "127.0.0.1:7443"


@pytest.mark.parametrize("data, needle", [
    ({"listen": "7443"}, "listen must be host:port"),
    ({"listen": "host:99999"}, "listen must be host:port"),
    ({"listen": "fe80::1:7443"}, "listen must be host:port"),
    ({"store": "mysql://db/mesh"}, "store must be sqlite"),
    ({"store": ""}, "store must be a non-empty string"),
    ({"node_stale_s": 0}, "node_stale_s must be a positive"),
    ({"node_stale_s": True}, "node_stale_s must be a positive"),
    ({"max_message_bytes": 10}, "max_message_bytes must be"),
    ({"policy": "strict"}, "policy must be a mapping"),
    ({"log_format": "xml"}, "log_format must be one of"),
    ({"tls_ca": 5}, "tls_ca must be a non-empty string"),
    ({"colour": "red"}, "unknown config key 'colour'"),
    ([1, 2], "must be a mapping"),
])
def test_bad_values_are_one_sentence(data, needle):
    with pytest.raises(MeshConfigError, match=needle) as e:
        from_dict(data, "mesh.yaml")
    assert "\n" not in str(e.value)


def test_serving_needs_the_three_tls_files_readable(tmp_path: Path):
    with pytest.raises(MeshConfigError, match="lacks tls_cert, tls_key, tls_ca"):
        MeshConfig().require_tls()
    (tmp_path / "c.pem").write_text("x")
    cfg = from_dict({"tls_cert": str(tmp_path / "c.pem"), "tls_key": str(tmp_path / "c.pem"),
                     "tls_ca": str(tmp_path / "none.pem")})
    with pytest.raises(MeshConfigError, match="tls_ca: cannot read .*none.pem: No such file"):
        cfg.require_tls()


def test_a_file_that_is_not_yaml_or_has_a_key_twice_is_refused(tmp_path: Path):
    f = tmp_path / "m.yaml"
    f.write_text("listen: a:1\nlisten: b:2\n")
    with pytest.raises(MeshConfigError, match="given twice"):
        load(f)
    f.write_text("listen: [\n")
    with pytest.raises(MeshConfigError, match="not valid YAML"):
        load(f)


def test_listen_and_store_forms():
    assert split_listen("[::1]:7443") == ("::1", 7443)
    assert split_listen("0.0.0.0:0") == ("0.0.0.0", 0)
    assert store_kind("postgres://u@h/db") == "postgresql"
    assert store_kind("sqlite:///x.db") == store_kind("x.db") == "sqlite"


def test_a_store_url_is_shown_without_its_passwords():
    assert shown_url("postgresql://mesh:pw1@db/mesh?sslpassword=pw2&sslmode=verify-full"
                     "&PASSWORD=pw3") == ("postgresql://mesh:***@db/mesh?sslpassword=***"
                                          "&sslmode=verify-full&PASSWORD=***")
    with pytest.raises(MeshConfigError) as e:
        store_kind("postgresql+psycopg2://mesh:pw1@db/mesh")
    assert "pw1" not in str(e.value)


def test_the_fleet_view_marks_stale_nodes_and_cleans_what_nodes_sent():
    now = 1000.0
    nodes = views.with_status([
        {"node": "a", "last_seen": 950.0}, {"node": "b\x1b[2J", "last_seen": 800.0}], now, 90.0)
    assert [(n["status"], n["age_s"]) for n in nodes] == [("alive", 50.0), ("stale", 200.0)]
    for n in nodes:
        n.update(provider="p", version="1", ruleset_version="sha256:x", fleet_seq=3,
                 ready=True, open_incidents={"system_attack": 2})
    lines = views.nodes_lines(nodes, now)
    assert "\x1b" not in "".join(lines) and "b\\x1b[2J" in lines[2]
    assert lines[-1] == "2 nodes: 1 alive, 1 stale"
    assert "system_attack=2" in lines[1]
    assert views.ago(0, now) == "-" and views.ago(now - 7200, now) == "2h ago"


def test_the_decision_proposal_and_refusal_tables_render():
    now = 1000.0
    d = {"id": "d" * 32, "action": "block", "target": "203.0.113.7/32", "issued_at": 990.0,
         "expires_at": 1600.0, "reason": "corroborated", "provenance": {},
         "scope": {"stage": "canary", "nodes": ["a"]}, "revokes": "", "v": 1,
         "state": "published", "seq": 4, "published_at": 991.0}
    lines = views.decisions_lines([d, {**d, "expires_at": 995.0, "seq": 0}], now)
    assert "in 600s" in lines[1] and "canary" in lines[1] and "expired" in lines[2]
    p = {"node": "a", "provider": "", "target": "203.0.113.7/32", "operator": "",
         "rule": "net.port_scan", "rule_version": 2, "received_at": 999.0, "evidence": "x\ny"}
    lines = views.proposals_lines([p, {**p, "operator": "alice"}], now)
    assert "net.port_scan@2" in lines[1] and "x\\ny" in lines[1] and "operator alice" in lines[2]
    r = {"at": 999.0, "node": "a", "provider": "p", "target": "0.0.0.0/1", "source": "proposal",
         "reason": "prefix /1 is wider than /24"}
    assert "prefix /1 is wider" in views.refusals_lines([r], now)[1]
