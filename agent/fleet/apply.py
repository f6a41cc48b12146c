"""What a batch of fleet decisions does to the decisions in force: pure, no I/O, no clock.

Every message goes through, in order: the envelope and signature (Verifier.open: key,
signature, subject, form, lifetime cap, expiry), the scope (a canary decision for other
nodes is skipped, not refused), the agent's own prefix floor, the local allowlist (a block
overlapping loopback, this host's addresses, the management or mesh networks or any allow
set is refused: local allowlists always win), then per target the monotonic issued_at (a
decision older than the newest applied one is refused as stale: a replayed block cannot
undo a revocation). A block becomes an entry in force; a revoke is kept as an entry too,
until the block it lifted would have expired, so the stale check still has its time.

Each entry records the id of the key that signed it. A complete reload after a change of
the trusted keys (plan(..., snapshot=True)) lifts the blocks signed by a key no longer
trusted -- unless the reload brought the same decision, or a newer one, under a trusted
key -- and nothing else: a key only added lifts nothing, whatever the server omits.
Entries applied before keys were recorded (key '') are lifted by such a reload only when
a key trusted before is gone (or which were trusted is unknown) and the reload did not
vouch for them under a trusted key: the agent cannot tell whether the removed key signed
them, and a removed key is the operator's word against its decisions.
"""
from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from dataclasses import replace
from typing import Collection, Iterable, Mapping, Sequence

from agent.fleet.decision import Decision, DecisionError, Verifier

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# DecisionError sentences -> the reason a refusal is counted under (first match wins).
_REASONS = (("untrusted key", "untrusted_key"), ("bad signature", "bad_signature"),
            ("not JSON", "malformed"), ("envelope", "malformed"), ("bytes is over", "oversized"),
            ("over the cap", "lifetime_over_cap"), ("came on", "wrong_subject"),
            ("in the future", "issued_in_future"), ("expired", "expired"))
REASONS = ("untrusted_key", "bad_signature", "malformed", "oversized", "lifetime_over_cap",
           "wrong_subject", "issued_in_future", "expired", "too_wide", "allowlisted", "stale",
           "not_enforceable")


def reason_of(error: DecisionError) -> str:
    text = str(error)
    for needle, reason in _REASONS:
        if needle in text:
            return reason
    return "malformed"


@dataclass(frozen=True, slots=True)
class Message:
    """One stream message: its stream sequence, subject and body."""
    seq: int
    subject: str
    body: bytes


@dataclass(frozen=True, slots=True)
class Entry:
    """The latest decision applied for one target ("block": in force until expires_at)."""
    target: str
    id: str
    action: str
    issued_at: float
    expires_at: float
    seq: int
    applied_at: float
    reason: str = ""
    provenance: str = "{}"     # JSON text, as stored
    key: str = ""              # the id of the key that signed it ('': not recorded)

    @property
    def blocking(self) -> bool:
        return self.action == "block"


@dataclass(frozen=True, slots=True)
class Refusal:
    seq: int
    subject: str
    target: str
    reason: str
    detail: str


@dataclass
class Outcome:
    """What a batch changes: `upserts` (target -> new entry), `removed` (targets whose
    entry goes), `refusals`, and the stream sequence it brings the cursor to."""
    upserts: dict[str, Entry] = field(default_factory=dict)
    removed: set[str] = field(default_factory=set)
    refusals: list[Refusal] = field(default_factory=list)
    cursor: int = 0
    applied: int = 0
    skipped: int = 0           # out of scope, or already applied

    def blocks(self) -> dict[str, float]:
        """Targets to put (or keep) in force, with their expiry."""
        return {t: e.expires_at for t, e in self.upserts.items() if e.blocking}

    def lifts(self, before: Mapping[str, Entry]) -> set[str]:
        """Targets blocked before that are not blocked after."""
        gone = {t for t in self.removed if t in before and before[t].blocking}
        gone |= {t for t, e in self.upserts.items()
                 if not e.blocking and t in before and before[t].blocking}
        return gone


@dataclass(frozen=True)
class Checks:
    """The agent's side of every decision: keys, who it is, its floor and allowlist."""
    verifier: Verifier
    node_id: str
    allow: Sequence[Network] = ()
    max_prefix: Mapping[int, int] = field(default_factory=lambda: {4: 16, 6: 32})
    max_lifetime_s: float = 7 * 86400.0


