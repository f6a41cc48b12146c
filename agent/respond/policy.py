"""Response policy: which mitigation a rule's action means, its parameters and lifetime.

Pure functions over the config; the responder (engine.py) owns state and side effects.
"""
from __future__ import annotations

import ipaddress
import re
from typing import Any, Mapping

from agent.config import Config, MitigationPolicy, RateLimit
from agent.model import Finding, MitigationKind, parse_target

ACTION_KINDS: dict[str, MitigationKind] = {
    "block": MitigationKind.BLOCK_IP,
    "rate_limit": MitigationKind.RATE_LIMIT,
    "reroute": MitigationKind.REROUTE,
    "rate_limit_service": MitigationKind.RATE_LIMIT_SERVICE,
    "isolate_node": MitigationKind.ISOLATE_NODE,        # breach rules, scope node
    "isolate_service": MitigationKind.ISOLATE_SERVICE,  # breach rules, scope service (cgroup)
    # Forgeable evidence (SYNs, ports probed by SYNs, UDP/ICMP rates): challenge the source.
    "challenge": MitigationKind.CHALLENGE,
    "challenge_service": MitigationKind.CHALLENGE_SERVICE,
    # Policy rules (policy.gpu_unauthorized): the violating process, or its workload.
    "kill": MitigationKind.KILL_PROCESS,
    "freeze": MitigationKind.FREEZE_CGROUP,
}
# A finding's action that opens an investigation: escalated, never mitigated by itself.
INVESTIGATE = "investigate"
INVESTIGATION_OPENED = "investigation opened for the security team"
SOURCE_KINDS = (MitigationKind.BLOCK_IP, MitigationKind.RATE_LIMIT, MitigationKind.REROUTE,
                MitigationKind.CHALLENGE)
SERVICE_KINDS = (MitigationKind.RATE_LIMIT_SERVICE, MitigationKind.CHALLENGE_SERVICE)
CHALLENGE_KINDS = (MitigationKind.CHALLENGE, MitigationKind.CHALLENGE_SERVICE)

# Isolations and quarantines: each escalates its incident for a human, and lasts
# mitigation.isolation_ttl_s (None: until released).
ISOLATION_KINDS = (MitigationKind.ISOLATE_NODE, MitigationKind.ISOLATE_SERVICE,
                   MitigationKind.FREEZE_CGROUP, MitigationKind.REMOVE_PEER)
# The distributed switch counts the sources one rule mitigated over this span.
DISTRIBUTED_WINDOW_S = 60.0
LIMITED_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_SERVICE_RE = re.compile(r"^(tcp|udp)/([0-9]{1,5})$")


def lifetime_s(base_ttl_s: float, prior: int, policy: MitigationPolicy) -> float:
    """base ttl x repeat_factor ^ earlier mitigations of the target, capped at max_ttl_s."""
    # Cap the exponent too: a very frequent offender must not overflow the float.
    ttl = base_ttl_s * policy.repeat_factor ** min(prior, 64)
    return min(ttl, policy.max_ttl_s)


def target_of(entity: str) -> str:
    """"ip:2001:db8::1" -> "2001:db8::1", "service:tcp/80" -> "tcp/80". An address in
    the IPv4-mapped form ("ip:::ffff:10.0.0.1") is its IPv4 address, as parse_target and
    the enforcer's sets take it, so that the allowlist is checked in the right family."""
    target = entity.split(":", 1)[1] if ":" in entity else entity
    if entity.startswith("ip:") and target[:7].lower() == "::ffff:":
        try:
            net = parse_target(target)
        except ValueError:
            return target
        return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
    return target


def service_of(finding: Finding) -> str | None:
    """The attacked service from a finding's evidence ("tcp/80"), or None without a port.

    Events without a proto come from TCP state probes, hence the tcp default."""
    ev: Mapping[str, Any] = finding.evidence
    dport = ev.get("dport")
    if isinstance(dport, bool) or not isinstance(dport, int) or not 0 < dport < 65536:
        return None
    proto = str(ev.get("proto") or "tcp").lower()
    return f"{proto}/{dport}" if proto in ("tcp", "udp") else None


