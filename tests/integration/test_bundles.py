"""Rule bundles against a live agent process in the lab's victim namespace, over its
control socket with the real CLI: a bundle adds a rule that then fires on a real SYN
flood (kernel threshold and detector), a bad bundle changes nothing, rollback restores
the previous rules (the flood no longer fires), a restart keeps the bundle in force, a
corrupt bundle directory at start leaves the agent on its own rules with a degraded line
in status, and every call is audited without the bundle's content."""
from __future__ import annotations

import json
import os

import pytest

from swarmlab.lab import wait_for
from swarmlab.scenario import AgentProcess
from tests.integration.test_rule_reload import RULE, UDP_ONLY, cli, flood, hits, listing

pytestmark = pytest.mark.privileged


@pytest.fixture
def agent(lab, tmp_path):
    """The agent on a rules file without net.syn_flood (UDP only): a bundle brings it."""
    lab.sources = [lab.attacker] + [lab.add_attacker(i) for i in (1, 2)]
    rules = tmp_path / "rules.yaml"
    rules.write_text(UDP_ONLY)
    proc = AgentProcess(lab.victim, tmp_path, f"rules_file: {rules}\nrules_extra: null\n")
    proc.start()
    yield proc
    proc.stop()


def apply(agent, path, *extra):
    return cli(agent, "bundle", "apply", str(path), *extra)


