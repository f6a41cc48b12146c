"""FleetEnforcer: fleet decisions in force, as nftables table `inet swarm_agent_fleet`.

Why a table of their own, beside `inet swarm_agent`: measured on this machine
(libnftables 1.0.6, kernel 6.18), a table that holds 100,000 elements makes every
listing of it cost 0.3-0.8 s (the rules' listing loads every set's elements), and an
interval set of that size makes every element change to ANY interval set of the table
cost 0.4-0.9 s (the overlap check loads them all). The agent lists its table on every
change notification and every 5 s, and a local block must take milliseconds; so the
fleet's elements live here, where only this enforcer lists them (every FLEET_RECONCILE_S
on a worker thread).

The table: sets allow_v4/allow_v6 (a copy of the agent's allowlist: loopback, this host's
addresses, management, mesh, load balancers; accepted first, so local allowlists win in
the kernel too), fleet_v4/fleet_v6 (single addresses: hash sets with element timeouts,
so adding one to 100,000 costs microseconds) and fleet_net_v4/fleet_net_v6 (networks:
interval sets; overlapping networks are merged to a partition, ruleset.partition), and a
filter chain at prerouting priority -300 (before conntrack, like the agent's blocks):
allowlist accept, then a counted drop for each fleet set. Expiry is in the kernel: each
element's timeout is its decision's remaining lifetime, so a partitioned agent keeps
enforcing what it has until it runs out.

Every change is one transaction; not thread-safe: its caller serialises (the fleet
subscriber runs it on one worker thread at a time). One element the kernel refuses must
not sink every later change (each carries what is in force when it falls back to a
rebuild): a target that is no address or network is left out before any batch, and when
the kernel still refuses a rebuild, the table is made empty and the blocks added by
halves, so each refused element is found, left out and reported (`take_rejected`) while
the rest goes in force. A rejected target is not tried again while it stays wanted.
"""
from __future__ import annotations

import ipaddress
import json
import math
from typing import Any, Iterable, Mapping

import nftables

from agent.enforce.base import EnforceError
from agent.enforce.ruleset import SetContents, Span, partition

TABLE = "swarm_agent_fleet"
FAMILY = "inet"
CHAIN = "fleet_prerouting"
_FAMILIES = ((4, "ip", "ipv4_addr"), (6, "ip6", "ipv6_addr"))
HOST_SETS = {4: "fleet_v4", 6: "fleet_v6"}
NET_SETS = {4: "fleet_net_v4", 6: "fleet_net_v6"}
ALLOW_SETS = {4: "allow_v4", 6: "allow_v6"}
SET_SIZE = 1 << 20          # fleet elements per set at most (kernel memory: ~100 B each)
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _obj(**fields: Any) -> dict[str, Any]:
    return {"family": FAMILY, "table": TABLE, **fields}


def timeout_s(expires_at: float, now: float) -> int:
    return max(1, math.ceil(expires_at - now))


def split(blocks: Mapping[str, float]) -> tuple[dict[str, float], dict[int, list[tuple[Span, float]]]]:
    """(single addresses -> expiry, {version: [(span, expiry)]} of the wider networks)."""
    hosts: dict[str, float] = {}
    nets: dict[int, list[tuple[Span, float]]] = {4: [], 6: []}
    for target, expires_at in blocks.items():
        addr, _, length = target.partition("/")
        v6 = ":" in addr
        if not length or int(length) == (128 if v6 else 32):
            hosts[addr] = expires_at
        else:
            net = ipaddress.ip_network(target)
            nets[net.version].append((Span.of(net), expires_at))
    return hosts, nets


def is_host(target: str) -> bool:
    """A single address (/32, /128 or none): the hash sets hold those."""
    addr, _, length = target.partition("/")
    return not length or int(length) == (128 if ":" in addr else 32)


def net_contents(nets: Mapping[int, list[tuple[Span, float]]]) -> dict[int, SetContents]:
    return {v: partition(items) for v, items in nets.items()}


def _host_elem(addr: str, expires_at: float, now: float) -> dict[str, Any]:
    return {"elem": {"val": addr, "timeout": timeout_s(expires_at, now)}}


def _net_elems(contents: SetContents, now: float) -> list[Any]:
    return [{"elem": {"val": k.to_json(), "timeout": timeout_s(e, now)}}  # type: ignore[union-attr]
            for k, e in sorted(contents.items()) if e is not None]


