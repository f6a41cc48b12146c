"""Reading the kernel's view of table `inet swarm_agent` (a libnftables JSON listing).

The structure (sets without their elements, chains, rules without handles and counter
values) becomes a fingerprint string; elements become keys with their remaining lifetime,
so they can be compared with `ruleset.desired_contents`.
"""
from __future__ import annotations

import copy
import ipaddress
import json
from typing import Any, Iterable, Mapping

from agent.enforce.ruleset import (ELEMENT_SETS, TIMEOUT_TOLERANCE_S, Key, Service, SetContents,
                                   Span)

KernelContents = dict[str, dict[Key, float | None]]   # set -> key -> remaining seconds or None
_PROTO_NAMES = {6: "tcp", 17: "udp", "tcp": "tcp", "udp": "udp"}


def objects(listing: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The listing's objects without the metainfo header."""
    return [o for o in listing.get("nftables", []) if "metainfo" not in o]


def fingerprint(objs: Iterable[Mapping[str, Any]]) -> str:
    """The structure of the table as a stable string; elements and counters left out."""
    out = []
    for obj in objs:
        obj = copy.deepcopy(dict(obj))
        for body in obj.values():
            body.pop("handle", None)
            body.pop("elem", None)
            for expr in body.get("expr", []):
                if "counter" in expr:
                    expr["counter"] = None
        out.append(obj)
    return json.dumps(out, sort_keys=True)


def _span(value: Any, version: int) -> Span:
    if isinstance(value, str):
        return Span.of(ipaddress.ip_network(value))
    if "prefix" in value:
        p = value["prefix"]
        return Span.of(ipaddress.ip_network(f"{p['addr']}/{p['len']}"))
    lo, hi = (ipaddress.ip_address(a) for a in value["range"])
    return Span(version, int(lo), int(hi))


def _key(set_name: str, value: Any) -> Key:
    if set_name.endswith(("_v4", "_v6")):
        return _span(value, 4 if set_name.endswith("_v4") else 6)
    proto, port = value["concat"]
    return Service(_PROTO_NAMES.get(proto, str(proto)), int(port))


def elements(objs: Iterable[Mapping[str, Any]]) -> KernelContents:
    """Elements of the agent's element sets with remaining seconds (None: no timeout)."""
    out: KernelContents = {name: {} for name in ELEMENT_SETS}
    for obj in objs:
        s = obj.get("set")
        if not s or s.get("name") not in out:
            continue
        for item in s.get("elem", []):
            wrapped = item.get("elem") if isinstance(item, dict) else None
            if wrapped is None:
                out[s["name"]][_key(s["name"], item)] = None
            else:
                remaining = wrapped.get("expires", wrapped.get("timeout"))
                out[s["name"]][_key(s["name"], wrapped["val"])] = (
                    None if remaining is None else float(remaining))
    return out


def _same(expires_at: float | None, remaining: float | None, now: float) -> bool:
    if expires_at is None or remaining is None:
        return expires_at is None and remaining is None
    return abs((expires_at - now) - remaining) <= TIMEOUT_TOLERANCE_S


def diff_set(want: SetContents, have: Mapping[Key, float | None], now: float
             ) -> tuple[list[Key], list[Key]]:
    """(missing or wrong in the kernel, present in the kernel but not as desired)."""
    added = [k for k, exp in want.items() if k not in have or not _same(exp, have[k], now)]
    removed = [k for k, rem in have.items() if k not in want or not _same(want[k], rem, now)]
    return sorted(added), sorted(removed)
