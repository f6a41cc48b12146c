"""When the mesh's clock was wrong, and what an operator's revoke leaves in force.

Agents refuse a decision issued more than AGENT_FUTURE_S past their clock
(agent/fleet/decision.py) and one not newer than the decision they applied for its target
(agent/fleet/apply.py plan). So the decider never dates a decision more than
FUTURE_MARGIN_S past its clock, and:

- a target's latest decision dated more than AGENT_FUTURE_S past the mesh's clock was
  issued while that clock was ahead (an NTP step): every agent with a right clock refused
  it, and it would fire late on whoever holds the target then. It is retired (state
  "failed", a refusal says why) and re-issued now with its own lifetime (`reissued`); its
  stream message is replaced by the new one on the same subject;
- one dated between FUTURE_MARGIN_S and AGENT_FUTURE_S ahead may have been applied by
  agents, which would take only a newer one: nothing is issued for the target until the
  clock catches up (`too_far_ahead` says how long).

An operator's revoke of X lifts X's own block; a block of a network covering X still drops
X's traffic. `covering` names those, so the operator is told (and can revoke them too).
"""
from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any, Iterable

from agent.fleet.decision import MAX_LIFETIME_S, Decision

AGENT_FUTURE_S = 300.0     # agents refuse a decision issued further ahead of their clock
FUTURE_MARGIN_S = 120.0    # the decider never dates a decision further past its clock
#   (a step back of up to this much still lets a revoke follow its block at once; agents
#   whose clock lags the mesh by up to AGENT_FUTURE_S - FUTURE_MARGIN_S still take it)


def too_far_ahead(latest: dict[str, Any] | None, d: Decision) -> str:
    """Why `d` (issued now) cannot be issued just after its target's `latest` without
    being dated more than FUTURE_MARGIN_S ahead; "" when it can."""
    if latest is None:
        return ""
    ahead = float(latest["issued_at"]) - d.issued_at
    if ahead + 0.001 <= FUTURE_MARGIN_S:
        return ""
    return (f"{d.target}'s latest decision {latest['id']} is dated {ahead:.0f} s ahead of the "
            "mesh's clock (was the clock stepped?): agents that applied it take only a newer "
            f"one, and no decision is dated more than {FUTURE_MARGIN_S:.0f} s ahead; try again "
            f"in {ahead - FUTURE_MARGIN_S + 1:.0f} s")


def reissued(row: dict[str, Any], now: float, outlive: float = 0.0) -> Decision:
    """The decision stored as `row` (dated in the future), issued again at `now` with its
    own lifetime; a revoke also outlives `outlive` (the target's blocks' latest expiry)."""
    lifetime = max(1.0, float(row["expires_at"]) - float(row["issued_at"]))
    expires = now + lifetime
    if row["action"] == "revoke":
        expires = min(max(expires, outlive), now + MAX_LIFETIME_S)
    fields = {k: row[k] for k in ("action", "target", "reason", "scope", "revokes", "v")
              if k in row}
    return Decision(**fields, issued_at=now, expires_at=expires,
                    provenance={**(row.get("provenance") or {}), "reissued_from": row["id"]})


def ahead_reason(row: dict[str, Any], now: float) -> str:
    return (f"decision {row['id']} for {row['target']} was issued "
            f"{float(row['issued_at']) - now:.0f} s ahead of the mesh's clock (was the clock "
            "stepped?): every agent refused it; retired and re-issued now")


def covering(target: str, blocks: Iterable[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
    """The blocks in `blocks` (current decisions) of networks strictly covering `target`:
    they still drop its traffic after its own block is revoked."""
    try:
        net = ipaddress.ip_network(target)
    except ValueError:
        return ()
    out = []
    for b in blocks:
        try:
            bnet = ipaddress.ip_network(b["target"])
        except (KeyError, ValueError, TypeError):
            continue
        if b.get("action") == "block" and bnet.version == net.version and bnet != net \
                and net.subnet_of(bnet):
            out.append({"target": b["target"], "id": b["id"],
                        "expires_at": float(b["expires_at"])})
    return tuple(sorted(out, key=lambda b: ipaddress.ip_network(b["target"]).prefixlen))


def covering_note(target: str, blocks: tuple[dict[str, Any], ...]) -> str:
    """One clause telling the operator which covering blocks still drop `target`."""
    if not blocks:
        return ""
    names = ", ".join(f"{b['target']} (until {b['expires_at']:.0f})" for b in blocks)
    return (f"{target} is still blocked by the covering block(s) {names}: revoke "
            f"{'it' if len(blocks) == 1 else 'them'} too to release {target}")


def with_covering(outcome: Any, target: str, blocks: tuple[dict[str, Any], ...]) -> Any:
    """`outcome` (a policy Outcome) naming the covering blocks in its reason and field."""
    note = covering_note(target, blocks)
    if not note:
        return outcome
    return dataclasses.replace(outcome, reason=f"{outcome.reason}; {note}", covering=blocks)
