"""What table `inet swarm_agent` holds in force, read back as mitigations.

Used when the agent's database had to be started afresh (found corrupt and moved aside,
or unreadable): the kernel table is then the only record of what is in force, and it is
authoritative. Each element of a block, rate-limit, reroute or service rate-limit set
becomes one (kind, target, expires_at); the table's partition of overlapping mitigations
comes back as its pieces (an address range as the networks that cover it). Allowlist
sets, isolation chains and sets this module does not know are left out (logged by the
caller), never guessed at.
"""
from __future__ import annotations

import ipaddress
from typing import NamedTuple

import nftables

from agent.enforce import listing
from agent.enforce.base import EnforceError
from agent.enforce.ruleset import _ADDR_KINDS, FAMILY, SERVICE_SET, TABLE, Service, Span
from agent.model import MitigationKind

_SET_KINDS = {f"{purpose}{suffix}": kind for kind, purpose in _ADDR_KINDS.items()
              for suffix in ("_v4", "_v6")}
_SET_KINDS[SERVICE_SET] = MitigationKind.RATE_LIMIT_SERVICE


class InForce(NamedTuple):
    kind: MitigationKind
    target: str
    expires_at: float | None      # wall seconds; None: the element has no timeout


def read_table() -> list[dict] | None:
    """The table's objects (libnftables JSON), None when there is no table; EnforceError
    when it cannot be read. Run in the network namespace the table belongs to."""
    nft = nftables.Nftables()
    nft.set_json_output(True)
    rc, out, err = nft.json_cmd({"nftables": [{"list": {"table": {"family": FAMILY,
                                                                   "name": TABLE}}}]})
    if rc != 0:
        if "No such file or directory" in err:
            return None
        raise EnforceError(f"cannot read table {FAMILY} {TABLE}: {err.strip()}")
    return listing.objects(out)


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
    return out


def _targets(key: Span | Service) -> list[str]:
    if isinstance(key, Service):
        return [str(key)]
    lo, hi = key._addr(key.start), key._addr(key.end)
    nets = ipaddress.summarize_address_range(lo, hi)  # type: ignore[arg-type]
    return [str(n.network_address) if n.num_addresses == 1 else str(n) for n in nets]
