"""The enforcer contract: every enforcer applies, lifts and reconciles, and has a dry-run twin.

Only `agent.enforce` changes the host. Callers (the responder, the control API) hold
Mitigation objects; an enforcer turns them into kernel state and back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from agent.model import Mitigation, MitigationKind


class EnforceError(RuntimeError):
    """A host change failed; nothing of the batch was applied. `batch` is what was sent."""

    def __init__(self, message: str, batch: Any = None):
        super().__init__(message)
        self.batch = batch


class AllowlistedError(EnforceError):
    """The target lies inside the allowlist: it is reported, never blocked."""


class UnsupportedMitigation(EnforceError):
    """This enforcer does not handle that kind of mitigation."""


class InvalidTarget(EnforceError):
    """The target is malformed for its kind (not a cgroup path, not IFNAME:KEY, not a pid)."""


class TargetNotFound(EnforceError):
    """The target is well formed but does not exist (no such cgroup, interface, peer or
    process)."""


class PartiallyApplied(EnforceError):
    """Part of a mitigation is in force and stays so; part was refused. `in_force` and
    `refused` say which, one sentence each (the refusals with their reason). The caller
    records the mitigation as active (reconcile keeps what is in force) and tells a human."""

    def __init__(self, in_force: list[str], refused: list[str]):
        super().__init__("in force: " + "; ".join(in_force or ["nothing"]) +
                         ". Refused: " + "; ".join(refused))
        self.in_force = list(in_force)
        self.refused = list(refused)


@dataclass
class Drift:
    """What reconcile found different from the desired state and put right."""

    table_recreated: bool = False
    elements_added: list[str] = field(default_factory=list)
    elements_removed: list[str] = field(default_factory=list)
    # (mitigation id, sentence): what somebody did against a mitigation in force (thawed
    # it, continued or moved its processes) and what reconcile did about it; for its incident.
    notes: list[tuple[str, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.table_recreated or bool(self.elements_added or self.elements_removed
                                            or self.notes)


class Enforcer(Protocol):
    # True: apply runs every check the live enforcer does and stops before the host change.
    dry_run: bool

    def check(self, kind: MitigationKind, target: str, params: dict[str, Any]) -> str:
        """Validate a mitigation of `kind` on `target` without changing anything; the
        normalised target. Raises what apply would: InvalidTarget, TargetNotFound,
        AllowlistedError, or another EnforceError for a refusal."""

    def peer_for_address(self, addr: str) -> str | None:
        """"IFNAME:KEY" of the WireGuard peer whose tunnel address `addr` is, or None."""

    def setup(self, desired: Sequence[Mitigation], now: float) -> None:
        """Create (or replace) the agent's state on the host, holding exactly `desired`."""

    def apply(self, m: Mitigation, now: float) -> None:
        """Put one mitigation in force with its remaining lifetime; atomic."""

    def lift(self, m: Mitigation) -> None:
        """Remove one mitigation; lifting one that is already gone is not an error."""

    def reconcile(self, desired: Sequence[Mitigation], now: float) -> Drift:
        """Compare the host with `desired`, repair any difference atomically, say what changed."""

    def remove(self) -> None:
        """Remove everything the agent owns on the host, and nothing else."""

    def is_allowlisted(self, target: str) -> bool:
        """True when `target` (address or CIDR) lies within the allowlist."""

    def egress_counts(self) -> dict[Any, int]:
        """Packets the egress policy dropped so far, per agent.enforce.egress.Scope."""

    def egress_status(self) -> dict[str, Any]:
        """The egress policy in force (per rule its scopes) and the cgroups waited for."""


class DryRunEnforcer:
    """A recording stand-in for tests of the enforcer's callers (responder, control API):
    it changes nothing, knows no peers and refuses only allowlisted targets. The agent's
    own dry-run mode is not this: it is CompositeEnforcer(dry_run=True), which runs the
    live enforcer's checks and stops before the host change."""

    dry_run = True

    def __init__(self, allowlisted: Sequence[str] = ()):
        import ipaddress

        self._allow = [ipaddress.ip_network(n, strict=False) for n in allowlisted]
        self.actions: list[tuple[str, str, str]] = []   # (verb, kind, target)

    def check(self, kind: MitigationKind, target: str, params: dict[str, Any]) -> str:
        if self.is_allowlisted(target):
            raise AllowlistedError(f"{target} is allowlisted")
        return "node" if kind is MitigationKind.ISOLATE_NODE else (target.strip() or "node")

    def peer_for_address(self, addr: str) -> str | None:
        return None

    def setup(self, desired: Sequence[Mitigation], now: float) -> None:
        self.actions.append(("setup", "", str(len(desired))))

    def apply(self, m: Mitigation, now: float) -> None:
        if self.is_allowlisted(m.target):
            raise AllowlistedError(f"{m.target} is allowlisted")
        self.actions.append(("apply", m.kind.value, m.target))

    def lift(self, m: Mitigation) -> None:
        self.actions.append(("lift", m.kind.value, m.target))

    def reconcile(self, desired: Sequence[Mitigation], now: float) -> Drift:
        return Drift()

    def remove(self) -> None:
        self.actions.append(("remove", "", ""))

    def egress_counts(self) -> dict[Any, int]:
        return {}

    def egress_status(self) -> dict[str, Any]:
        return {"enforced": {}, "waiting": []}

    def is_allowlisted(self, target: str) -> bool:
        import ipaddress

        try:
            net = ipaddress.ip_network(target, strict=False)
        except ValueError:
            return False
        return any(net.version == a.version and net.subnet_of(a) for a in self._allow)