def status(agent) -> dict:
    done = cli(agent, "status", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_apply_fire_refuse_rollback_restart(lab, agent, tmp_path):
    from swarmlab import attacks
    from swarmlab.scenario import SERVICE_PORT

    server = attacks.start_server(lab.victim, SERVICE_PORT, duration_s=120)
    try:
        # bundle 1: net.syn_flood@1 at 200 SYNs/s, with an anomaly part its validator
        # refuses (the whole bundle is refused, nothing changes)
        b1 = tmp_path / "b1"
        (b1 / "rules").mkdir(parents=True)
        (b1 / "rules" / "syn.yaml").write_text(RULE.format(version=1, syns=200))
        (b1 / "anomaly.yaml").write_text("threshold: 1\n")
        refused = apply(agent, b1)
        assert refused.returncode == 2 and \
            "unknown config key anomaly.threshold" in refused.stderr, refused.stderr
        assert status(agent)["rules"] == ["net.udp_flood@1"]
        os.unlink(b1 / "anomaly.yaml")
        done = apply(agent, b1, "--label", "syn-200", "--comment", "tighter")
        assert done.returncode == 0 and "bundle 1 " in done.stdout, done.stderr
        v1 = listing(agent)["ruleset"]["version"]
        assert status(agent)["rules"] == ["net.udp_flood@1", "net.syn_flood@1"]
        flood(lab.attacker, lab.addr("victim"))
        wait_for(lambda: hits(agent).get("net.syn_flood@1", 0) > 0, 5)

        # a bad bundle (a rule missing a key; a rule id clashing with the rules file):
        # refused with the file, line and reason, nothing changes
        for text, why in (("rules:\n  - id: site.half\n    version: 1\n", "missing key"),
                          (UDP_ONLY, "duplicate id")):
            bad = tmp_path / "bad.yaml"
            bad.write_text(text)
            done = apply(agent, bad)
            assert done.returncode == 6 and why in done.stderr, done.stderr
            assert "Traceback" not in done.stderr
            assert listing(agent)["ruleset"]["version"] == v1
        found = json.loads(cli(agent, "bundle", "list", "--json").stdout)
        assert found["in_force"] == 1 and [b["number"] for b in found["bundles"]] == [1]

        # bundle 2 (one file) loosens the SYN rule so far the flood never fires; rollback
        # brings bundle 1 back (and its kernel threshold)
        b2 = tmp_path / "b2.yaml"
        b2.write_text(RULE.format(version=2, syns=100000))
        assert apply(agent, b2).returncode == 0
        assert status(agent)["rules"] == ["net.udp_flood@1", "net.syn_flood@2"]
        done = cli(agent, "bundle", "rollback", "--comment", "too loose")
        assert done.returncode == 0 and "bundle 2 rolled back; in force: bundle 1" in done.stdout
        assert listing(agent)["ruleset"]["version"] == v1
        before = hits(agent)["net.syn_flood@1"]
        flood(lab.sources[1], lab.addr("victim", link=1))
        wait_for(lambda: hits(agent)["net.syn_flood@1"] > before, 5)
        human = cli(agent, "status").stdout
        assert "bundle in force: 1 " in human and "(syn-200)" in human, human

        # a restart keeps bundle 1 in force
        agent.stop()
        agent.start()
        assert status(agent)["rules"] == ["net.udp_flood@1", "net.syn_flood@1"]
        assert status(agent)["ruleset"]["bundle"]["number"] == 1
        flood(lab.sources[2], lab.addr("victim", link=2))
        wait_for(lambda: hits(agent).get("net.syn_flood@1", 0) > 0, 5)

        done = cli(agent, "bundle", "rollback")
        assert done.returncode == 0 and "in force: no bundle" in done.stdout, done.stdout
        assert status(agent)["rules"] == ["net.udp_flood@1"]
        done = cli(agent, "bundle", "rollback")
        assert done.returncode == 6 and "nothing to roll back" in done.stderr
    finally:
        server.kill()
        server.wait()
    audit = json.loads(cli(agent, "audit", "--json").stdout)
    calls = [(e["method"], e["result"]) for e in reversed(audit) if "Bundle" in e["method"]]
    assert calls == [("ApplyBundle", "INVALID_ARGUMENT"), ("ApplyBundle", "OK"),
                     ("ApplyBundle", "FAILED_PRECONDITION"), ("ApplyBundle", "FAILED_PRECONDITION"),
                     ("ApplyBundle", "OK"), ("RollbackBundle", "OK"), ("RollbackBundle", "OK"),
                     ("RollbackBundle", "FAILED_PRECONDITION")], calls
    applied = next(e for e in reversed(audit) if e["method"] == "ApplyBundle"
                   and e["result"] == "OK")
    assert "syns_per_s" not in json.dumps(applied), applied      # names and digests only
    assert json.loads(applied["arguments_json"])["rules"][0]["name"] == "syn.yaml"


def test_a_corrupt_bundle_dir_at_start_degrades_not_crashes(lab, agent, tmp_path):
    b = tmp_path / "b.yaml"
    b.write_text(RULE.format(version=1, syns=200))
    assert apply(agent, b).returncode == 0
    agent.stop()
    rules = tmp_path / "state" / "bundles" / "b000001" / "rules" / "b.yaml"
    rules.write_text("rules: [1]\n")
    agent.start()
    st = status(agent)
    assert st["rules"] == ["net.udp_flood@1"]
    assert st["ruleset"]["bundle_problem"].startswith("bundle not in force"), st["ruleset"]
    human = cli(agent, "status").stdout
    assert "bundle: degraded: bundle not in force" in human, human
    assert any("bundle not in force at start" in line for line in agent.log_lines)
    # a new bundle repairs it
    b.write_text(RULE.format(version=3, syns=200))
    assert apply(agent, b).returncode == 0
    st = status(agent)
    assert st["rules"] == ["net.udp_flood@1", "net.syn_flood@3"]
    assert not st["ruleset"].get("bundle_problem")


def test_a_bundle_of_1_mib_passes_and_more_is_refused(lab, agent, tmp_path):
    import grpc

    from agent.bundles import MAX_BYTES
    from agent.proto.swarm.control.v1 import control_pb2 as pb
    from agent.proto.swarm.control.v1 import control_pb2_grpc

    head = RULE.format(version=1, syns=200)
    big = tmp_path / "big.yaml"
    lines = (MAX_BYTES - len(head) - 1024) // 1000
    big.write_text(head + ("#" + "x" * 998 + "\n") * lines)
    done = apply(agent, big)
    assert done.returncode == 0, done.stderr
    big.write_text(head + ("#" + "x" * 998 + "\n") * (lines + 2))
    done = apply(agent, big)
    assert done.returncode == 2 and "over 1048576 bytes" in done.stderr, done.stderr
    # past the CLI's check, straight to the API: gRPC refuses it before any handler
    sock = tmp_path / "run" / "control.sock"
    with grpc.insecure_channel(f"unix:{sock}") as channel:
        stub = control_pb2_grpc.ControlStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.ApplyBundle(pb.ApplyBundleRequest(rules=[pb.BundleFile(
                name="big.yaml", content=b"#" * (MAX_BYTES + 128 * 1024))]), timeout=30)
        assert e.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as e:       # the handler's own limit, audited
            stub.ApplyBundle(pb.ApplyBundleRequest(rules=[pb.BundleFile(
                name="big.yaml", content=b"#" * (MAX_BYTES + 1))]), timeout=30)
        assert e.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at most 1048576" in e.value.details()
    assert listing(agent)["ruleset"]["files"][-1].endswith("/b000001/rules/big.yaml")
    audit = json.loads(cli(agent, "audit", "--json").stdout)
    assert all(len(e["arguments_json"]) < 20_000 for e in audit)
