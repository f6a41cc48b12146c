"""CompositeEnforcer: the one Enforcer the agent uses, dispatching each mitigation to the
enforcer that owns its kind of host state.

    block_ip, rate_limit, reroute,        -> NftEnforcer (table inet swarm_agent)
    rate_limit_service, isolate_node
    isolate_service                       -> nftables cut first, then the cgroup freeze;
                                             a refused freeze keeps the cut in force
                                             (PartiallyApplied: isolation degrades, it
                                             never vanishes)
    freeze_cgroup                         -> CgroupEnforcer (cgroup.freeze; SIGSTOP
                                             where the freezer is refused)
    remove_peer ("IFNAME:BASE64KEY")      -> WireGuardEnforcer (saved peers in state_dir)
    kill_process (a pid, params uid)      -> ProcessEnforcer (the actor's session)

setup, reconcile and remove fan out to all of them. `check` validates any mitigation
without changing anything, raising typed errors the control API maps to statuses.

Dry run (dry_run=True) is this same enforcer: apply runs `check` -- every target check
and refusal the live apply meets -- and stops before the host change, recording the plan
in `planned`; setup, reconcile and remove change nothing; peer_for_address reads the live
peers. So a dry run quarantines the peer a live one would, and refuses what it refuses.
"""
from __future__ import annotations

import ipaddress
import logging
import time
from pathlib import Path
from typing import Any, Sequence

from agent.config import Config
from agent.enforce import isolate
from agent.enforce.base import (AllowlistedError, Drift, EnforceError, InvalidTarget,
                                PartiallyApplied, TargetNotFound)
from agent.enforce.cgroup import CgroupEnforcer, CgroupError, cgroup2_mount, normalise
from agent.enforce.nft import NftEnforcer
from agent.enforce.process import ProcessEnforcer
from agent.enforce.wgapi import NotWireGuard, WireGuardError
from agent.enforce.wireguard import WireGuardEnforcer, parse_target
from agent.model import Mitigation, MitigationKind

log = logging.getLogger("swarm_agent")

CGROUP_KINDS = (MitigationKind.ISOLATE_SERVICE, MitigationKind.FREEZE_CGROUP)
CUT = ("network cut: every socket of the cgroup dropped in and out "
       "(nftables socket cgroupv2)")
PEER_CACHE_S = 1.0
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


__all__ = ["CompositeEnforcer", "InvalidTarget", "TargetNotFound"]


