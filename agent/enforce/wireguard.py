"""WireGuard peer quarantine (MitigationKind.REMOVE_PEER): remove a peer, keep its
configuration, put it back on release.

Mitigation target: "<ifname>:<base64 public key>", e.g. "wg0:Vx3...=". The removed peer's
configuration (public key, endpoint, allowed IPs, keepalive, preshared key) is written to
`<state_dir>/wireguard-peers.json` (mode 0600: preshared keys are secrets) *before* the
peer is removed, atomically (temp file, fsync, rename), so a crash cannot lose it.
Use it in the network namespace whose interfaces it manages (like NftEnforcer).
"""
from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Any, Sequence

from agent.enforce.base import AllowlistedError, Drift, UnsupportedMitigation
from agent.enforce.wgapi import (UAPI_DIR, Device, NotWireGuard, Peer, WireGuardError, check_key,
                                 open_device, uapi_device)
from agent.model import Mitigation, MitigationKind

SAVED_FILE = "wireguard-peers.json"


def parse_target(target: str) -> tuple[str, str]:
    """"wg0:KEY" -> ("wg0", "KEY"); WireGuardError when malformed."""
    ifname, sep, key = target.strip().partition(":")
    if not sep or not ifname:
        raise WireGuardError(f"not a WireGuard peer: {target!r} (expected IFNAME:PUBLIC_KEY)")
    return ifname, check_key(key)


def target_of(ifname: str, public_key: str) -> str:
    return f"{ifname}:{public_key}"