def table_batch(blocks: Mapping[str, float], allow: Iterable[Network], now: float) -> list[dict[str, Any]]:
    """Commands replacing the whole fleet table with one holding `blocks` (target ->
    expires_at) and the allowlist `allow`."""
    table = {"family": FAMILY, "name": TABLE}
    cmds: list[dict[str, Any]] = [{"add": {"table": table}}, {"delete": {"table": table}},
                                  {"add": {"table": table}}]
    for version, proto, addr_type in _FAMILIES:
        cmds.append({"add": {"set": _obj(name=ALLOW_SETS[version], type=addr_type, flags=["interval"])}})
        cmds.append({"add": {"set": _obj(name=HOST_SETS[version], type=addr_type, size=SET_SIZE,
                                         flags=["timeout"])}})
        cmds.append({"add": {"set": _obj(name=NET_SETS[version], type=addr_type, size=SET_SIZE,
                                         flags=["interval", "timeout"])}})
    cmds.append({"add": {"chain": _obj(name=CHAIN, type="filter", hook="prerouting", prio=-300,
                                       policy="accept")}})
    for version, proto, _ in _FAMILIES:
        cmds.append(_rule(proto, ALLOW_SETS[version], {"accept": None}))
    for version, proto, _ in _FAMILIES:
        for name in (HOST_SETS[version], NET_SETS[version]):
            cmds.append(_rule(proto, name, {"counter": {"packets": 0, "bytes": 0}}, {"drop": None}))
    cmds += allow_cmds(allow)
    hosts, nets = split(blocks)
    for version in (4, 6):
        elems = [_host_elem(a, e, now) for a, e in hosts.items() if (":" in a) == (version == 6)]
        if elems:
            cmds.append({"add": {"element": _obj(name=HOST_SETS[version], elem=elems)}})
    for version, contents in net_contents(nets).items():
        if contents:
            cmds.append({"add": {"element": _obj(name=NET_SETS[version], elem=_net_elems(contents, now))}})
    return cmds


def allow_cmds(allow: Iterable[Network]) -> list[dict[str, Any]]:
    """Flush and refill the allow sets (collapsed: an interval set refuses overlaps)."""
    allow = list(allow)
    cmds: list[dict[str, Any]] = []
    for version in (4, 6):
        name = ALLOW_SETS[version]
        cmds.append({"flush": {"set": _obj(name=name)}})
        nets = list(ipaddress.collapse_addresses([n for n in allow if n.version == version]))
        if nets:
            cmds.append({"add": {"element": _obj(name=name, elem=[
                {"prefix": {"addr": str(n.network_address), "len": n.prefixlen}} for n in nets])}})
    return cmds


def _rule(proto: str, set_name: str, *stmts: dict[str, Any]) -> dict[str, Any]:
    match = {"match": {"op": "==", "left": {"payload": {"protocol": proto, "field": "saddr"}},
                       "right": f"@{set_name}"}}
    return {"add": {"rule": _obj(chain=CHAIN, expr=[match, *stmts])}}


def change_batch(old: Mapping[str, float], new: Mapping[str, float], now: float) -> list[dict[str, Any]]:
    """Commands turning the blocks `old` into `new` (target -> expires_at). A host element
    whose expiry changed is deleted and re-added (add alone keeps the old timeout); each
    delete is preceded by an add, a no-op when present, so an element the kernel already
    expired cannot fail the batch. A changed network rewrites that family's network set."""
    cmds: list[dict[str, Any]] = []
    old_hosts, old_nets = split(old)
    new_hosts, new_nets = split(new)
    for version in (4, 6):
        is_v = (lambda a: (":" in a) == (version == 6))
        gone = [a for a in old_hosts if is_v(a) and old_hosts[a] != new_hosts.get(a)]
        fresh = [a for a in new_hosts if is_v(a) and new_hosts[a] != old_hosts.get(a)]
        name = HOST_SETS[version]
        if gone:
            cmds.append({"add": {"element": _obj(name=name, elem=gone)}})
            cmds.append({"delete": {"element": _obj(name=name, elem=gone)}})
        if fresh:
            cmds.append({"add": {"element": _obj(name=name, elem=[
                _host_elem(a, new_hosts[a], now) for a in fresh])}})
        if sorted(old_nets[version]) != sorted(new_nets[version]):
            cmds.append({"flush": {"set": _obj(name=NET_SETS[version])}})
            contents = partition(new_nets[version])
            if contents:
                cmds.append({"add": {"element": _obj(name=NET_SETS[version],
                                                     elem=_net_elems(contents, now))}})
    return cmds


