"""The fleet decision format: signatures, subjects, well-formedness, forgeries."""
from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.fleet.decision import (Decision, DecisionError, Signer, Verifier, canonical,
                                  generate_key, load_private_key, load_public_key,
                                  normalize_target, subject_for)

NOW = 1_800_000_000.0


def block(target="203.0.113.7/32", **kw) -> Decision:
    return Decision(action="block", target=target, issued_at=NOW, expires_at=NOW + 3600,
                    reason="ssh brute force", provenance={"kind": "operator", "operator": "ana"},
                    **kw)


@pytest.fixture
def pair():
    key = Ed25519PrivateKey.generate()
    return Signer(key), Verifier([key.public_key()])


def test_a_signed_decision_opens_on_its_subject(pair):
    signer, verifier = pair
    d = block()
    got = verifier.open(signer.envelope(d), d.subject, NOW)
    assert got == d
    assert d.subject == "swarm.decisions.v4.203-0-113-7.32"
    assert subject_for("2001:db8::/48") == "swarm.decisions.v6.2001_db8__.48"


def test_key_files_round_trip(tmp_path):
    kid = generate_key(tmp_path / "k", tmp_path / "k.pub")
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    signer = Signer(load_private_key(tmp_path / "k"))
    verifier = Verifier([load_public_key(tmp_path / "k.pub")])
    assert signer.key_id == kid and list(verifier.keys) == [kid]
    d = block()
    assert verifier.open(signer.envelope(d), d.subject, NOW) == d
    with pytest.raises(FileExistsError):
        generate_key(tmp_path / "k", tmp_path / "k2.pub")       # never over a key
    with pytest.raises(DecisionError, match="not an Ed25519 public key"):
        load_public_key(tmp_path / "k")


def test_forgeries_are_refused_with_a_reason(pair):
    signer, verifier = pair
    d = block()
    env = json.loads(signer.envelope(d))
    tampered = dict(env, d=dict(env["d"], target="198.51.100.0/24"))
    other = Signer(Ed25519PrivateKey.generate())
    cases = {
        b"not json": "not JSON",
        canonical({"d": env["d"]}): "not a signed decision envelope",
        canonical(tampered): "bad signature",
        canonical(dict(env, s="!!")): "bad signature",
        canonical(dict(env, s=base64.b64encode(b"x" * 64).decode())): "bad signature",
        other.envelope(d): "untrusted key",
        b"{" + b" " * 20000 + b"}": "over",
    }
    for body, reason in cases.items():
        with pytest.raises(DecisionError, match=reason):
            verifier.open(body, d.subject, NOW)


def test_a_decision_replayed_on_another_targets_subject_is_refused(pair):
    signer, verifier = pair
    d = block("198.51.100.9/32")
    with pytest.raises(DecisionError, match="its target's subject"):
        verifier.open(signer.envelope(d), subject_for("203.0.113.7/32"), NOW)


@pytest.mark.parametrize("change, reason", [
    ({"action": "allow"}, "action"),
    ({"target": "203.0.113.7/24"}, "host bits"),
    ({"target": "example.com"}, "characters no address"),
    ({"expires_at": NOW - 1}, "expires before"),
    ({"expires_at": NOW + 30 * 86400}, "over the cap"),
    ({"issued_at": NOW + 3600, "expires_at": NOW + 7200}, "future"),
    ({"scope": {"stage": "half"}}, "stage"),
    ({"scope": {"stage": "canary"}}, "names its nodes"),
    ({"v": 2}, "version"),
    ({"issued_at": True}, "not a time"),
])
def test_malformed_decisions_are_refused_even_when_signed(pair, change, reason):
    signer, verifier = pair
    d = block()
    body = canonical(dict(d.to_dict(), **change))
    env = {"d": json.loads(body), "k": signer.key_id,
           "s": base64.b64encode(signer._key.sign(canonical(json.loads(body)))).decode()}
    subject = d.subject
    with pytest.raises(DecisionError, match=reason):
        verifier.open(canonical(env), subject, NOW)


def test_unknown_and_missing_fields_are_refused(pair):
    signer, verifier = pair
    for d in ({**block().to_dict(), "extra": 1}, {"action": "block"}, [1]):
        env = {"d": d, "k": signer.key_id,
               "s": base64.b64encode(signer._key.sign(canonical(d))).decode()}
        with pytest.raises(DecisionError):
            verifier.open(canonical(env), block().subject, NOW)


def test_expired_decisions_are_refused(pair):
    signer, verifier = pair
    d = block()
    with pytest.raises(DecisionError, match="expired"):
        verifier.open(signer.envelope(d), d.subject, NOW + 3601)


def test_staged_scope():
    canary = block(scope={"stage": "canary", "nodes": ["n1"]})
    assert canary.applies_to("n1") and not canary.applies_to("n2")
    assert block().applies_to("anyone")


def test_normalize_target():
    assert normalize_target("203.0.113.7") == "203.0.113.7/32"
    assert normalize_target("2001:DB8::1") == "2001:db8::1/128"
    for bad in ("", "10.0.0.1/33", "1.2.3.4/8", None, "x" * 100):
        with pytest.raises(DecisionError):
            normalize_target(bad)


def test_no_trusted_key_is_an_error():
    with pytest.raises(DecisionError, match="no trusted"):
        Verifier([])
