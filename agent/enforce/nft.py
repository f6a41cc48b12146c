"""NftEnforcer: blocks, rate limits and reroutes in nftables table `inet swarm_agent`.

Construct it inside the network namespace it protects: the libnftables context and the
rtnetlink socket it opens belong to that namespace for good. Every change is one atomic
libnftables JSON transaction; a refused batch raises EnforceError carrying it, and then
nothing changed. Other tables are never touched.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import nftables

from agent.config import Config
from agent.enforce import egress, isolate, listing, uplink
from agent.enforce.base import AllowlistedError, Drift, EnforceError
from agent.enforce.cgroup import own_cgroup
from agent.enforce.ifaddr import AddressReader
from agent.enforce.ruleset import (BRIDGE_TABLE, CHALLENGE_KINDS, EGRESS_CHAINS, ELEMENT_SETS,
                                   FAMILY, ISOLATION_CHAINS, TABLE, Key, Service, SetContents,
                                   desired_contents, element_cmd, elements_json, parse_network, set_for, syn_wait_text, table_batch)
from agent.linktype import uplinks
from agent.policyconfig import WORKLOAD_INTERFACES
from agent.model import Mitigation, MitigationKind

log = logging.getLogger(__name__)
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
FLEET_TABLE = "swarm_agent_fleet"      # agent.enforce.fleet.TABLE (removed with the rest)
# The SYN proxy must see a connection's ACK as invalid, not pick it up mid-stream as an
# established flow; that is loose=0. Per network namespace: only the agent's own changes.
TCP_LOOSE = "/proc/sys/net/netfilter/nf_conntrack_tcp_loose"


class NftEnforcer:
    """The Enforcer (agent.enforce.base) for BLOCK_IP, RATE_LIMIT, REROUTE (address or CIDR)
    and RATE_LIMIT_SERVICE ("tcp/80"), CHALLENGE (address or CIDR) and CHALLENGE_SERVICE
    ("tcp/80": SYN proxy; "udp/53": per-source limit), ISOLATE_NODE (any target, "node" by convention) and
    the network cut of ISOLATE_SERVICE (a cgroup path; agent.enforce.cgroup freezes it);
    other kinds raise UnsupportedMitigation. `agent_cgroup` (default: this process's) is
    exempt from node isolation and never isolated itself.

    It remembers the mitigations in force (set by setup/reconcile, changed by apply/lift)
    because kernel interval sets cannot hold overlapping elements: each set's elements are
    the partition of all its mitigations, so one change may reshape neighbouring elements.
    """

    def __init__(self, cfg: Config, agent_cgroup: str | None = None):
        self.cfg = cfg
        self._agent_cgroup = agent_cgroup or own_cgroup()
        self._isolated = isolate.Isolation()   # what the isolation chains hold
        self._egress = egress.Egress()         # what the egress chains hold
        self._uplink = uplink.Uplink()         # what table netdev swarm_agent_uplink holds
        self.uplink_error = ""                 # why the kernel refused it, "" when applied
        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._addrs = AddressReader()
        self._desired: dict[str, Mitigation] = {}
        self._structure: str | None = None     # fingerprint of the table as last created
        self.syn_wait_refused: str | None = None   # why the kernel refused ruleset.syn_wait_text
        self._loose_saved: str | None = None   # nf_conntrack_tcp_loose before a challenge
        # ... also kept on tmpfs, per namespace: a restart or crash during a challenge must
        # not take the agent's own 0 for the host's setting (a reboot resets both).
        netns = os.stat("/proc/thread-self/ns/net").st_ino
        self._loose_file = Path(cfg.run_dir) / f"tcp_loose.{netns}"
        # The mesh's reporting endpoint and the fleet's NATS servers (agent.daemon resolves
        # them; the fleet subscriber adds an address it meets): never blocked here either,
        # whatever allowlist.mesh says, so no local block cuts the node off from the mesh.
        self.infrastructure: list[Network] = []
        self._allow: list[Network] = self._read_allowlist()

    # --- the Enforcer contract -------------------------------------------------------------

    def setup(self, desired: Sequence[Mitigation], now: float) -> None:
        """Replace the table with a fresh one holding exactly `desired` (remaining lifetimes)."""
        self._allow = self._read_allowlist()
        self._recreate(desired, now)
        self._sync_loose(now)

    def apply(self, m: Mitigation, now: float) -> None:
        """Put `m` in force; raises AllowlistedError, UnsupportedMitigation or EnforceError
        (invalid target, kernel refusal), and then nothing changed. Isolation may also raise
        IsolationRefused (no allowlist, not forced) or CgroupError (absent, the agent's)."""
        self.check(m)
        if m.kind in isolate.ISOLATION_KINDS:
            self._apply_isolation(m, now)
            return
        name, _ = set_for(m, self.cfg)
        if m.expires_at is not None and m.expires_at <= now:
            raise EnforceError(f"the {m.kind.value} mitigation of {m.target} has already expired")
        new = {**self._desired, m.id: m}
        self._sync_loose(now, new)     # before the proxy can see a packet
        try:
            self._change(name, new, now)
        except EnforceError:
            self._sync_loose(now)
            raise

    def check(self, m: Mitigation) -> None:
        """The refusals apply meets, without changing anything (the dry run shares them):
        UnsupportedMitigation, EnforceError for an invalid target, AllowlistedError,
        IsolationRefused, CgroupError."""
        if m.kind is MitigationKind.ISOLATE_NODE:
            isolate.check_node(m, self.cfg)
            return
        if m.kind is MitigationKind.ISOLATE_SERVICE:
            isolate.check_service(m.target, self._agent_cgroup)
            return
        _, key = set_for(m, self.cfg)
        if not isinstance(key, Service) and self.is_allowlisted(m.target):
            raise AllowlistedError(
                f"{m.target} is allowlisted (loopback, management, mesh, load balancer or this "
                "host's own address) and is never blocked, rate limited or rerouted")

    def lift(self, m: Mitigation) -> None:
        """Remove `m` (by id, else every mitigation of the same kind and target)."""
        if m.kind in isolate.ISOLATION_KINDS:
            new = {d.id: d for d in isolate.lifted(list(self._desired.values()), m)}
            if len(new) != len(self._desired):
                self._isolate(new, time.time())
            return
        try:
            name, _ = set_for(m, self.cfg)
        except EnforceError:
            return      # never applied, so nothing to lift
        new = {i: d for i, d in self._desired.items() if i != m.id}
        if len(new) == len(self._desired):
            new = {i: d for i, d in new.items() if (d.kind, d.target) != (m.kind, m.target)}
        if len(new) != len(self._desired):
            self._change(name, new, time.time())
        self._sync_loose(time.time())

    def reconcile(self, desired: Sequence[Mitigation], now: float) -> Drift:
        """Compare the kernel's table with `desired` and repair it in one transaction.

        A missing table or a changed structure recreates the whole table; element drift
        (missing, extra, or a timeout off by more than a tolerance) rewrites those sets.
        Finding nothing changes nothing, so reconciling on every notification is quiet."""
        self._allow = self._read_allowlist()
        want = desired_contents(desired, self.cfg, now, self._allow)
        # First the egress policy's own changes, which are no tampering: a waiting cgroup
        # appeared, or one went (a container ended; made again: another id).
        eg = self._egress_desired()
        eg_added, eg_removed = egress.labels(eg, self._egress), egress.labels(self._egress, eg)
        if eg.lines != self._egress.lines and self._structure is not None:
            with contextlib.suppress(EnforceError):   # no table: recreated below
                self._send_egress(eg)
        if self._uplink_due(eg.uplink):         # links or addresses changed, or tampered
            if self._uplink.lines and eg.uplink == self._uplink:
                eg_added.append("egress:uplink")    # deleted or flushed by someone: drift
            self._send_uplink(eg.uplink)
        objs = self._list()
        have = listing.elements(objs or [])
        added, removed, drifted = _diff(want, have, now)
        added, removed = added + eg_added, removed + eg_removed
        if objs is None or self._structure is None or listing.fingerprint(objs) != self._structure:
            self._recreate(desired, now)
            return Drift(True, added, removed)
        iso = isolate.desired(desired, self.cfg, now, self._agent_cgroup)
        if iso != self._isolated:
            added += sorted(iso.labels() - self._isolated.labels())
            removed += sorted(self._isolated.labels() - iso.labels())
            self._send_isolation(iso)
        if drifted:
            cmds: list[dict[str, Any]] = []
            for name in drifted:
                cmds.append({"flush": {"set": {"family": FAMILY, "table": TABLE, "name": name}}})
                if want[name]:
                    cmds.append(element_cmd("add", name, elements_json(want[name], now)))
            self._send(cmds)
        self._desired = {m.id: m for m in desired}
        self._sync_loose(now)
        return Drift(False, added, removed)

    def remove(self) -> None:
        """Delete table inet swarm_agent, the egress policy's uplink table and a bridge
        table an agent killed while it replaced the table left; no error when absent."""
        table = {"family": FAMILY, "name": TABLE}
        self._send([{"add": {"table": table}}, {"delete": {"table": table}}])
        self._nft.cmd(f"add table {FAMILY} {BRIDGE_TABLE}\ndelete table {FAMILY} {BRIDGE_TABLE}\n")
        # The fleet's decisions (agent.enforce.fleet) are the agent's too.
        self._nft.cmd(f"add table {FAMILY} {FLEET_TABLE}\ndelete table {FAMILY} {FLEET_TABLE}\n")
        self._nft.cmd(uplink.text(uplink.Uplink()))
        self._uplink = uplink.Uplink()
        self._structure = None
        self._desired = {}
        self._sync_loose(time.time())

    def is_allowlisted(self, target: str) -> bool:
        """True when `target` lies wholly inside the allowlist (invalid targets: False)."""
        try:
            net = parse_network(target)
        except EnforceError:
            return False
        return any(net.version == a.version and net.subnet_of(a)  # type: ignore[arg-type]
                   for a in (*self._allow, *self.infrastructure))   # one met just now too

    def allow_networks(self) -> list[Network]:
        """The allowlist in force: loopback, the configured networks, the mesh's and the
        fleet's servers, this host's own addresses (as of the last setup, reconcile or
        refresh)."""
        return list(self._allow)

    def close(self) -> None:
        self._addrs.close()

    def egress_counts(self) -> dict[egress.Scope, int]:
        """Packets the egress policy dropped so far, per policy rule and scope (counters
        restart from 0 when the table is recreated)."""
        objs: list[dict[str, Any]] = []
        for chain in egress.CHAINS:     # the chains only: the sets may be large
            cmd = {"nftables": [{"list": {"chain": {"family": FAMILY, "table": TABLE, "name": chain}}}]}
            rc, out, err = self._nft.json_cmd(cmd)
            if rc != 0:
                raise EnforceError(f"cannot read chain {chain}: {_first_line(err)}", cmd)
            objs += listing.objects(out)
        counted = egress.counts(objs, self._egress)
        if self._uplink.lines:
            objs = self._uplink_listing()
            if objs is None:
                raise EnforceError("cannot read table netdev swarm_agent_uplink")
            for scope, n in egress.uplink_counts(objs, self._egress).items():
                counted[scope] = counted.get(scope, 0) + n
        return counted

    def egress_status(self) -> dict[str, Any]:
        """The egress policy in force: per rule its scopes, and the cgroups waited for."""
        return self._egress.status()

    def refresh_allowlist(self) -> None:
        """Re-read the host's own addresses into the allowlist (setup and reconcile do it
        too); the dry run, which does neither, calls this instead."""
        self._allow = self._read_allowlist()

    # --- internals ---------------------------------------------------------------------------

    def _sync_loose(self, now: float, desired: dict[str, Mitigation] | None = None) -> None:
        """nf_conntrack_tcp_loose=0 while a challenge is in force, the earlier value after.
        The cost, documented: while it is 0, a TCP flow conntrack did not see start (one
        older than the table) is invalid to every ruleset of this namespace."""
        challenged = any(m.kind in CHALLENGE_KINDS and (m.expires_at is None or m.expires_at > now)
                         for m in (self._desired if desired is None else desired).values())
        try:
            if self._loose_saved is None:
                with contextlib.suppress(OSError):
                    self._loose_saved = self._loose_file.read_text().strip() or None
            if challenged and self._loose_saved is None:
                with open(TCP_LOOSE) as f:
                    self._loose_saved = f.read().strip()
                with contextlib.suppress(OSError):
                    self._loose_file.parent.mkdir(mode=0o755, parents=True, exist_ok=True)  # as the control server makes it
                    self._loose_file.write_text(self._loose_saved)
                _write(TCP_LOOSE, "0")
            elif not challenged and self._loose_saved is not None:
                _write(TCP_LOOSE, self._loose_saved)
                self._loose_saved = None
                with contextlib.suppress(OSError):
                    self._loose_file.unlink()
        except OSError as e:
            raise EnforceError(f"cannot set {TCP_LOOSE} for the SYN proxy: {e.strerror}") from None

    def _read_allowlist(self) -> list[Network]:
        own = [ipaddress.ip_network(a) for a in self._addrs.addresses()]
        return [*LOOPBACK, *self.cfg.allowlist.networks(), *self.infrastructure, *own]

    def _recreate(self, desired: Sequence[Mitigation], now: float) -> None:
        # The table is replaced by one JSON transaction, and the isolation and egress rules
        # (text: no socket cgroupv2 in 1.0.6's JSON) follow in others: until then a bridge
        # table holds them, so no isolated node or denied workload gets a packet out in
        # between (at every start and every repair of drift).
        iso = isolate.desired(desired, self.cfg, now, self._agent_cgroup)
        eg = self._egress_desired()
        self._bridge(iso, eg)
        try:
            self._rebuild(desired, now, iso, eg)
        finally:
            self._nft.cmd(f"add table {FAMILY} {BRIDGE_TABLE}\ndelete table {FAMILY} {BRIDGE_TABLE}\n")

    def _bridge(self, iso: isolate.Isolation, eg: egress.Egress) -> None:
        """The bridge table: the isolation and egress chains with `iso` and `eg`, made
        afresh in one transaction (a bridge left by a killed agent is replaced)."""
        chains = [(name, hook, -10) for name, hook in ISOLATION_CHAINS if iso] + \
                 [(name, hook, -20) for name, hook in EGRESS_CHAINS if eg.lines]
        if not chains:
            return
        text = [f"add table {FAMILY} {BRIDGE_TABLE}", f"delete table {FAMILY} {BRIDGE_TABLE}",
                f"add table {FAMILY} {BRIDGE_TABLE}"]
        text += [f"add chain {FAMILY} {BRIDGE_TABLE} {name} {{ type filter hook {hook} "
                 f"priority {prio}; policy accept; }}" for name, hook, prio in chains]
        body = "\n".join(text) + "\n"
        if iso:
            body += isolate.rules_text(iso, BRIDGE_TABLE)
        if eg.lines:
            body += egress.rules_text(eg, BRIDGE_TABLE)
        rc, _, err = self._nft.cmd(body)
        if rc != 0:
            raise EnforceError(f"nftables refused the bridge table: {_first_line(err)}", body)

    def _rebuild(self, desired: Sequence[Mitigation], now: float, iso: isolate.Isolation,
                 eg: egress.Egress) -> None:
        contents = desired_contents(desired, self.cfg, now, self._allow)
        self._send(table_batch(self.cfg, contents, now))
        # Best effort: without it, challenged DNAT'd SYNs keep the kernel's timeouts.
        rc, _, err = self._nft.cmd(syn_wait_text())
        self.syn_wait_refused = _first_line(err) if rc != 0 else None
        self._isolated = isolate.Isolation()
        # The isolation rules follow in a second transaction (text: see agent.enforce.isolate).
        if iso:
            self._send_isolation(iso)
        self._egress = egress.Egress()
        self._send_egress(eg)
        up = self._egress_desired().uplink      # with the isolation now in force
        if self._uplink_due(up):
            self._send_uplink(up)
        self._desired = {m.id: m for m in desired}
        objs = self._list()
        self._structure = listing.fingerprint(objs) if objs is not None else None

    def _change(self, name: str, new: dict[str, Mitigation], now: float) -> None:
        old_c = desired_contents(self._desired.values(), self.cfg, now, self._allow)[name]
        new_c = desired_contents(new.values(), self.cfg, now, self._allow)[name]
        try:
            self._send(_incremental(name, old_c, new_c, now))
        except EnforceError:
            # The kernel is not what we believed (table deleted, elements edited or just
            # expired): repair everything towards the new state in one transaction instead.
            self.reconcile(list(new.values()), now)
            return
        self._desired = new

    def _apply_isolation(self, m: Mitigation, now: float) -> None:
        if m.expires_at is not None and m.expires_at <= now:
            raise EnforceError(f"the {m.kind.value} mitigation of {m.target} has already expired")
        self._isolate({**self._desired, m.id: m}, now)

    def _isolate(self, new: dict[str, Mitigation], now: float) -> None:
        iso = isolate.desired(new.values(), self.cfg, now, self._agent_cgroup)
        try:
            self._send_isolation(iso)
        except EnforceError:
            self.reconcile(list(new.values()), now)    # the table is not what we believed
            return
        self._desired = new

    def _send_isolation(self, iso: isolate.Isolation) -> None:
        """Rewrite the isolation chains as one text transaction, then re-read the structure
        (the isolation rules are part of it, so drift in them is seen)."""
        text = isolate.rules_text(iso)
        rc, _, err = self._nft.cmd(text)
        if rc != 0:
            raise EnforceError(f"nftables refused the isolation change: {_first_line(err)}", text)
        self._isolated = iso
        objs = self._list()
        self._structure = listing.fingerprint(objs) if objs is not None else None
        up = self._egress_desired().uplink      # node isolation cuts macvlan workloads too
        if self._uplink_due(up):
            self._send_uplink(up)

    def _egress_desired(self) -> egress.Egress:
        """The egress policy for the cgroups, links and addresses of the namespace now."""
        patterns = tuple({*WORKLOAD_INTERFACES, *(i for r in self.cfg.policy.egress
                                                  for i in r.interfaces)})
        try:
            links = uplinks(self.cfg.interfaces, patterns)
        except OSError:
            links = []
        return egress.desired(self.cfg, self._agent_cgroup, links, self._addrs.addresses(),
                              self._isolated.node)

    def _send_uplink(self, up: uplink.Uplink) -> None:
        """Make table netdev swarm_agent_uplink anew (agent.enforce.uplink), one
        transaction. A refusal is kept for status and never stops the caller: the inet
        table's repair must not wait on the uplink hook."""
        text = uplink.text(up)
        rc, _, err = self._nft.cmd(text)
        if rc != 0:
            self.uplink_error = f"nftables refused the uplink hook: {_first_line(err)}"
            log.error("egress uplink hook not applied", extra={"reason": self.uplink_error})
            self._uplink = uplink.Uplink(("(refused)",))    # try again at the next reconcile
            return
        self.uplink_error = ""
        self._uplink = up

    def _uplink_listing(self) -> list[dict[str, Any]] | None:
        cmd = {"nftables": [{"list": {"table": {"family": "netdev", "name": uplink.UPLINK_TABLE}}}]}
        rc, out, _ = self._nft.json_cmd(cmd)
        return listing.objects(out) if rc == 0 else None

    def _uplink_due(self, want: uplink.Uplink) -> bool:
        """Whether the uplink table must be made anew: other contents are wanted, or the
        kernel's is not what was made (deleted, a chain flushed or edited)."""
        if want != self._uplink:
            return True
        if not want.lines:
            return False
        objs = self._uplink_listing()
        return objs is None or uplink.rule_count(objs) != len(want.lines) * len(uplink.chains(want))

    def _send_egress(self, eg: egress.Egress) -> None:
        """Rewrite the egress chains as one text transaction (like the isolation's)."""
        text = egress.rules_text(eg)
        rc, _, err = self._nft.cmd(text)
        if rc != 0:
            raise EnforceError(f"nftables refused the egress policy: {_first_line(err)}", text)
        self._egress = eg
        objs = self._list()
        self._structure = listing.fingerprint(objs) if objs is not None else None

    def _list(self) -> list[dict[str, Any]] | None:
        return list_table(self._nft)

    def _send(self, cmds: list[dict[str, Any]]) -> None:
        """Send one atomic transaction; EnforceError (carrying the batch) when refused."""
        batch = {"nftables": cmds}
        _validate(batch)
        if not cmds:
            return
        rc, _, err = self._nft.json_cmd(batch)
        if rc != 0:
            raise EnforceError(f"nftables refused the change: {_first_line(err)}", batch)


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _validate(batch: dict[str, Any]) -> None:
    """Catch malformed batches before the kernel sees them: each command is one verb on one
    object of our table, and the whole batch serialises."""
    for cmd in batch["nftables"]:
        if not isinstance(cmd, dict) or len(cmd) != 1:
            raise EnforceError("internal error: a command must be one verb", batch)
        (body,) = cmd.values()
        (obj,) = body.values()
        if obj.get("family") != FAMILY or TABLE not in (obj.get("table"), obj.get("name")):
            raise EnforceError("internal error: a command left table inet swarm_agent", batch)
    try:
        json.dumps(batch)
    except (TypeError, ValueError) as e:
        raise EnforceError(f"internal error: batch does not serialise: {e}", batch) from None


def _incremental(name: str, old: SetContents, new: SetContents, now: float) -> list[dict[str, Any]]:
    """Commands turning set `name` from `old` into `new`. Deleting an element the kernel has
    already expired would fail the batch, so each is added (a no-op if present) first."""
    gone = [k for k in old if k not in new or new[k] != old[k]]
    fresh = {k: e for k, e in new.items() if k not in old or old[k] != e}
    cmds = []
    if gone:
        keys = [k.to_json() for k in sorted(gone)]
        cmds += [element_cmd("add", name, keys), element_cmd("delete", name, keys)]
    if fresh:
        cmds.append(element_cmd("add", name, elements_json(fresh, now)))
    return cmds


def _diff(want: dict[str, SetContents], have: listing.KernelContents, now: float
          ) -> tuple[list[str], list[str], list[str]]:
    added: list[str] = []
    removed: list[str] = []
    drifted = []
    for name in ELEMENT_SETS:
        a, r = listing.diff_set(want.get(name, {}), have.get(name, {}), now)
        added += [_label(name, k) for k in a]
        removed += [_label(name, k) for k in r]
        if a or r:
            drifted.append(name)
    return added, removed, drifted


def _label(name: str, key: Key) -> str:
    return f"{name}:{key}"


def _first_line(err: str) -> str:
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    msgs = [ln.split("Error:", 1)[1].strip() for ln in lines if "Error:" in ln]
    return msgs[0] if msgs else (lines[0] if lines else "unknown error")


def list_table(nft: nftables.Nftables) -> list[dict[str, Any]] | None:
    """The agent table's objects through handle `nft` (JSON output on), or None when the
    table does not exist; EnforceError when it cannot be read."""
    cmd = {"nftables": [{"list": {"table": {"family": FAMILY, "name": TABLE}}}]}
    rc, out, err = nft.json_cmd(cmd)
    if rc != 0:
        if "No such file or directory" in err:
            return None
        raise EnforceError(f"cannot read table {FAMILY} {TABLE}: {_first_line(err)}", cmd)
    return listing.objects(out)
