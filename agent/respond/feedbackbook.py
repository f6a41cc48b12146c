"""The feedback book: operators' false-positive verdicts as scoped exceptions, kept in the
store (agent.state.feedback) and in memory for the detector's hot path.

`check(finding)` runs in Agent.handle_findings before the responder: a finding a live
record matches (agent.detect.feedback) is counted (suppressed, per rule and per record)
and not handled. `from_incident` makes records from an incident marked a false positive:
one per rule of its findings, scoped by default to the most specific thing its findings
name (never the node unless asked), checked whole before anything is written.
`revert` stops one at once. Everything is in the store, so it survives restarts; the
memory copy is only the live records (reloaded after each change and on expiry).
"""
from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from typing import Any, Callable, Mapping

from agent.detect import feedback as match
from agent.model import FEEDBACK_ACTIONS, Feedback, Finding
from agent.state import feedback as stored
from agent.state.store import Store

log = logging.getLogger("swarm_agent")
RELOAD_S = 60.0    # live records are re-read at least this often (expiries)


class FeedbackBook:
    """See the module docstring. `learn(evidence, record_id)` is the anomaly engine's
    "learn as normal" hook and `unlearn(record_id)` its undoing when the record is reverted
    (None: no engine); `clock` gives wall seconds."""

    def __init__(self, store: Store, node: str, *, max_ttl_s: float,
                 learn: Callable[[Mapping[str, Any], str], None] | None = None,
                 unlearn: Callable[[str], Any] | None = None,
                 clock: Callable[[], float] = time.time):
        self._store, self.node, self.max_ttl_s = store, node, max_ttl_s
        self.learn, self.unlearn, self._clock = learn, unlearn, clock
        self.suppressed: Counter[str] = Counter()     # rule id@version -> findings kept back
        self._pending_hits: Counter[str] = Counter()  # record id -> hits not yet stored
        self._live: list[Feedback] = []
        self._loaded_at = 0.0
        self.reload()

    # -- the hot path ------------------------------------------------------------------

    def reload(self) -> None:
        self.flush()          # hits counted in memory first: the records are read back
        now = self._clock()
        self._live = stored.records(self._store, live_at=now)
        self._loaded_at = now

    def check(self, finding: Finding) -> Feedback | None:
        """The live record that keeps `finding` from the responder (counted), or None."""
        now = self._clock()
        if now - self._loaded_at > RELOAD_S or any(not r.live(now) for r in self._live):
            self.reload()
        if not self._live:
            return None
        rec = match.match(self._live, finding, self.node, now)
        if rec is None:
            return None
        self.suppressed[finding.rule] += 1
        if rec.hits == 0 and not self._pending_hits[rec.id]:
            # The first finding a "learn" record keeps back is taught to the model once.
            self._learn(rec, [finding.evidence])
        rec.hits += 1
        self._pending_hits[rec.id] += 1
        return rec

    def flush(self) -> None:
        """Store the hits counted since the last flush (housekeeping)."""
        hits, self._pending_hits = dict(self._pending_hits), Counter()
        stored.count_hits(self._store, hits)

    # -- operators' verdicts -------------------------------------------------------------

    def plan(self, incident_id: str, *, scope: str | None = None, learn: bool = False,
             ttl_s: float | None = None, force: bool = False, by: str = "",
             reason: str = "") -> list[Feedback]:
        """The records marking incident `incident_id` a false positive would create: one
        per rule of its findings. Raises ValueError with a sentence (nothing is written)."""
        per_rule = self._findings_by_rule(incident_id)
        if not per_rule:
            raise ValueError(f"incident {incident_id} has no findings to learn from")
        ttl = match.check_ttl(ttl_s, self.max_ttl_s)
        action = "learn" if learn else "suppress"
        assert action in FEEDBACK_ACTIONS
        now = self._clock()
        out = []
        for rule, (version, entity, evidences) in per_rule.items():
            scopes: dict[str, set[str]] = {}
            for ev in evidences:
                for kind, values in match.scopes_of(entity, ev, self.node,
                                                    defaults=scope is None).items():
                    scopes.setdefault(kind, set()).update(values)
            try:
                if scope is None:
                    kind, value = match.default_scope(scopes)
                else:
                    kind, value = match.check_scope(*match.parse_scope(scope), scopes,
                                                    self.node, force)
            except ValueError as e:
                # Several rules: say which one's findings the scope does not fit.
                raise ValueError(f"{rule}: {e}" if len(per_rule) > 1 else str(e)) from None
            out.append(Feedback(id=uuid.uuid4().hex, rule=rule, rule_version=version,
                                scope_kind=kind, scope_value=value, action=action,
                                created_at=now, expires_at=now + ttl, reason=reason, by=by,
                                incident_id=incident_id))
        return out

    def commit(self, records: list[Feedback]) -> None:
        """Store planned records (with their timeline lines) and use them from now on; a
        "learn" record also teaches the model its incident's findings once."""
        stored.add(self._store, records)
        for rec in records:
            log.info("feedback recorded", extra={"feedback": rec.id, "rule": rec.rule,
                                                 "scope": f"{rec.scope_kind}={rec.scope_value}",
                                                 "action": rec.action, "by": rec.by})
            if rec.action == "learn":
                self._learn(rec, self._findings_by_rule(rec.incident_id)
                            .get(rec.rule, (0, "", []))[2])
        self.reload()

    def revert(self, record_id: str, by: str, comment: str = "") -> Feedback:
        """Stop a record at once; a "learn" record's teaching is taken back (what it made
        known is news again). KeyError: unknown id; ValueError: already reverted."""
        done = stored.revert(self._store, record_id, by, self._clock(), comment)
        log.info("feedback reverted", extra={"feedback": record_id, "by": by})
        if done.action == "learn" and self.unlearn is not None:
            try:
                undone = self.unlearn(record_id)
                log.info("feedback's learning taken back",
                         extra={"feedback": record_id, "undone": undone})
            except Exception:   # noqa: BLE001 -- the revert itself stands
                log.exception("anomaly model could not unlearn", extra={"feedback": record_id})
        self.reload()
        return done

    def records(self, include_all: bool = False, limit: int = 1000,
                incident_id: str | None = None) -> list[Feedback]:
        """Live records (`include_all`: reverted and expired too), newest first."""
        self.flush()
        return stored.records(self._store, live_at=None if include_all else self._clock(),
                              incident_id=incident_id, limit=limit)

    def record(self, record_id: str) -> Feedback | None:
        return stored.record(self._store, record_id)

    def counts(self) -> dict[str, dict[str, int]]:
        """Per rule ("id@version"): false_positives (incidents so marked, from the store)
        and suppressed (findings kept back since start)."""
        out: dict[str, dict[str, int]] = {}
        for rule, n in stored.false_positives_by_rule(self._store).items():
            out.setdefault(rule, {"false_positives": 0, "suppressed": 0})["false_positives"] = n
        for rule, n in list(self.suppressed.items()):   # also read by the metrics thread
            out.setdefault(rule, {"false_positives": 0, "suppressed": 0})["suppressed"] = n
        return out

    def status(self) -> dict[str, Any]:
        now = self._clock()
        return {"live": sum(r.live(now) for r in self._live), "rules": self.counts()}

    # -- helpers ---------------------------------------------------------------------

    def _findings_by_rule(self, incident_id: str) -> dict[str, tuple[int, str, list]]:
        """rule id -> (its highest version, the incident's entity, evidences) from the
        incident's finding lines (first and last evidence of each)."""
        incident = self._store.incident(incident_id)
        if incident is None:
            return {}
        out: dict[str, tuple[int, str, list]] = {}
        for ev in self._store.incident_events(incident_id):
            if ev.kind != "finding" or "rule" not in ev.data:
                continue
            rule_id, _, version = str(ev.data["rule"]).rpartition("@")
            if not rule_id:
                continue
            evidences = [e for e in (ev.data.get("evidence"), ev.data.get("last_evidence"))
                         if isinstance(e, dict)]
            old = out.get(rule_id, (0, incident.entity, []))
            out[rule_id] = (max(old[0], int(version) if version.isdigit() else 0),
                            incident.entity, old[2] + evidences)
        return out

    def _learn(self, rec: Feedback, evidences: list) -> None:
        if rec.action != "learn" or self.learn is None:
            return
        for evidence in evidences:
            try:
                self.learn(evidence, rec.id)
            except Exception:   # noqa: BLE001 -- the model refusing must not lose the verdict
                log.exception("anomaly model could not learn from feedback",
                              extra={"feedback": rec.id})
