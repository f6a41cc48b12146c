"""The pure fleet apply plan (agent.fleet.apply), the fleet table's batches
(agent.enforce.fleet) and the fleet: config section, without I/O."""
from __future__ import annotations

import ipaddress
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import config as C
from agent.enforce.fleet import change_batch, split, table_batch
from agent.fleet.apply import Checks, Message, plan
from agent.fleet.decision import Decision, Signer, Verifier

NOW = 1_800_000_000.0
KEY, OTHER = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
SIGNER = Signer(KEY)
CHECKS = Checks(Verifier([KEY.public_key()]), "node-a",
                allow=[ipaddress.ip_network("10.9.0.0/24"), ipaddress.ip_network("127.0.0.0/8")])


def msg(seq: int, d: Decision, signer: Signer = SIGNER) -> Message:
    return Message(seq, d.subject, signer.envelope(d))


def block(target: str, at: float = NOW, **kw) -> Decision:
    return Decision("block", target, at, at + 600, **kw)


def test_a_block_then_its_revoke_and_a_replayed_block_is_stale():
    b = block("203.0.113.7/32")
    out = plan({}, [msg(1, b)], CHECKS, NOW)
    assert out.blocks() == {"203.0.113.7/32": NOW + 600} and out.cursor == 1
    r = Decision("revoke", b.target, NOW + 1, NOW + 600, revokes=b.id)
    out2 = plan(out.upserts, [msg(2, r), msg(3, b)], CHECKS, NOW + 2)
    assert out2.lifts(out.upserts) == {"203.0.113.7/32"} and out2.blocks() == {}
    assert [x.reason for x in out2.refusals] == ["stale"] and out2.cursor == 3


@pytest.mark.parametrize("message, reason", [
    (lambda: msg(1, block("203.0.113.7/32"), Signer(OTHER)), "untrusted_key"),
    (lambda: Message(1, block("203.0.113.7/32").subject, b"{}"), "malformed"),
    (lambda: Message(1, "swarm.decisions.v4.1-1-1-1.32", SIGNER.envelope(block("203.0.113.7/32"))),
     "wrong_subject"),
    (lambda: msg(1, block("203.0.113.7/32", at=NOW - 700)), "expired"),
    (lambda: msg(1, block("10.0.0.0/8")), "too_wide"),
    (lambda: msg(1, block("10.9.0.5/32")), "allowlisted"),
    (lambda: msg(1, block("10.9.0.0/16")), "allowlisted"),     # overlaps, not only inside
])
def test_refusals_are_counted_by_reason(message, reason):
    out = plan({}, [message()], CHECKS, NOW)
    assert [r.reason for r in out.refusals] == [reason] and not out.upserts


def test_a_tampered_envelope_is_a_bad_signature():
    env = json.loads(SIGNER.envelope(block("203.0.113.7/32")))
    env["d"]["expires_at"] += 86400
    out = plan({}, [Message(1, block("203.0.113.7/32").subject, json.dumps(env).encode())],
               CHECKS, NOW)
    assert [r.reason for r in out.refusals] == ["bad_signature"]


def test_scope_canary_for_others_is_skipped_not_refused():
    d = block("203.0.113.7/32", scope={"stage": "canary", "nodes": ["node-b"]})
    out = plan({}, [msg(1, d)], CHECKS, NOW)
    assert not out.upserts and not out.refusals and out.skipped == 1


def test_a_key_change_reload_lifts_only_what_an_untrusted_key_signed():
    """After fleet.keys changed, a complete reload lifts the blocks of a key no longer
    trusted that it did not bring again under a trusted key, and nothing else."""
    from dataclasses import replace
    from agent.fleet.decision import key_id

    both = Checks(Verifier([KEY.public_key(), OTHER.public_key()]), "node-a")
    a, b, c = block("203.0.113.1/32"), block("203.0.113.2/32"), block("203.0.113.3/32")
    have = plan({}, [msg(1, a), msg(2, b), msg(3, c, Signer(OTHER))], both, NOW).upserts
    assert have[a.target].key == key_id(KEY.public_key())
    # OTHER is kept, KEY added: nothing is lifted, whatever the reload omits
    assert not plan(have, [], both, NOW + 1, snapshot=True, keys_before=[key_id(OTHER.public_key())]).removed
    # KEY removed: its block a goes; b, re-signed by the kept key, stays (key recorded)
    only_other = Checks(Verifier([OTHER.public_key()]), "node-a")
    out = plan(have, [msg(7, b, Signer(OTHER))], only_other, NOW + 1, snapshot=True,
               keys_before=sorted(both.verifier.keys))
    assert out.removed == {a.target} and out.upserts[b.target].key == key_id(OTHER.public_key())
    # entries from before keys were recorded: kept while every key trusted before is
    keyless = {t: replace(e, key="") for t, e in have.items()}
    assert not plan(keyless, [], both, NOW + 1, snapshot=True,
                    keys_before=sorted(both.verifier.keys)).removed
    out = plan(keyless, [msg(7, b, Signer(OTHER))], only_other, NOW + 1, snapshot=True,
               keys_before=sorted(both.verifier.keys))
    assert out.removed == {a.target, c.target}