class WireGuardEnforcer:
    """The Enforcer for REMOVE_PEER, on userspace (UAPI) or kernel WireGuard devices.

    `allowlist`: networks (mesh, management) whose peers are never removed: a peer whose
    allowed IPs overlap them may be the node's path to the mesh control plane."""

    def __init__(self, state_dir: str | Path, allowlist: Sequence[str] = (),
                 uapi_dir: Path = UAPI_DIR):
        self._file = Path(state_dir) / SAVED_FILE
        self._allow = [ipaddress.ip_network(n, strict=False) for n in allowlist]
        self._uapi_dir = Path(uapi_dir)

    # --- inspection ------------------------------------------------------------------------

    def device(self, ifname: str) -> Device:
        return open_device(ifname, self._uapi_dir)

    def interfaces(self) -> list[str]:
        """WireGuard interfaces of this network namespace (userspace and kernel)."""
        import socket

        out = []
        for _, name in sorted(socket.if_nameindex()):
            try:
                self.device(name)
            except WireGuardError:
                continue
            out.append(name)
        return out

    def peers(self, ifname: str) -> list[Peer]:
        return self.device(ifname).peers()

    def saved(self) -> dict[str, dict[str, Peer]]:
        """Removed peers kept for restoring: {ifname: {public key: Peer}}."""
        try:
            data = json.loads(self._file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise WireGuardError(f"cannot read saved WireGuard peers {self._file}: {e}") from None
        return {i: {k: Peer.from_json(p) for k, p in peers.items()} for i, peers in data.items()}

    def peer_for_address(self, addr: str) -> tuple[str, str] | None:
        """(ifname, public key) of the live peer whose allowed IPs route `addr` (longest
        prefix wins, as in WireGuard's own cryptokey routing), or None."""
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return None
        best: tuple[int, str, str] | None = None
        for ifname in self.interfaces():
            for peer in self.peers(ifname):
                for net in map(ipaddress.ip_network, peer.allowed_ips):
                    if ip.version == net.version and ip in net and (best is None or net.prefixlen > best[0]):
                        best = (net.prefixlen, ifname, peer.public_key)
        return None if best is None else (best[1], best[2])

    # --- changes -----------------------------------------------------------------------------

    def remove_peer(self, ifname: str, public_key: str) -> Peer:
        """Save the peer's configuration, then remove it. Errors (no such interface, not
        WireGuard, unknown key, allowlisted) leave everything as it was."""
        check_key(public_key)
        dev = self.device(ifname)
        peer = next((p for p in dev.peers() if p.public_key == public_key), None)
        if peer is None:
            raise WireGuardError(f"{ifname} has no peer with public key {public_key}")
        if self._allowlisted(peer):
            raise AllowlistedError(f"peer {public_key} of {ifname} routes allowlisted networks "
                                   f"({', '.join(peer.allowed_ips)}) and is never removed")
        saved = self.saved()
        # A peer quarantined again after being re-added keeps its first saved configuration:
        # that is the one to restore, not whatever was put back meanwhile.
        peer = saved.setdefault(ifname, {}).setdefault(public_key, peer)
        self._write(saved)
        dev.remove(public_key)
        return peer

    def restore_peer(self, ifname: str, public_key: str) -> Peer:
        """Put a removed peer back from its saved configuration, then forget it."""
        check_key(public_key)
        saved = self.saved()
        peer = saved.get(ifname, {}).get(public_key)
        if peer is None:
            raise WireGuardError(f"no saved configuration for peer {public_key} of {ifname}")
        self.device(ifname).add(peer)
        del saved[ifname][public_key]
        self._write({i: p for i, p in saved.items() if p})
        return peer

    # --- the Enforcer contract -----------------------------------------------------------

    def setup(self, desired: Sequence[Mitigation], now: float) -> None:
        self.reconcile(desired, now)

    def apply(self, m: Mitigation, now: float) -> None:
        """Quarantine the peer named by m.target ("ifname:key")."""
        if m.kind is not MitigationKind.REMOVE_PEER:
            raise UnsupportedMitigation(f"WireGuard does not enforce {m.kind.value} mitigations")
        self.remove_peer(*parse_target(m.target))

    def lift(self, m: Mitigation) -> None:
        """Restore the peer; one not saved (already restored, never removed) is no error."""
        if m.kind is not MitigationKind.REMOVE_PEER:
            return
        ifname, key = parse_target(m.target)
        if key in self.saved().get(ifname, {}):
            self.restore_peer(ifname, key)

    def reconcile(self, desired: Sequence[Mitigation], now: float) -> Drift:
        """Remove desired-quarantined peers that are back (re-added by someone); restore
        saved peers no longer desired (lifted or expired while the agent was away).
        Interfaces that are gone are skipped: their peers stay saved."""
        drift = Drift()
        want = set()
        for m in desired:
            if m.kind is MitigationKind.REMOVE_PEER and (m.expires_at is None or m.expires_at > now):
                try:
                    want.add(parse_target(m.target))
                except WireGuardError:
                    continue
        for ifname, key in sorted(want):
            try:
                present = any(p.public_key == key for p in self.peers(ifname))
                if present:
                    self.remove_peer(ifname, key)
                    drift.elements_removed.append(f"peer:{target_of(ifname, key)}")
            except WireGuardError:
                continue
        for ifname, peers in self.saved().items():
            for key in peers:
                if (ifname, key) not in want and self._try_restore(ifname, key):
                    drift.elements_added.append(f"peer:{target_of(ifname, key)}")
        return drift

    def remove(self) -> None:
        """Restore every peer the agent removed (interfaces that are gone keep theirs saved)."""
        for ifname, peers in self.saved().items():
            for key in peers:
                self._try_restore(ifname, key)

    def is_allowlisted(self, target: str) -> bool:
        """True when the peer's allowed IPs overlap the allowlist (invalid or unknown: False)."""
        try:
            ifname, key = parse_target(target)
            peer = next((p for p in self.peers(ifname) if p.public_key == key), None)
        except WireGuardError:
            return False
        return peer is not None and self._allowlisted(peer)

    # --- internals ---------------------------------------------------------------------------

    def _allowlisted(self, peer: Peer) -> bool:
        nets = [ipaddress.ip_network(n) for n in peer.allowed_ips]
        return any(n.version == a.version and n.overlaps(a) for n in nets for a in self._allow)  # type: ignore[arg-type]

    def _try_restore(self, ifname: str, key: str) -> bool:
        try:
            self.restore_peer(ifname, key)
        except WireGuardError:
            return False
        return True

    def _write(self, saved: dict[str, dict[str, Peer]]) -> None:
        data: dict[str, Any] = {i: {k: p.to_json() for k, p in peers.items()}
                                for i, peers in saved.items()}
        self._file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._file)
        dir_fd = os.open(self._file.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)       # the rename itself must survive a crash too
        finally:
            os.close(dir_fd)


__all__ = ["NotWireGuard", "Peer", "WireGuardEnforcer", "WireGuardError", "parse_target",
           "target_of", "uapi_device"]