def well_formed(target: str) -> bool:
    """Whether nftables can take `target` as an element: an address or network, no zone."""
    if not isinstance(target, str) or "%" in target:
        return False
    try:
        ipaddress.ip_network(target)
    except ValueError:
        return False
    return True


class FleetEnforcer:
    """The fleet table of this network namespace (construct it inside the namespace).
    `dry_run`: record what would be in force, change nothing. `blocks` is what it holds;
    `rejected` the wanted targets it could not put in force (target -> why)."""

    def __init__(self, dry_run: bool = False):
        self.dry_run = dry_run
        self.blocks: dict[str, float] = {}
        self.allow: list[Network] = []
        self.rejected: dict[str, str] = {}
        self._new_rejects: list[tuple[str, str]] = []
        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)

    def setup(self, blocks: Mapping[str, float], allow: Iterable[Network], now: float) -> None:
        """Replace the table with one holding the live ones of `blocks` (one transaction,
        unless the kernel refuses an element: see the module docstring)."""
        self.rejected = {}
        live = self._usable({t: e for t, e in blocks.items() if e > now})
        self.allow = list(allow)
        if not self.dry_run:
            live = self._rebuild(live, now)
        self.blocks = live

    def change(self, new: Mapping[str, float], now: float) -> None:
        """Put exactly `new` in force (one transaction of the difference); when the kernel
        refuses it (the table gone, an element edited), the whole table is made anew."""
        self.rejected = {t: why for t, why in self.rejected.items() if t in new}
        live = self._usable({t: e for t, e in new.items() if e > now})
        if not self.dry_run:
            try:
                self._send(change_batch(self.blocks, live, now))
            except EnforceError:
                live = self._rebuild(live, now)
        self.blocks = live

    def update(self, delta: Mapping[str, float | None], now: float) -> None:
        """Change only the targets in `delta` (target -> expiry, None: not blocked), so a
        live decision costs the same with 10 or 100,000 in force. Networks share an
        interval set that is rewritten whole: a delta naming one takes change()'s way."""
        if any(not is_host(t) for t in delta if well_formed(t)):
            new = dict(self.blocks)
            new.update({t: 0.0 for t in self.rejected})     # still wanted, still refused
            for t, e in delta.items():
                if e is None:
                    new.pop(t, None)
                else:
                    new[t] = e
            self.change(new, now)
            return
        for t, e in delta.items():
            if e is None:
                self.rejected.pop(t, None)
        old = {t: self.blocks[t] for t in delta if t in self.blocks}
        live = self._usable({t: e for t, e in delta.items() if e is not None and e > now})
        if not self.dry_run:
            try:
                self._send(change_batch(old, live, now))
            except EnforceError:
                merged = {t: e for t, e in self.blocks.items() if t not in delta}
                merged.update(live)
                self.blocks = self._rebuild({t: e for t, e in merged.items() if e > now}, now)
                return
        for t in delta:
            if t in live:
                self.blocks[t] = live[t]
            else:
                self.blocks.pop(t, None)

    def take_rejected(self) -> list[tuple[str, str]]:
        """The targets newly found unenforceable since the last call, with why."""
        taken, self._new_rejects = self._new_rejects, []
        return taken

    def _usable(self, blocks: Mapping[str, float]) -> dict[str, float]:
        """`blocks` less the targets known refused and those no element can be."""
        out: dict[str, float] = {}
        for t, e in blocks.items():
            if t in self.rejected:
                continue
            if not well_formed(t):
                self._reject(t, "not an address or network nftables can hold")
                continue
            out[t] = e
        return out

    def _reject(self, target: str, why: str) -> None:
        self.rejected[target] = why
        self._new_rejects.append((target, why))

    def _rebuild(self, live: dict[str, float], now: float) -> dict[str, float]:
        """The table made anew with `live` in one transaction; when the kernel refuses that,
        made empty (allowlist and chain: a failure there is no element's fault and
        surfaces), then `live` added by halves: each refused element is left out and
        reported, the rest put in force. Returns what is in force."""
        try:
            self._send(table_batch(live, self.allow, now))
            return live
        except EnforceError:
            pass
        self._send(table_batch({}, self.allow, now))
        kept: dict[str, float] = {}

        def add(items: list[tuple[str, float]]) -> None:
            trial = {**kept, **dict(items)}
            try:
                self._send(change_batch(kept, trial, now))
                kept.update(items)
            except EnforceError as e:
                if len(items) == 1:
                    self._reject(items[0][0], str(e)[:200])
                    return
                add(items[:len(items) // 2])
                add(items[len(items) // 2:])
        items = sorted(live.items())
        if items:
            add(items)
        return kept

    def reconcile(self, allow: Iterable[Network], now: float,
                  want: Mapping[str, float] | None = None) -> bool:
        """Compare the kernel's table with what should be there (`want`, target ->
        expiry; None: what it holds); remake it when it differs (missing, elements
        missing or extra, the allowlist changed). True when something was repaired.
        Lists the whole table: call it on a worker thread."""
        allow = list(allow)
        if want is not None:
            self.rejected = {t: why for t, why in self.rejected.items() if t in want}
        live = {t: e for t, e in (self.blocks if want is None
                                  else self._usable(want)).items() if e > now}
        if self.dry_run:
            self.blocks, self.allow = live, allow
            return False
        have = self._listing()
        if have is None or not _matches(have, live, allow):
            self.allow = allow
            self.blocks = self._rebuild(live, now)
            return True
        self.blocks, self.allow = live, allow
        return False

    def remove(self) -> None:
        table = {"family": FAMILY, "name": TABLE}
        self._send([{"add": {"table": table}}, {"delete": {"table": table}}])
        self.blocks = {}

    def _listing(self) -> list[dict[str, Any]] | None:
        cmd = {"nftables": [{"list": {"table": {"family": FAMILY, "name": TABLE}}}]}
        rc, out, err = self._nft.json_cmd(cmd)
        if rc != 0:
            if "No such file or directory" in err:
                return None
            raise EnforceError(f"cannot read table {FAMILY} {TABLE}: {err.strip()[:200]}", cmd)
        return [o for o in out.get("nftables", []) if "metainfo" not in o]

    def _send(self, cmds: list[dict[str, Any]]) -> None:
        if not cmds:
            return
        for cmd in cmds:        # this enforcer's table only, whatever the caller passed
            (body,) = cmd.values()
            (obj,) = body.values()
            if obj.get("family") != FAMILY or TABLE not in (obj.get("table"), obj.get("name")):
                raise EnforceError("internal error: a command left table inet swarm_agent_fleet")
        batch = {"nftables": cmds}
        rc, _, err = self._nft.json_cmd(batch)
        if rc != 0:
            msg = next((ln.split("Error:", 1)[1].strip() for ln in err.splitlines()
                        if "Error:" in ln), err.strip()[:200] or "unknown error")
            raise EnforceError(f"nftables refused the fleet change: {msg}",
                               json.dumps(batch)[:2000])


def _matches(objs: list[dict[str, Any]], blocks: Mapping[str, float],
             allow: list[Network]) -> bool:
    """Whether the listed table holds the chain's rules, exactly these elements (timeouts
    are not compared: they only run down) and this allowlist."""
    sets = {o["set"]["name"]: o["set"] for o in objs if "set" in o}
    rules = [o for o in objs if "rule" in o]
    if len(rules) != 6 or set(sets) != {*HOST_SETS.values(), *NET_SETS.values(), *ALLOW_SETS.values()}:
        return False
    hosts, nets = split(blocks)
    want_hosts = {4: set(), 6: set()}
    for a in hosts:
        want_hosts[6 if ":" in a else 4].add(a)
    for version in (4, 6):
        have = {_val(e) for e in sets[HOST_SETS[version]].get("elem", [])}
        if have != want_hosts[version]:
            return False
        want_nets = {str(k) for k in partition(nets[version])}
        if {_val(e) for e in sets[NET_SETS[version]].get("elem", [])} != want_nets:
            return False
        want_allow = {str(n) for n in ipaddress.collapse_addresses(
            [n for n in allow if n.version == version])}
        have_allow = {_val(e) for e in sets[ALLOW_SETS[version]].get("elem", [])}
        if {str(ipaddress.ip_network(a)) for a in have_allow} != want_allow:
            return False
    return True


def _val(e: Any) -> str:
    v = e["elem"]["val"] if isinstance(e, dict) and "elem" in e else e
    if isinstance(v, dict) and "prefix" in v:
        return f"{v['prefix']['addr']}/{v['prefix']['len']}"
    if isinstance(v, dict) and "range" in v:
        return "-".join(v["range"])
    return str(v)
