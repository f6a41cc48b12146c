"""Reading back what table `inet swarm_agent` holds in force (agent.enforce.recover), from
a real table in a lab namespace: every kind the agent re-records after its database was
started afresh, and a table rebuilt from what was read holds the same elements."""
from __future__ import annotations

import json
import time
from typing import Iterator

import pytest

from agent.config import Allowlist, Config, Enforce, Reroute
from agent.enforce.nft import NftEnforcer
from agent.enforce.recover import in_force, read_table, unrecorded
from swarmlab.lab import Lab, netns, sh
from agent.model import Mitigation, MitigationKind

pytestmark = pytest.mark.privileged
K = MitigationKind


def sets(lab: Lab) -> dict[str, list]:
    out = sh("nft", "-j", "list", "table", "inet", "swarm_agent", ns=lab.victim).stdout
    return {o["set"]["name"]: sorted(json.dumps(e.get("elem", {}).get("val", e)
                                                if isinstance(e, dict) else e)
                                     for e in o["set"].get("elem", []))
            for o in json.loads(out)["nftables"] if "set" in o}


@pytest.fixture
def cfg() -> Config:
    return Config(allowlist=Allowlist(management=("10.99.0.0/16",)),
                  enforce=Enforce(reroute=Reroute(sinkhole_v4="192.0.2.254")))


@pytest.fixture
def inside(lab: Lab) -> Iterator[None]:
    with netns(lab.victim):
        yield


def test_what_is_in_force_is_read_back(lab, cfg, inside):
    now = time.time()

    def m(kind: K, target: str, ttl: float | None = 600.0) -> Mitigation:
        return Mitigation(kind, target, now, None if ttl is None else now + ttl)

    desired = [m(K.BLOCK_IP, "198.51.100.7"), m(K.BLOCK_IP, "2001:db8::7", 300),
               m(K.BLOCK_IP, "203.0.113.0/24", 900), m(K.BLOCK_IP, "203.0.113.8/29", 1200),
               m(K.RATE_LIMIT, "198.51.100.9"), m(K.REROUTE, "198.51.100.10"),
               m(K.RATE_LIMIT_SERVICE, "tcp/8080"), m(K.ISOLATE_NODE, "node", None),
               m(K.CHALLENGE, "198.51.100.11"), m(K.CHALLENGE_SERVICE, "tcp/8443"),
               m(K.CHALLENGE_SERVICE, "udp/4433")]
    nft = NftEnforcer(cfg)
    try:
        nft.setup(desired, now)
        before = sets(lab)
        objs = read_table()
        assert objs is not None
        found = in_force(objs, time.time())
        got = {(f.kind, f.target) for f in found}
        assert {(K.BLOCK_IP, "198.51.100.7"), (K.BLOCK_IP, "2001:db8::7"),
                (K.RATE_LIMIT, "198.51.100.9"), (K.REROUTE, "198.51.100.10"),
                (K.RATE_LIMIT_SERVICE, "tcp/8080"), (K.ISOLATE_NODE, "node"),
                (K.CHALLENGE, "198.51.100.11"), (K.CHALLENGE_SERVICE, "tcp/8443"),
                (K.CHALLENGE_SERVICE, "udp/4433")} <= got
        # The overlapping /24 and /29 come back as the pieces of the kernel's partition.
        pieces = {t for k, t in got if k is K.BLOCK_IP and t.startswith("203.0.113.")}
        assert "203.0.113.8/29" in pieces and len(pieces) > 1
        expiry = {f.target: f.expires_at for f in found}
        assert abs(expiry["2001:db8::7"] - (now + 300)) < 3
        assert abs(expiry["203.0.113.8/29"] - (now + 1200)) < 3
        assert expiry["node"] is None and unrecorded(objs) == 0
        # A table rebuilt from what was read holds the same elements.
        again = [Mitigation(f.kind, f.target, now, f.expires_at) for f in found]
        nft.remove()
        nft.setup(again, time.time())
        assert sets(lab) == before
    finally:
        nft.remove()
        nft.close()


def test_no_table_is_nothing_in_force(lab, inside):
    assert read_table() is None
