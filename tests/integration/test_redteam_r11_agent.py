"""Red team r11, the agent's fleet table in the kernel (root, a network namespace of its
own): a signed fleet decision whose target carries an IPv6 zone. FAILS on 10d99e5."""
from __future__ import annotations

import ipaddress
import uuid

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.enforce.base import EnforceError
from agent.enforce.fleet import FleetEnforcer
from agent.fleet.apply import Checks, Message, plan
from agent.fleet.decision import Decision, Signer, Verifier
from swarmlab.lab import netns, sh

pytestmark = pytest.mark.privileged
KEY = Ed25519PrivateKey.generate()
NOW = 1_800_000_000.0


@pytest.fixture
def ns():
    name = f"r11-{uuid.uuid4().hex[:8]}"
    sh("ip", "netns", "add", name)
    try:
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


def test_finding_a_scoped_ipv6_decision_wedges_every_later_fleet_block(ns):
    """Attack: a decision for "2001:db8::1%eth0/128" (an operator's paste of an address
    with its zone, or colluding nodes' proposals: the mesh policy and the agent's checks
    both keep the zone) is signed, verified and planned. nftables refuses the element
    ("Could not resolve hostname"), FleetEnforcer.change falls back to rebuilding the whole
    table with the same blocks, which fails too, and since every later change carries all
    entries in force, EVERY later fleet block on this node fails as well until the poison
    expires (up to the lifetime cap, 7 days): one decision switches fleet enforcement off
    on every node. Fix: refuse zones in normalize_target (mesh and agent), and have the
    enforcer put in force what it can (one refused element must not sink the batch)."""
    checks = Checks(Verifier([KEY.public_key()]), "n", allow=[ipaddress.ip_network("127.0.0.0/8")])
    signer = Signer(KEY)
    poison = Decision("block", "2001:db8::1%eth0/128", NOW, NOW + 3600)
    legit = Decision("block", "198.51.100.1/32", NOW + 1, NOW + 3600)
    with netns(ns):
        enf = FleetEnforcer()
        enf.setup({}, checks.allow, NOW)
        entries: dict = {}
        errors = []
        for seq, d in ((1, poison), (2, legit)):
            out = plan(entries, [Message(seq, d.subject, signer.envelope(d))], checks, NOW + 2)
            entries = {**entries, **out.upserts}
            try:
                enf.change({t: e.expires_at for t, e in entries.items() if e.blocking}, NOW + 2)
            except EnforceError as e:
                errors.append(str(e))
    listing = sh("nft", "list", "set", "inet", "swarm_agent_fleet", "fleet_v4", ns=ns).stdout
    assert "198.51.100.1" in listing, f"the legitimate block never got in: {errors}"