def params_for(kind: MitigationKind, cfg: Config) -> dict[str, Any]:
    """The enforcement parameters a mitigation of `kind` carries."""
    if kind is MitigationKind.RATE_LIMIT:
        return _rate(cfg.enforce.rate_limit)
    if kind is MitigationKind.RATE_LIMIT_SERVICE:
        return _rate(cfg.enforce.service_rate_limit)
    if kind in (MitigationKind.CHALLENGE, MitigationKind.CHALLENGE_SERVICE):
        return _rate(cfg.enforce.challenge_rate_limit)
    if kind is MitigationKind.REROUTE:
        rr = cfg.enforce.reroute
        return {"sinkhole_v4": rr.sinkhole_v4, "sinkhole_v6": rr.sinkhole_v6, "mark": rr.mark}
    return {}


def _rate(rl: RateLimit) -> dict[str, Any]:
    return {"packets_per_second": rl.packets_per_second, "burst": rl.burst}


def unblockable(target: str) -> str | None:
    """Why `target` must never be a source mitigation, or None. The unspecified,
    multicast and limited broadcast (255.255.255.255) addresses are never a real
    attacker's source: blocking them only hides a decoding problem or takes down something
    shared."""
    try:
        net = parse_target(target)
    except ValueError:
        return None
    addr = net.network_address
    if addr.is_unspecified:
        return "is the unspecified address"
    if addr.is_multicast:
        return "is a multicast address"
    if addr == LIMITED_BROADCAST:
        return "is the limited broadcast address"
    return None


def check_target(kind: MitigationKind, target: str) -> str:
    """Validate and normalise a manual target; raises ValueError with a readable message."""
    if kind in SOURCE_KINDS:
        net = parse_target(target)
        if (why := unblockable(target)) is not None:
            raise ValueError(f"{target} {why}; it cannot be blocked")
        # A single address is stored as the detector writes it, so that a manual and an
        # automatic block of the same host are recognised as the same target.
        is_host = net.prefixlen == net.max_prefixlen
        return str(net.network_address) if is_host else str(net)
    if kind in SERVICE_KINDS:
        m = _SERVICE_RE.match(target.strip().lower())
        if not m or not 0 < int(m.group(2)) < 65536:
            raise ValueError(f"not a service like 'tcp/80': {target!r}")
        return f"{m.group(1)}/{int(m.group(2))}"
    return target.strip()


def exact_kill(finding: Finding) -> tuple[str, dict[str, Any]] | str:
    """A policy rule's kill: (pid, params naming exactly that process: its start time and
    cgroup, which the enforcer checks again on the pinned process, so a reused pid or a
    process that moved is never hit), or why there is nothing to kill."""
    ev = finding.evidence
    pid, start, cgroup = ev.get("pid"), ev.get("start_ticks"), ev.get("cgroup")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 1:
        return f"no process id in the evidence ({pid!r})"
    if isinstance(start, bool) or not isinstance(start, int) or not isinstance(cgroup, str):
        return f"process {pid} is not pinned (no start time or cgroup in the evidence)"
    uid = ev.get("uid")
    params = {"start_ticks": start, "cgroup": cgroup,
              **({"uid": uid} if isinstance(uid, int) and not isinstance(uid, bool) else {})}
    if "exe_location" in ev:        # an exec policy violation (a proc.exec event)
        if ev.get("exe_known") is not True or not isinstance(ev.get("exe_id"), str):
            return f"process {pid}: the kernel gave no executable (inode) to judge"
        # its forks run the same inode: killed with it (agent.enforce.process), those
        # started since its exec (not since its fork: another process may have started
        # in between) and of its uid
        params["exe_id"] = ev["exe_id"]
        if ev.get("target_location") is not None or ev.get("target_path") is not None:
            # a script or the loader's program: the executable is the interpreter's,
            # shared with the workload's other shells: no sweep by it
            params["sweep"] = False
        st_dev = ev.get("exe_st_dev")
        if isinstance(st_dev, int) and not isinstance(st_dev, bool):
            params["exe_st_dev"] = st_dev
        exec_ticks = ev.get("exec_ticks")
        if isinstance(exec_ticks, int) and not isinstance(exec_ticks, bool):
            params["since_ticks"] = max(start, exec_ticks)
    return str(pid), params


# A kill (authority's answer to an unprivileged actor) is done once; its record stays in
# force this long so that findings queued before the kill do not kill again, and a later
# process that reused the pid is judged afresh rather than taken for the killed one.
KILL_RECORD_S = 10.0
