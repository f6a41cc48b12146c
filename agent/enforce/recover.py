"""What table `inet swarm_agent` holds in force, read back as mitigations.

Used when the agent's database had to be started afresh (found corrupt and moved aside,
or unreadable): the kernel table is then the only record of what is in force, and it is
authoritative. Each element of a block, rate-limit, reroute or service rate-limit set
becomes one (kind, target, expires_at); the table's partition of overlapping mitigations
comes back as its pieces (an address range as the networks that cover it). Rules in the
forward isolation chain (only node isolation puts any there) come back as the node's
isolation. Allowlist sets and sets this module does not know are left out; service
isolation rules (a cgroup path as nft resolved it) are counted by `unrecorded`, for the
caller to report, never guessed at.
"""
from __future__ import annotations

import ipaddress
import json
from typing import NamedTuple

import nftables

from agent.enforce import listing
from agent.enforce.nft import list_table
from agent.enforce.ruleset import (_ADDR_KINDS, CHALLENGE_SERVICE_SET, ISOLATION_CHAINS,
                                   SERVICE_SET, Service, Span)
from agent.model import MitigationKind

_SET_KINDS = {f"{purpose}{suffix}": kind for kind, purpose in _ADDR_KINDS.items()
              for suffix in ("_v4", "_v6")}
_SET_KINDS[SERVICE_SET] = MitigationKind.RATE_LIMIT_SERVICE
_SET_KINDS[CHALLENGE_SERVICE_SET] = MitigationKind.CHALLENGE_SERVICE
_IN, _FWD = ISOLATION_CHAINS[0][0], ISOLATION_CHAINS[2][0]
NODE_TARGET = "node"


class InForce(NamedTuple):
    kind: MitigationKind
    target: str
    expires_at: float | None      # wall seconds; None: the element has no timeout


def read_table() -> list[dict] | None:
    """The table's objects (libnftables JSON), None when there is no table; EnforceError
    when it cannot be read. Run in the network namespace the table belongs to."""
    nft = nftables.Nftables()
    nft.set_json_output(True)
    return list_table(nft)


def in_force(objs: list[dict], now: float) -> list[InForce]:
    """Every mitigation element of the listing `objs`, with its expiry."""
    out: list[InForce] = []
    for set_name, elems in listing.elements(objs).items():
        kind = _SET_KINDS.get(set_name)
        if kind is None:
            continue
        for key, remaining in sorted(elems.items()):
            expires_at = None if remaining is None else now + remaining
            for target in _targets(key):
                out.append(InForce(kind, target, expires_at))
    if _node_isolated(objs):
        out.append(InForce(MitigationKind.ISOLATE_NODE, NODE_TARGET, None))
    return out


def _node_isolated(objs: list[dict]) -> bool:
    """The forward chain ends in the node isolation's own unconditional drop
    (agent.enforce.isolate: "counter drop"); any other rule there (a stray counter, an
    accept) is not an isolation to keep in force."""
    fwd = _rules(objs, _FWD)
    if not fwd:
        return False
    expr = fwd[-1].get("expr") or []
    keys = [k for e in expr if isinstance(e, dict) for k in e]
    return "drop" in keys and set(keys) <= {"counter", "drop"}


def unrecorded(objs: list[dict]) -> int:
    """Service isolation rules (`socket cgroupv2` matches) that `in_force` leaves out."""
    texts = (json.dumps(r) for r in _rules(objs, _IN))
    return sum(1 for t in texts if '"cgroupv2"' in t and '"drop"' in t)   # not the exemption


def _rules(objs: list[dict], chain: str) -> list[dict]:
    return [o["rule"] for o in objs if "rule" in o and o["rule"].get("chain") == chain]


def _targets(key: Span | Service) -> list[str]:
    if isinstance(key, Service):
        return [str(key)]
    lo, hi = key._addr(key.start), key._addr(key.end)
    nets = ipaddress.summarize_address_range(lo, hi)  # type: ignore[arg-type]
    return [str(n.network_address) if n.num_addresses == 1 else str(n) for n in nets]
