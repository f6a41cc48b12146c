"""The fleet table in the kernel when nftables refuses part of a change (root, a network
namespace of its own, removed after): what the kernel takes goes in force, what it
refuses is left out and reported, and later changes keep working."""
from __future__ import annotations

import ipaddress
import json
import uuid

import pytest

from agent.enforce import fleet as fleetnft
from agent.enforce.fleet import FleetEnforcer
from swarmlab.lab import netns, sh

pytestmark = pytest.mark.privileged
NOW = 1_800_000_000.0
ALLOW = [ipaddress.ip_network("127.0.0.0/8")]


@pytest.fixture
def ns():
    """A bare network namespace; deleted (with its fleet table) after the test."""
    name = f"fleet-{uuid.uuid4().hex[:8]}"
    sh("ip", "netns", "add", name)
    try:
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


def held(ns: str, set_name: str) -> set[str]:
    out = json.loads(sh("nft", "-j", "list", "set", "inet", fleetnft.TABLE, set_name, ns=ns).stdout)
    (s,) = [o["set"] for o in out["nftables"] if "set" in o]
    return {e["elem"]["val"] if isinstance(e, dict) else e for e in s.get("elem", [])}


def test_a_full_set_puts_in_force_what_fits_and_later_changes_still_work(ns, monkeypatch):
    """The kernel refuses the elements past a set's size (a real refusal, made small here):
    the rebuild by halves puts 4 of 6 in force, reports the other 2, and a revoke and a
    new block after it are one ordinary transaction each."""
    monkeypatch.setattr(fleetnft, "SET_SIZE", 4)
    blocks = {f"198.51.100.{i}/32": NOW + 600 for i in range(1, 7)}
    with netns(ns):
        enf = FleetEnforcer()
        enf.setup({}, ALLOW, NOW)
        enf.change(blocks, NOW)
        rejected = dict(enf.take_rejected())
        assert len(enf.blocks) == 4 and set(rejected) == set(blocks) - set(enf.blocks)
        assert held(ns, "fleet_v4") == {t.split("/")[0] for t in enf.blocks}
        gone = sorted(enf.blocks)[0]
        enf.update({gone: None}, NOW + 1)
        assert gone.split("/")[0] not in held(ns, "fleet_v4")
        enf.update({"203.0.113.9/32": NOW + 600}, NOW + 1)
        assert "203.0.113.9" in held(ns, "fleet_v4")


def test_a_scoped_target_is_left_out_before_the_kernel_sees_it(ns):
    """A target with an IPv6 zone (or anything no element can be) never reaches nftables:
    reported, and the legitimate block of the same change is in force."""
    with netns(ns):
        enf = FleetEnforcer()
        enf.setup({}, ALLOW, NOW)
        enf.change({"2001:db8::1%eth0/128": NOW + 600, "198.51.100.1/32": NOW + 600}, NOW)
        assert [t for t, _ in enf.take_rejected()] == ["2001:db8::1%eth0/128"]
        enf.change({"2001:db8::1%eth0/128": NOW + 600, "198.51.100.1/32": NOW + 600,
                    "198.51.100.2/32": NOW + 600}, NOW)
        assert enf.take_rejected() == []             # not tried, not reported again
    assert held(ns, "fleet_v4") == {"198.51.100.1", "198.51.100.2"}
