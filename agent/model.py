"""The core model shared by every stage: Event -> Finding -> Incident -> Mitigation.

Times: `*_ns` fields named `mono` are CLOCK_MONOTONIC nanoseconds (the clock BPF's
bpf_ktime_get_ns() and time.monotonic_ns() share), used for latency; wall-clock times
are float seconds since the epoch (`*_at`), used for storage and display.
"""
from __future__ import annotations

import enum
import ipaddress
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping


class EventClass(enum.StrEnum):
    """The four rows of the specification table, with their deadlines, the agent's
    own health (storage failing, state recovered): always escalated to a human, and the
    GPUs' health (operator incidents, reported only)."""

    SECURITY_BREACH = "security_breach"
    POLICY_VIOLATION = "policy_violation"
    SUSPICIOUS_ACTIVITY = "suspicious_activity"
    SYSTEM_ATTACK = "system_attack"
    AGENT_HEALTH = "agent_health"
    # A GPU failing (XIDs of a broken or lost GPU, double-bit ECC errors, thermal or power
    # slowdown): for the operators, reported, never a block or a kill.
    GPU_HEALTH = "gpu_health"

    @property
    def deadline_s(self) -> float:
        return _DEADLINES_S[self]


_DEADLINES_S = {
    EventClass.SECURITY_BREACH: 60.0,
    EventClass.POLICY_VIOLATION: 300.0,
    EventClass.SUSPICIOUS_ACTIVITY: 900.0,
    EventClass.SYSTEM_ATTACK: 30.0,
    EventClass.AGENT_HEALTH: 60.0,
    EventClass.GPU_HEALTH: 60.0,
}


