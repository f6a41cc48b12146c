"""Red team r13, the kernel part: a fleet block really ends in nftables at its expiry
(the unit findings and holds are in tests/unit/test_redteam_r13.py)."""
from __future__ import annotations

import ipaddress
import time

import pytest

from agent.enforce.fleet import FleetEnforcer
from swarmlab.lab import netns, sh
from tests.integration.test_redteam_r11_agent import ns  # noqa: F401

pytestmark = pytest.mark.privileged


def test_holds_an_expired_fleet_block_is_lifted_in_the_kernel_and_not_put_back(ns):  # noqa: F811
    """A host block and a network block, each with a second left, are gone from the
    kernel's sets once it passes, and the next reconcile (agent clock past the expiry)
    does not put them back."""
    allow = [ipaddress.ip_network("127.0.0.0/8")]
    with netns(ns):
        enf = FleetEnforcer()
        now = time.time()
        enf.setup({"198.51.100.7/32": now + 1, "203.0.113.0/24": now + 1,
                   "192.0.2.9/32": now + 3600}, allow, now)
    listing = lambda: sh("nft", "list", "table", "inet", "swarm_agent_fleet", ns=ns).stdout  # noqa: E731
    before = listing()
    assert "198.51.100.7" in before and "203.0.113.0/24" in before
    time.sleep(0.7)
    time.sleep(0.7)
    after = listing()
    with netns(ns):
        enf.reconcile(allow, time.time())
    again = listing()
    for text in (after, again):
        assert "198.51.100.7" not in text and "203.0.113.0" not in text and "192.0.2.9" in text
