"""The highest values the config accepts are taken by the kernel, so that a config that
loads never fails later: nftables sets of the largest size, limits at the largest rate and
burst, a block for the longest lifetime, and the network probe with its largest maps
(what is refused: tests/unit/test_config_limits.py)."""
from __future__ import annotations

import json
import time

import pytest

from agent import configcheck
from agent.config import Config, Enforce, MitigationPolicy, Probes, RateLimit
from agent.enforce.nft import NftEnforcer
from swarmlab.lab import Lab, netns, sh
from agent.model import Mitigation, MitigationKind
from agent.sources.net import NetProbe
from tests.conftest import skip_unsupported

pytestmark = pytest.mark.privileged


def _high(key: str) -> int:
    return int(configcheck.BOUNDS[key].high)


def test_nftables_takes_the_highest_values(lab: Lab):
    rate = RateLimit(packets_per_second=_high("enforce.rate_limit.packets_per_second"),
                     burst=_high("enforce.rate_limit.burst"))
    cfg = Config(enforce=Enforce(set_size=_high("enforce.set_size"), rate_limit=rate,
                                 service_rate_limit=rate),
                 mitigation=MitigationPolicy(max_ttl_s=_high("mitigation.max_ttl_s")))
    now = time.time()
    longest = Mitigation(MitigationKind.BLOCK_IP, lab.addr("attacker"), now,
                         now + cfg.mitigation.max_ttl_s)
    with netns(lab.victim):
        e = NftEnforcer(cfg)
        try:
            e.setup([], now)
            e.apply(longest, now)
            e.check(longest)
            out = sh("nft", "-j", "list", "set", "inet", "swarm_agent", "block_v4").stdout
        finally:
            e.remove()
            e.close()
    (listed,) = [o["set"] for o in json.loads(out)["nftables"] if "set" in o]
    assert listed["size"] == cfg.enforce.set_size
    (elem,) = listed["elem"]
    assert elem["elem"]["expires"] > cfg.mitigation.max_ttl_s - 60


def test_network_probe_takes_the_largest_maps(lab: Lab):
    probes = Probes(map_entries=_high("probes.map_entries"),
                    window_ms=_high("probes.window_ms"))
    with netns(lab.victim):
        probe = NetProbe(probes, [], {"syns": 10})
        try:
            probe.open()
            states = {k: v["state"] for k, v in probe.status().items()}
            if "degraded" in states.values() and "failed" not in states.values():
                skip_unsupported(f"network probe degraded here: {probe.status()}")
            assert "failed" not in states.values(), probe.status()
        finally:
            probe.close()