def local_refusal(d: Decision, checks: Checks) -> str | None:
    """Why the agent's own limits refuse block `d` ("too_wide", "allowlisted"), or None."""
    net = ipaddress.ip_network(d.target)
    if net.prefixlen < checks.max_prefix[net.version]:
        return "too_wide"
    if any(net.version == a.version and net.overlaps(a) for a in checks.allow):  # type: ignore[arg-type]
        return "allowlisted"
    return None


def plan(entries: Mapping[str, Entry], messages: Iterable[Message], checks: Checks,
         now: float, *, snapshot: bool = False, cursor: int = 0,
         keys_before: Collection[str] | None = None) -> Outcome:
    """The outcome of applying `messages` (in stream order) on top of `entries`.
    `snapshot`: they end a complete reload after a change of trusted keys (`keys_before`:
    the key ids trusted until then, None: not known); see the module docstring."""
    out = Outcome(cursor=cursor)
    current = out.upserts         # looked up first, then `entries` (no copy of 100,000)
    for msg in messages:
        out.cursor = max(out.cursor, msg.seq)
        try:
            d, key = checks.verifier.open_signed(msg.body, msg.subject, now, checks.max_lifetime_s)
        except DecisionError as e:
            out.refusals.append(Refusal(msg.seq, msg.subject, "", reason_of(e), str(e)[:200]))
            continue
        except Exception as e:   # noqa: BLE001 -- a message nobody foresaw is refused, never
            # raised: an exception here would stop every agent at this sequence for ever
            out.refusals.append(Refusal(msg.seq, msg.subject, "", "malformed",
                                        f"cannot be read: {type(e).__name__}: {e}"[:200]))
            continue
        if not d.applies_to(checks.node_id):
            out.skipped += 1
            continue
        if d.action == "block" and (why := local_refusal(d, checks)):
            out.refusals.append(Refusal(msg.seq, msg.subject, d.target, why, _why(why, d)))
            continue
        cur = current.get(d.target) or entries.get(d.target)
        if cur is not None and cur.id == d.id:
            # the same decision under another key or at another sequence (a recreated
            # stream): record them, so the anti-entropy read knows it holds this message
            if cur.key != key or cur.seq != msg.seq:
                current[d.target] = replace(cur, key=key, seq=msg.seq)
            out.skipped += 1
            continue
        if cur is not None and d.issued_at <= cur.issued_at:
            out.refusals.append(Refusal(msg.seq, msg.subject, d.target, "stale",
                                        f"issued at {d.issued_at:.3f}, not after the applied "
                                        f"decision {cur.id} of {cur.issued_at:.3f}"))
            continue
        entry = Entry(d.target, d.id, d.action, float(d.issued_at), float(d.expires_at),
                      msg.seq, now, d.reason[:200],
                      json.dumps(d.provenance, sort_keys=True)[:2000], key)
        current[d.target] = entry
        out.applied += 1
    if snapshot:
        for target in untrusted({**entries, **current}, checks.verifier.keys, keys_before):
            out.upserts.pop(target, None)
            if target in entries:
                out.removed.add(target)
    return out


def untrusted(entries: Mapping[str, Entry], keys: Collection[str],
              keys_before: Collection[str] | None) -> list[str]:
    """The blocks a complete reload after a change of trusted keys lifts (the module
    docstring): signed by a key not in `keys`, or by no recorded key when one of
    `keys_before` is gone. Revokes stay to their expiry: a replayed block stays stale."""
    key_gone = keys_before is None or bool(set(keys_before) - set(keys))
    return [t for t, e in entries.items() if e.blocking
            and (e.key not in keys if e.key else key_gone)]


def _why(reason: str, d: Decision) -> str:
    if reason == "too_wide":
        return f"{d.target} is wider than this agent's floor"
    return f"{d.target} overlaps this node's allowlist (local allowlists always win)"


FORGET_AFTER_S = 7 * 86400.0   # an entry is forgotten this long after it ran out


def expired(entries: Mapping[str, Entry], now: float,
            margin_s: float = FORGET_AFTER_S) -> list[str]:
    """Targets whose entry ran out more than `margin_s` ago (its block expired in the
    kernel by itself). The margin is for the wall clock: a step forward (a bad NTP answer)
    must not delete blocks and revoke tombstones for good; the entries wait, and
    blocks(now) takes them back when the clock is right again."""
    return [t for t, e in entries.items() if e.expires_at + margin_s <= now]