def test_the_same_decision_at_another_sequence_records_it_and_changes_nothing_else():
    """A recreated stream holds the decisions at new sequences: the entry takes the new
    one (the anti-entropy read skips what an entry holds, unverified)."""
    b = block("203.0.113.7/32")
    have = plan({}, [msg(1, b)], CHECKS, NOW).upserts
    out = plan(have, [msg(40, b)], CHECKS, NOW + 1)
    assert out.upserts[b.target].seq == 40 and out.skipped == 1 and not out.applied
    assert out.upserts[b.target].applied_at == NOW and out.lifts(have) == set()


def test_fleet_table_batches_split_hosts_from_networks_and_partition_overlaps():
    blocks = {"203.0.113.7/32": NOW + 60, "2001:db8::1/128": NOW + 60,
              "198.51.100.0/24": NOW + 60, "198.51.100.0/25": NOW + 120}
    hosts, nets = split(blocks)
    assert set(hosts) == {"203.0.113.7", "2001:db8::1"} and len(nets[4]) == 2
    cmds = table_batch(blocks, [ipaddress.ip_network("127.0.0.0/8")], NOW)
    assert all(next(iter(next(iter(c.values())).values()))["family"] == "inet" for c in cmds)
    net_elems = [c["add"]["element"]["elem"] for c in cmds
                 if "add" in c and "element" in c["add"] and c["add"]["element"]["name"] == "fleet_net_v4"]
    assert len(net_elems[0]) == 2     # /25 (later expiry) and the other half: no overlap
    change = change_batch(blocks, {**blocks, "203.0.113.7/32": NOW + 999}, NOW)
    verbs = [(next(iter(c)), next(iter(c.values()))["element"]["name"]) for c in change]
    assert verbs == [("add", "fleet_v4"), ("delete", "fleet_v4"), ("add", "fleet_v4")]


def test_config_fleet_section(tmp_path):
    pub = tmp_path / "k.pub"
    pub.write_text("x")
    cfg = C.validate(C.Config(fleet=C.FleetConfig(nats_url="nats://127.0.0.1:4222", keys=(str(pub),))))
    assert cfg.fleet.enabled and not cfg.fleet.proposing(None)
    for bad, words in [(C.FleetConfig(nats_url="http://x:1", keys=(str(pub),)), "nats://"),
                       (C.FleetConfig(nats_url="nats://x:1"), "fleet.keys"),
                       (C.FleetConfig(propose=True), "mesh.endpoint")]:
        with pytest.raises(C.ConfigError, match=words):
            C.validate(C.Config(fleet=bad))
    y = tmp_path / "c.yaml"
    y.write_text(f"fleet:\n  nats_url: nats://h:4222\n  keys: [{pub}]\n  max_prefix_v4: 0\n")
    with pytest.raises(C.ConfigError, match="max_prefix_v4"):
        C.load(y)


class RefusingEnforcer:
    """A FleetEnforcer whose 'kernel' refuses any batch naming one poisoned address and
    keeps the host elements of the batches it accepted (no nftables touched)."""

    @staticmethod
    def make(poison: str):
        from agent.enforce.base import EnforceError
        from agent.enforce.fleet import FleetEnforcer

        class Enforcer(FleetEnforcer):
            def _send(self, cmds):
                if poison in json.dumps(cmds):
                    raise EnforceError("nftables refused the fleet change: poisoned")
                for cmd in cmds:
                    if "delete" in cmd and "table" in cmd["delete"]:
                        self.kernel = set()
                    elif "add" in cmd and "element" in cmd["add"]:
                        self.kernel |= {e["elem"]["val"] if isinstance(e, dict) else e
                                        for e in cmd["add"]["element"]["elem"]
                                        if not isinstance(e, dict) or "elem" in e}
                    elif "delete" in cmd and "element" in cmd["delete"]:
                        self.kernel -= set(cmd["delete"]["element"]["elem"])
        enf = Enforcer(dry_run=False)
        enf.kernel = set()
        return enf


def test_an_element_the_kernel_refuses_does_not_sink_the_batch_or_later_ones():
    enf = RefusingEnforcer.make("198.51.100.66")
    enf.setup({}, [ipaddress.ip_network("127.0.0.0/8")], NOW)
    blocks = {f"198.51.100.{i}/32": NOW + 600 for i in range(60, 70)}
    enf.change(blocks, NOW)
    assert enf.take_rejected()[0][0] == "198.51.100.66/32" and enf.take_rejected() == []
    assert set(enf.blocks) == set(blocks) - {"198.51.100.66/32"}
    assert enf.kernel == {t.split("/")[0] for t in enf.blocks}
    enf.update({"203.0.113.1/32": NOW + 600}, NOW)          # an ordinary delta again
    assert "203.0.113.1" in enf.kernel and enf.take_rejected() == []
    enf.update({"198.51.100.66/32": None}, NOW)             # revoked: forgotten
    assert "198.51.100.66/32" not in enf.rejected