class CompositeEnforcer:
    """The Enforcer contract (agent.enforce.base) over nftables, the cgroup freezer and
    WireGuard. Construct it inside the network namespace it protects (as NftEnforcer).

    Contract: apply either puts the whole mitigation in force, or raises with nothing
    changed, or -- isolate_service and freeze_cgroup only -- raises PartiallyApplied when
    a part is in force and a part was refused (the caller keeps it active: isolation
    degrades, it never vanishes); lift tries every part and raises the first error after;
    reconcile repairs every part and raises only after all were tried."""

    def __init__(self, cfg: Config, *, nft: NftEnforcer | None = None,
                 cgroups: CgroupEnforcer | None = None, wg: WireGuardEnforcer | None = None,
                 procs: ProcessEnforcer | None = None, dry_run: bool = False):
        self.cfg = cfg
        self.dry_run = dry_run
        self.planned: list[tuple[str, str, str]] = []     # dry run: (verb, kind, target)
        self.procs = procs or ProcessEnforcer()
        self.nft = nft or NftEnforcer(cfg)
        self.cgroups = cgroups or CgroupEnforcer()
        allow = (*cfg.allowlist.mesh, *cfg.allowlist.management)
        self.wg = wg or WireGuardEnforcer(Path(cfg.state_dir), allowlist=allow)
        self._peers: list[tuple[IPNetwork, str]] = []
        self._peers_at: float | None = None

    # --- the Enforcer contract -------------------------------------------------------------

    def setup(self, desired: Sequence[Mitigation], now: float) -> None:
        if self.dry_run:
            self.nft.refresh_allowlist()
            return
        self.nft.setup(desired, now)
        # A freezer or WireGuard problem (a corrupt saved-peers file) must not keep the
        # agent from starting: it is logged, and reconcile retries every few seconds.
        try:
            self._each("setup", lambda e: e.setup(desired, now), (self.cgroups, self.wg))
        except EnforceError:
            pass

    def apply(self, m: Mitigation, now: float) -> None:
        # One decision path for both modes: whatever check refuses, apply refuses.
        self.check(m.kind, m.target, m.params)
        if self.dry_run:
            self.planned.append(("apply", m.kind.value, m.target))
            return
        if m.kind is MitigationKind.KILL_PROCESS:
            self.procs.apply(m, now)
        elif m.kind is MitigationKind.REMOVE_PEER:
            self.wg.apply(m, now)
        elif m.kind is MitigationKind.FREEZE_CGROUP:
            self.cgroups.apply(m, now)
        elif m.kind is MitigationKind.ISOLATE_SERVICE:
            self._isolate_service(m, now)
        else:
            self.nft.apply(m, now)

    def _isolate_service(self, m: Mitigation, now: float) -> None:
        # The cut first: traffic stops at once, even while the freeze is still settling.
        # A freeze that fails (a delegated cgroup whose freezer the agent may not write,
        # and whose processes would not stop either) leaves the cut in force: an operator
        # is better served by a service cut off the network and said so, than by nothing.
        self.cgroups.check(m.target)
        self.nft.apply(m, now)
        try:
            self.cgroups.apply(m, now)
        except PartiallyApplied as e:
            raise PartiallyApplied([CUT, *e.in_force], e.refused) from None
        except EnforceError as e:
            raise PartiallyApplied([CUT], [f"the freeze: {e}"]) from None

    def lift(self, m: Mitigation) -> None:
        if self.dry_run:
            self.planned.append(("lift", m.kind.value, m.target))
            return
        if m.kind is MitigationKind.KILL_PROCESS:
            return          # a kill cannot be undone
        if m.kind is MitigationKind.REMOVE_PEER:
            self.wg.lift(m)
            return
        if m.kind is MitigationKind.FREEZE_CGROUP:
            self.cgroups.lift(m)
            return
        if m.kind is MitigationKind.ISOLATE_SERVICE:
            self._each("lift", lambda e: e.lift(m), (self.cgroups, self.nft))
            return
        self.nft.lift(m)

    def reconcile(self, desired: Sequence[Mitigation], now: float) -> Drift:
        if self.dry_run:
            self.nft.refresh_allowlist()     # the host's addresses, as live reconcile does
            return Drift()
        drifts: list[Drift] = []
        self._each("reconcile", lambda e: drifts.append(e.reconcile(desired, now)),
                   (self.nft, self.cgroups, self.wg))
        out = Drift()
        for d in drifts:
            out.table_recreated |= d.table_recreated
            out.elements_added += d.elements_added
            out.elements_removed += d.elements_removed
            out.notes += d.notes
        return out

    def remove(self) -> None:
        if self.dry_run:
            return
        self._each("remove", lambda e: e.remove(), (self.nft, self.cgroups, self.wg))

    def is_allowlisted(self, target: str) -> bool:
        if target.strip().isdigit():
            return self.procs.is_allowlisted(target)
        if _is_peer(target):
            return self.wg.is_allowlisted(target)
        return self.nft.is_allowlisted(target)

    def close(self) -> None:
        self.nft.close()

    def egress_counts(self) -> dict[Any, int]:
        return {} if self.dry_run else self.nft.egress_counts()

    def egress_status(self) -> dict[str, Any]:
        """What the egress chains hold; the dry run applies no egress policy."""
        if self.dry_run:
            return {"enforced": {}, "waiting": [], "dry_run": "not applied"}
        return self.nft.egress_status()

    def peer_for_address(self, addr: str) -> str | None:
        """The "IFNAME:KEY" target of the WireGuard peer whose allowed IPs route `addr`
        (longest prefix, as WireGuard's cryptokey routing): a live peer, else one already
        quarantined, so late findings about it map to the same mitigation; None when the
        address is no peer's. The peer table is read at most every PEER_CACHE_S: a flood
        of findings must not become a flood of UAPI/netlink requests."""
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return None
        now = time.monotonic()
        if self._peers_at is None or now - self._peers_at >= PEER_CACHE_S:
            try:
                self._peers = self._peer_table()
            except WireGuardError as e:
                log.warning("cannot list WireGuard peers", extra={"error": str(e)})
                self._peers = []
            self._peers_at = now
        best = max(((net.prefixlen, target) for net, target in self._peers
                    if net.version == ip.version and ip in net), default=None,
                   key=lambda x: x[0])
        return None if best is None else best[1]

    def _peer_table(self) -> list[tuple[IPNetwork, str]]:
        live = [(ipaddress.ip_network(n), f"{ifname}:{p.public_key}")
                for ifname in self.wg.interfaces() for p in self.wg.peers(ifname)
                for n in p.allowed_ips]
        saved = [(ipaddress.ip_network(n), f"{ifname}:{key}")
                 for ifname, peers in self.wg.saved().items() for key, p in peers.items()
                 for n in p.allowed_ips]
        return live + saved     # max() keeps the first of equal prefixes: live wins

    def check(self, kind: MitigationKind, target: str, params: dict[str, Any]) -> str:
        """Validate a mitigation without changing anything; the normalised target. Raises
        InvalidTarget, TargetNotFound, or another EnforceError for a refusal (no
        allowlist, the agent's own cgroup, not a WireGuard interface, allowlisted, another
        user's process). apply runs it first, live and dry alike."""
        if kind is MitigationKind.ISOLATE_NODE:
            isolate.check_node(Mitigation(kind, "node", 0.0, None, params=params), self.cfg)
            return "node"
        if kind in CGROUP_KINDS:
            return self._check_cgroup(target)
        if kind is MitigationKind.REMOVE_PEER:
            return self._check_peer(target)
        if kind is MitigationKind.KILL_PROCESS:
            return self.procs.check(target, params)
        self.nft.check(Mitigation(kind, target, 0.0, None, params=params))
        return target

    def _check_cgroup(self, target: str) -> str:
        try:
            path = normalise(target)
        except CgroupError as e:
            raise InvalidTarget(str(e)) from None
        if path == "/":
            raise CgroupError("the root cgroup holds the whole node: isolate the node instead")
        try:
            exists = (cgroup2_mount() / path.lstrip("/") / "cgroup.procs").is_file()
        except CgroupError:
            exists = True       # let check() below say why cgroups cannot be used
        if not exists:
            raise TargetNotFound(f"no cgroup {path}")
        return self.cgroups.check(path).path

    def _check_peer(self, target: str) -> str:
        try:
            ifname, key = parse_target(target)
        except WireGuardError as e:
            raise InvalidTarget(str(e)) from None
        try:
            peers = self.wg.peers(ifname)
        except NotWireGuard:
            raise
        except WireGuardError as e:
            raise TargetNotFound(str(e)) from None
        if not any(p.public_key == key for p in peers):
            raise TargetNotFound(f"{ifname} has no peer with public key {key}")
        if self.wg.is_allowlisted(target):
            raise AllowlistedError(f"peer {key} of {ifname} routes allowlisted networks and "
                                   "is never removed")
        return f"{ifname}:{key}"

    @staticmethod
    def _each(what: str, fn, enforcers) -> None:
        """Run `fn` on every enforcer; raise the first error after all were tried."""
        first: EnforceError | None = None
        for e in enforcers:
            try:
                fn(e)
            except EnforceError as err:
                log.error(f"{what} failed", extra={"enforcer": type(e).__name__,
                                                   "error": str(err)})
                first = first or err
        if first is not None:
            raise first


def _is_peer(target: str) -> bool:
    try:
        parse_target(target)
    except WireGuardError:
        return False
    return True