class Severity(enum.StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


class IncidentState(enum.StrEnum):
    OPEN = "open"
    MITIGATED = "mitigated"
    ESCALATED = "escalated"
    RESOLVED = "resolved"
    FALSE_POSITIVE = "false_positive"


class MitigationKind(enum.StrEnum):
    BLOCK_IP = "block_ip"                # target: address or CIDR
    RATE_LIMIT = "rate_limit"            # target: address or CIDR
    REROUTE = "reroute"                  # target: address or CIDR
    RATE_LIMIT_SERVICE = "rate_limit_service"  # target: "tcp/80", "udp/53"
    REMOVE_PEER = "remove_peer"
    ISOLATE_NODE = "isolate_node"
    ISOLATE_SERVICE = "isolate_service"
    KILL_PROCESS = "kill_process"
    FREEZE_CGROUP = "freeze_cgroup"
    # Answers to forgeable evidence, which a real owner of the address passes: TCP through
    # a SYN proxy, other unsolicited traffic under a per-source limit.
    CHALLENGE = "challenge"                  # target: address or CIDR
    CHALLENGE_SERVICE = "challenge_service"  # target: "tcp/80" (SYN proxy), "udp/53" (per source)


# What an operator is told a mitigation of an address or service was (incidents, status).
CHALLENGED = "unverified source: challenged"
BLOCKED = "blocked"


def verdict(kind: MitigationKind) -> str:
    """"unverified source: challenged" for the answers to forgeable evidence, "blocked" for
    a block, the kind's name for anything else."""
    if kind in (MitigationKind.CHALLENGE, MitigationKind.CHALLENGE_SERVICE):
        return CHALLENGED
    return BLOCKED if kind is MitigationKind.BLOCK_IP else kind.value.replace("_", " ")


class MitigationState(enum.StrEnum):
    ACTIVE = "active"
    DRY_RUN = "dry_run"      # recorded, not applied (dry-run mode)
    LIFTED = "lifted"        # removed by an operator
    EXPIRED = "expired"      # its lifetime ran out
    FAILED = "failed"        # could not be applied; the incident says why


def mono_ns() -> int:
    return time.monotonic_ns()


def mono_to_wall(mono: int) -> float:
    """Convert a CLOCK_MONOTONIC timestamp to wall-clock seconds."""
    return time.time() - (time.monotonic_ns() - mono) / 1e9


@dataclass(frozen=True, slots=True)
class Event:
    """What a source saw. `subject` is an address ("10.0.0.1", "2001:db8::1") or a
    service ("tcp/80"); `first_mono_ns` is when the evidence it carries began (the start
    of the kernel's counting window), `mono_ns` when it was observed."""

    kind: str
    subject: str
    mono_ns: int
    first_mono_ns: int
    fields: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""


@dataclass(frozen=True, slots=True)
class Finding:
    """A rule fired. `entity` is "ip:<addr>" or "service:<proto>/<port>".

    Clocks (CLOCK_MONOTONIC): `first_mono_ns` is when the evidence began and
    `detected_mono_ns` the time of the event the rule fired on (the kernel's, for probe
    events); `decided_mono_ns` is when the agent's detector decided (user space, stamped by
    the daemon after the rules ran; 0 where nobody stamped it: the event time stands in).
    The incident's detected_at is the decision; the kernel's time stays in the timeline."""

    rule_id: str
    rule_version: int
    event_class: EventClass
    severity: Severity
    entity: str
    action: str                  # what the rule asks for: block, rate_limit, reroute, report
    first_mono_ns: int           # time of the first evidence
    detected_mono_ns: int
    evidence: Mapping[str, Any] = field(default_factory=dict)
    decided_mono_ns: int = 0

    @property
    def decision_mono_ns(self) -> int:
        """When the detector decided, or the event's time where that was not stamped."""
        return self.decided_mono_ns or self.detected_mono_ns

    @property
    def rule(self) -> str:
        return f"{self.rule_id}@{self.rule_version}"


@dataclass(slots=True)
class Incident:
    id: str
    event_class: EventClass
    entity: str
    severity: Severity
    state: IncidentState
    first_seen_at: float
    detected_at: float
    mitigated_at: float | None = None
    resolved_at: float | None = None
    rules: list[str] = field(default_factory=list)
    findings: int = 1
    summary: str = ""


@dataclass(slots=True)
class Mitigation:
    """A host change owned by the agent. `expires_at` None means until lifted."""

    kind: MitigationKind
    target: str
    created_at: float
    expires_at: float | None
    incident_id: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    state: MitigationState = MitigationState.ACTIVE
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    reason: str = ""

    def remaining_s(self, now: float) -> float | None:
        return None if self.expires_at is None else max(0.0, self.expires_at - now)


def parse_target(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An address or CIDR as a network; raises ValueError with a readable message.

    An IPv4-mapped IPv6 address or network (::ffff:a.b.c.d, prefix /96 or longer) is the
    IPv4 one it maps, as the probes report such peers, so that it lands in the IPv4 sets
    and matches the IPv4 traffic it names. An address with a zone index (fe80::1%eth0) is
    refused: the sets match a source on every interface, and dropping the zone silently
    would widen what the operator asked for."""
    text = text.strip()
    if "%" in text:
        addr, _, zone = text.partition("%")
        raise ValueError(f"{addr}%{zone.split('/')[0]} is a scoped address (zone "
                         f"{zone.split('/')[0]!r}): a block applies on every interface, so "
                         "give the address without its zone")
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"not an IP address or CIDR: {text!r}") from None
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        v4 = net.network_address.ipv4_mapped
        if v4 is not None:
            return ipaddress.IPv4Network((v4, net.prefixlen - 96))
    return net


FEEDBACK_SCOPES = ("exe", "address", "cgroup", "container", "node")
FEEDBACK_ACTIONS = ("suppress", "learn")


@dataclass(slots=True)
class Feedback:
    """An operator's verdict turned into a scoped exception (agent.detect.feedback): a
    finding of `rule` (the rule or detector id, no version) whose scope matches is counted
    and not handled. `rule_version` is recorded for review, never matched. Always expires.
    `hits`: findings it kept from the responder."""

    id: str
    rule: str
    rule_version: int
    scope_kind: str
    scope_value: str
    action: str
    created_at: float
    expires_at: float
    reason: str = ""
    by: str = ""
    incident_id: str = ""
    reverted_at: float | None = None
    reverted_by: str = ""
    hits: int = 0

    def live(self, now: float) -> bool:
        return self.reverted_at is None and now < self.expires_at
