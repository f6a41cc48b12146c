"""The mesh's answers to red team r13 that tests/unit/test_redteam_r13.py does not cover
itself: a future-dated decision retired and re-issued by the periodic pass, the margin a
decision is never dated past, the periodic sweep's order, the retention settings, and what
`swarm-mesh revoke` tells the operator about covering blocks. (Retention pruning itself:
tests/unit/test_mesh_store.py, on both backends.)"""
from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest

from agent.fleet.apply import Message, plan
from agent.fleet.decision import Decision, generate_key, load_private_key, Signer
from mesh import cli, config as mesh_config, supersede
from mesh.decide import Decider
from mesh.policy import Policy, PolicyConfig
from mesh.store import open_store
from tests.unit.test_redteam_r11 import T0, Recorder, decider, prop, store  # noqa: F401
from tests.unit.test_redteam_r12 import CHECKS

X = "203.0.113.7/32"


def run(coro):
    return asyncio.run(coro)


def sent(pub):
    return [Message(i + 1, s, body) for i, (s, body, _) in enumerate(pub.sent)]


def test_a_decision_dated_past_what_agents_take_is_retired_and_issued_again(store):
    dec, pub, clock = decider(store)
    clock.now = T0 + 86300                              # the mesh's clock a day ahead
    run(dec.block(X, 600, "scanner", "ana"))
    clock.now = T0 + 86400
    run(dec.block(X, 3600, "scanner", "ana"))           # the latest: the one issued again
    clock.now = T0 + 60                                 # back; nobody acts on X
    assert run(dec.supersede_future()) == 1 and run(dec.supersede_future()) == 0
    again = json.loads(pub.sent[-1][1])["d"]
    assert again["issued_at"] == T0 + 60 and again["expires_at"] == T0 + 60 + 3600
    assert X in plan({}, sent(pub), CHECKS, T0 + 61).blocks()
    assert store.latest_decision(X)["id"] == again["id"]
    assert any("ahead of the mesh's clock" in r["reason"] for r in store.refusals())


def test_no_decision_is_dated_more_than_the_margin_past_the_mesh_clock(store):
    dec, pub, clock = decider(store)
    clock.now = T0 + 250                     # ahead, but within what agents take
    run(dec.block(X, 3600, "scanner", "ana"))
    clock.now = T0
    out = run(dec.revoke(X, "false positive", "bob"))
    assert out.kind == "refuse" and "try again in 131 s" in out.reason, out
    assert len(pub.sent) == 1
    clock.now = T0 + 200                     # the clock caught up: follows the block
    out = run(dec.revoke(X, "false positive", "bob"))
    issued = json.loads(pub.sent[-1][1])["d"]["issued_at"]
    assert out.kind == "decide" and issued == T0 + 250.001
    assert issued <= clock.now + supersede.FUTURE_MARGIN_S
    assert X not in plan({}, sent(pub), CHECKS, T0 + 201).blocks()


def test_the_periodic_sweep_decides_the_most_proposed_targets_first(store):
    dec, pub, clock = decider(store)
    for node, provider in (("n1", "acme"), ("n2", "acme"), ("n3", "globex")):
        store.add_proposal(prop(node, provider, now=clock.now))       # never handed over
    for i in range(5):                                   # newer, one node each
        store.add_proposal(prop("lone", "shady", target=f"198.51.100.{i}/32", n=i,
                                now=clock.now + 1))
    clock.now += 2
    assert run(dec.sweep(limit=1)) == 1
    assert [json.loads(b)["d"]["target"] for _, b, _ in pub.sent] == [X]


@pytest.mark.parametrize("data, message", [
    ({"proposals_keep_s": 600}, "proposals_keep_s (600) must be at least the policy's"),
    ({"proposals_keep_s": 7200, "policy": {"corroboration_window_s": 9000}}, "(9000 s)"),
    ({"proposals_keep_s": 7200, "refusals_keep_s": 3600}, "refusals_keep_s (3600) must be"),
])
def test_retention_below_what_the_policy_reads_is_refused(data, message):
    with pytest.raises(mesh_config.MeshConfigError, match=message.replace("(", r"\(")
                       .replace(")", r"\)")):
        mesh_config.from_dict(data)


def test_revoke_tells_the_operator_which_covering_blocks_stay(tmp_path, capsys):
    """`swarm-mesh revoke` against a store holding a /24 and a /32 block (nats-server away:
    the revoke stays pending, which the command says too)."""
    key, pub_key = tmp_path / "decisions.key", tmp_path / "decisions.pub"
    generate_key(key, pub_key)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                        # closed once the block ends
    db = f"sqlite:///{tmp_path}/mesh.db"
    st = open_store(db)
    dec = Decider(st, Policy(PolicyConfig.from_dict({})), Signer(load_private_key(str(key))),
                  Recorder())
    run(dec.block("203.0.113.0/24", 3600, "scan range", "ana"))
    run(dec.block(X, 3600, "scanner", "ana"))
    st.close()
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(json.dumps({"store": db, "signing": {"private_key": str(key)},
                               "nats": {"url": f"nats://127.0.0.1:{port}",
                                        "connect_timeout_s": 0.3}}))
    start = time.monotonic()
    with pytest.raises(SystemExit) as done:
        cli.main(["revoke", "203.0.113.7", "--reason", "customer", "--operator", "bob",
                  "--config", str(cfg), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert done.value.code == 0 and out["outcome"] == "decide", out
    assert [c["target"] for c in out["covering"]] == ["203.0.113.0/24"]
    assert "still blocked by the covering block(s) 203.0.113.0/24" in out["reason"]
    assert time.monotonic() - start < 5
    assert Decision.from_dict(out["decision"]).action == "revoke"
