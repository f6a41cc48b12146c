"""The responder: findings -> incidents -> mitigations put in force through an enforcer.

Automatic and manual mitigations go through the same path (`_put_in_force`), so a block
from the control API and one from the detector are recorded and enforced alike.

One finding is one transaction (Store.batch) in two steps: its incident, mitigation,
timeline and outbox rows are committed together before the host change (a commit point:
written to the WAL, not fsync'd: the store syncs on a thread, agent.state.batch), and what
the change did (applied or failed, mitigated at) is committed after it. Observers hear of
them only once committed. What a crash leaves at each point:
- before the first commit: nothing in the kernel, nothing recorded; the kernel signals the
  next window of a continuing attack again.
- after it, before or during the host change: the row, in force; the next start's
  reconcile puts it on the host (any kind: a service isolation or a peer quarantine
  cannot be read back from the host, so the row must come first).
- after the host change, before the second commit: the row and the change; the
  incident's timeline lacks its "applied" line.
- committed, not yet synced: an agent crash keeps the rows (the WAL is in the page
  cache); a power loss or kernel crash loses them and the nft table alike.
The start never adopts what the kernel table holds beyond the database's rows (only a
database started afresh is seeded from it): an element nobody recorded is lifted.
"""
from __future__ import annotations

import contextlib
import enum
import ipaddress
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Mapping, Sequence

from agent.config import Config
from agent.detect.rules import Rule, load_rules
from agent.enforce.base import AllowlistedError, EnforceError, Enforcer, PartiallyApplied
from agent.model import (Finding, Incident, IncidentState, Mitigation, MitigationKind,
                         MitigationState, mono_to_wall, verdict)
from agent.respond import authority, policy, proposal
from agent.state import fleet as fleetstate
from agent.state.store import Store

ALLOWLISTED_NOTE = "allowlisted: reported, never blocked"
# An observer gets ("incident", Incident) or ("mitigation", Mitigation) after each change.
Observer = Callable[[str, Any], None]
log = logging.getLogger("swarm_agent")


class Outcome(enum.Enum):
    APPLIED = "applied"
    DRY_RUN = "dry_run"
    ALLOWLISTED = "allowlisted"
    FAILED = "failed"
    PARTIAL = "partial"        # part in force (kept active), part refused: escalated


@dataclass(frozen=True)
class Plan:
    """What to do for one finding: the finding as recorded (the distributed switch files
    it under the service), and the mitigation kind and target (None: report only)."""

    finding: Finding
    kind: MitigationKind | None
    target: str | None
    note: str = ""
    escalate: bool = False             # a human must look (authority narrowed a breach)
    params: Mapping[str, Any] = field(default_factory=dict)
    why: str = ""                      # with escalate: the escalation's reason (else note)


class Responder:
    """Turns findings into incidents and mitigations.

    Contract: `handle` never raises on enforcement failure — an allowlisted target is
    noted and never mitigated, an EnforceError leaves a FAILED mitigation and an
    escalated incident. Every mitigation it creates expires; repeat offenders get longer
    lifetimes; in dry-run mode mitigations are recorded as DRY_RUN and the enforcer is
    never asked to apply or lift. `clock` gives wall seconds; `to_wall` converts the
    findings' monotonic times (injectable so tests control both clocks).
    """

    def __init__(self, cfg: Config, store: Store, enforcer: Enforcer,
                 clock: Callable[[], float] = time.time, *,
                 rules: Sequence[Rule] | None = None,
                 to_wall: Callable[[int], float] = mono_to_wall):
        self._cfg = cfg
        self._store = store
        self._enforcer = enforcer
        self._clock = clock
        self._to_wall = to_wall
        self._allow = cfg.allowlist.networks()
        if cfg.dry_run and not enforcer.dry_run:
            raise ValueError("dry run needs the enforcer in dry-run mode")
        self.set_rules(load_rules(cfg.rule_paths) if rules is None else rules)
        # Called on the caller's thread after every recorded change (the control server's
        # watch stream, the mesh reporter); an observer must be quick and must not raise.
        self.observers: list[Observer] = []
        self._deferred: list[tuple[str, Any]] | None = None   # notices held until commit

    def notify(self, kind: str, obj: Any) -> None:
        """Tell every observer about a change (also for callers that recorded one); while
        a finding's transaction is open, once it is committed."""
        if self._deferred is not None:
            self._deferred.append((kind, obj))
            return
        for observer in list(self.observers):
            try:
                observer(kind, obj)
            except Exception:  # one broken observer must not stop the response
                log.exception("responder observer failed", extra={"observer": repr(observer)})

    def set_rules(self, rules: Sequence[Rule]) -> None:
        """Use these rules' ttl_s from now on (after a rules reload)."""
        self._ttl_by_rule = {r.name: r.ttl_s for r in rules}
        self._proposable = {r.name for r in rules if r.unforgeable}

    # -- findings ----------------------------------------------------------------------

    def handle(self, finding: Finding) -> Incident:
        """Record `finding` in its incident, mitigate per its rule, return the incident:
        one transaction, committed in two steps around the host change (module docstring)."""
        with self._committed_notices(), self._store.batch():
            return self._handle(finding)

    @contextlib.contextmanager
    def _committed_notices(self) -> Iterator[None]:
        """Hold notify() until the block ends. Notices come only after the commit point
        (a mitigation once its row is committed, the incident at the end), so what they
        announce is on record even when the second step fails."""
        if self._deferred is not None:
            yield
            return
        self._deferred = []
        try:
            yield
        finally:
            held, self._deferred = self._deferred, None
            for kind, obj in held:
                self.notify(kind, obj)

    def _handle(self, finding: Finding) -> Incident:
        """Record `finding` in its incident, mitigate per its rule, return the incident."""
        now = self._clock()
        plan = self._plan(finding, now)
        incident = self._store.record_finding(plan.finding,
                                              self._to_wall(finding.first_mono_ns),
                                              self._to_wall(finding.decision_mono_ns))
        if plan.note:
            self._store.add_incident_event(incident.id, "note", plan.note, now)
        if plan.kind is not None and plan.target is not None:
            existing = self._in_force(plan.kind, plan.target, now)
            if existing is not None:
                if plan.kind is not MitigationKind.KILL_PROCESS:   # a kill is never renewed
                    self._keep(existing, plan, incident, now)
            else:
                self._mitigate(plan, incident, now)
        if plan.kind in policy.ISOLATION_KINDS:
            self._escalate(incident.id, f"{plan.kind.value} {plan.target}")
        elif plan.escalate:
            self._escalate(incident.id, "", plan.why or plan.note or finding.rule)
        if finding.action == policy.INVESTIGATE:
            # The response the Suspicious Activity row asks for is the investigation: its
            # deadline is met (mitigated_at: time to investigation) when it opens.
            self._mark_mitigated(incident, now)
        incident = self._store.incident(incident.id) or incident
        self.notify("incident", incident)
        return incident

    def _plan(self, finding: Finding, now: float) -> Plan:
        if finding.action == policy.INVESTIGATE:
            # Suspicious activity (the anomaly models): a human decides, nothing is
            # mitigated automatically; the incident is escalated once, when it opens.
            return Plan(finding, None, None, escalate=True,
                        why=f"{policy.INVESTIGATION_OPENED} ({finding.rule})")
        kind = policy.ACTION_KINDS.get(finding.action)
        if kind is None:
            return Plan(finding, None, None, f"{finding.rule}: action {finding.action}, "
                                             "reported only")
        if kind is MitigationKind.KILL_PROCESS:      # a policy rule's kill: that process
            exact = policy.exact_kill(finding)
            if isinstance(exact, str):
                return Plan(finding, None, None, f"{finding.rule}: {exact}, reported only")
            return Plan(finding, kind, exact[0], f"{finding.rule}: killing process {exact[0]}",
                        params=exact[1])
        if (answer := authority.narrow(finding, kind)) is not None:
            return Plan(answer.finding, answer.kind, answer.target, answer.note,
                        escalate=True, params=answer.params)
        target = policy.target_of(finding.entity)
        if kind in policy.SOURCE_KINDS and (why := policy.unblockable(target)):
            return Plan(finding, None, None, f"{finding.rule}: {target} {why}, reported only")
        if kind in policy.SOURCE_KINDS and kind not in policy.CHALLENGE_KINDS \
                and (peer := self._peer_of(target)):
            # Blocking a tunnel address leaves the peer connected; quarantine the peer. Not
            # on forgeable evidence: packets outside the tunnel can carry a tunnel address,
            # and quarantining the peer on them would hand its connection to the forger.
            return Plan(finding, MitigationKind.REMOVE_PEER, peer,
                        f"{finding.rule}: {target} is WireGuard peer {peer}: quarantining it")
        if kind in policy.SOURCE_KINDS and self._in_force(kind, target, now) is None \
                and self._over_source_bound(finding.rule, now):
            return self._distributed(finding, target, kind)
        return Plan(finding, kind, target)

    def _peer_of(self, target: str) -> str | None:
        """"IFNAME:KEY" of the WireGuard peer whose tunnel address `target` is, or None."""
        return None if "/" in target else self._enforcer.peer_for_address(target)

    def _over_source_bound(self, rule: str, now: float) -> bool:
        since = now - policy.DISTRIBUTED_WINDOW_S
        count = self._store.sources_mitigated_by_rule(rule, since)
        return count >= self._cfg.mitigation.max_sources_per_rule

    def _distributed(self, finding: Finding, source: str, kind: MitigationKind) -> Plan:
        """Past the per-rule source bound the attack is treated as distributed and the
        response moves to the service, so a spoofed flood cannot grow the sets (or the
        incident table) without bound: a challenge of the service for forgeable evidence
        (its real clients pass the SYN proxy, or their own per-source limit), a service
        rate limit only for verified sources."""
        bound = self._cfg.mitigation.max_sources_per_rule
        why = (f"distributed: {finding.rule} mitigated {bound} sources within "
               f"{policy.DISTRIBUTED_WINDOW_S:.0f} s")
        service = policy.service_of(finding)
        if service is None:
            return Plan(finding, None, None, f"{why}; no service port in the evidence, "
                                             f"{source} reported only")
        filed = replace(finding, entity=f"service:{service}",
                        evidence={**finding.evidence, "source": source})
        if kind is MitigationKind.CHALLENGE:
            return Plan(filed, MitigationKind.CHALLENGE_SERVICE, service,
                        f"{why}; challenging {service} instead of {source}")
        return Plan(filed, MitigationKind.RATE_LIMIT_SERVICE, service,
                    f"{why}; rate-limiting {service} instead of {source}")

    def _mitigate(self, plan: Plan, incident: Incident, now: float) -> None:
        assert plan.kind is not None and plan.target is not None
        if plan.kind in policy.ISOLATION_KINDS:
            ttl_s = self._cfg.mitigation.isolation_ttl_s     # None: until released
        elif plan.kind is MitigationKind.KILL_PROCESS:
            ttl_s = policy.KILL_RECORD_S
        else:
            ttl_s = self._lifetime_s(plan.finding.rule, plan.target, now, None, plan.kind)
        m = Mitigation(kind=plan.kind, target=plan.target, created_at=now,
                       expires_at=None if ttl_s is None else now + ttl_s,
                       incident_id=incident.id,
                       params={**policy.params_for(plan.kind, self._cfg), **plan.params,
                               "ttl_s": ttl_s},
                       reason=_verdict(plan.kind, f"{plan.finding.rule} on {plan.finding.entity}"))
        outcome, error = self._put_in_force(m, now, rule=plan.finding.rule)
        if outcome is Outcome.APPLIED:
            self._propose(m, now, finding=plan.finding)
        self._record_outcome(incident, m, outcome, error,
                             signal_at=self._to_wall(plan.finding.detected_mono_ns))

    def _record_outcome(self, incident: Incident, m: Mitigation, outcome: Outcome,
                        error: EnforceError | None, signal_at: float | None = None) -> None:
        at = self._clock()
        if outcome is not Outcome.ALLOWLISTED:
            self.notify("mitigation", m)
        what = f"{m.kind.value} {m.target}"
        data = {"mitigation_id": m.id, "kind": m.kind.value, "target": m.target,
                "ttl_s": m.params.get("ttl_s")}
        if signal_at is not None:
            # When the evidence reached the agent (the kernel's event time): with the
            # applied time, what bench/mixed_load.py reports as signal to enforced.
            data["signal_at"] = signal_at
        if outcome is Outcome.APPLIED:
            self._store.add_incident_event(incident.id, "mitigation_applied",
                                           f"{_verdict(m.kind, what)} {_lifetime(m)}", at, data)
            self._mark_mitigated(incident, at)
        elif outcome is Outcome.DRY_RUN:
            self._store.add_incident_event(incident.id, "mitigation_dry_run",
                                           f"dry run: would apply {_verdict(m.kind, what)}", at,
                                           data)
        elif outcome is Outcome.ALLOWLISTED:
            self._store.add_incident_event(incident.id, "note", ALLOWLISTED_NOTE, at, data)
        elif outcome is Outcome.PARTIAL and isinstance(error, PartiallyApplied):
            self._store.add_incident_event(
                incident.id, "mitigation_partial", f"{what} partly applied: {error}", at,
                {**data, "in_force": error.in_force, "refused": error.refused})
            self._mark_mitigated(incident, at)
            self._store.set_incident_state(
                incident.id, IncidentState.ESCALATED, at,
                f"escalated: {what} only partly applied; refused: {'; '.join(error.refused)}")
        else:
            text = (f"dry run: {what} would fail: {error}" if self._cfg.dry_run
                    else f"{what} failed: {error}")
            self._store.add_incident_event(incident.id, "mitigation_failed", text, at,
                                           {**data, "error": str(error)})
            self._store.set_incident_state(incident.id, IncidentState.ESCALATED, at,
                                           f"escalated: {what} could not be applied")

    def _escalate(self, incident_id: str, what: str, why: str = "") -> None:
        """Isolations and quarantines always need a human, and so does a breach narrowed
        by authority (`why`): escalate a live incident."""
        i = self._store.incident(incident_id)
        if i is not None and i.state in (IncidentState.OPEN, IncidentState.MITIGATED):
            text = (f"escalated: {why}" if why else
                    f"escalated: {what} needs a human to look and release it")
            self._store.set_incident_state(i.id, IncidentState.ESCALATED, self._clock(), text)

    def _mark_mitigated(self, incident: Incident, mitigated_at: float) -> None:
        # The deadline runs from the first evidence (kernel window start) to the action
        # being in force; only the first mitigation of an incident counts.
        if incident.mitigated_at is not None:
            return
        latency_s = mitigated_at - incident.first_seen_at
        missed = latency_s > incident.event_class.deadline_s
        self._store.mark_mitigated(incident.id, mitigated_at, missed)
        incident.mitigated_at = mitigated_at

    def _keep(self, m: Mitigation, plan: Plan, incident: Incident, now: float) -> None:
        """A mitigation of the same kind is already in force: renew it when less than
        half its lifetime remains, otherwise leave it as it is."""
        if m.state is MitigationState.ACTIVE:
            self._mark_mitigated(incident, now)
        if m.expires_at is None:
            return
        lifetime_s = float(m.params.get("ttl_s") or (m.expires_at - m.created_at))
        if m.expires_at - now >= lifetime_s / 2:
            return
        ttl_s = (self._cfg.mitigation.isolation_ttl_s if m.kind in policy.ISOLATION_KINDS
                 else None) or self._lifetime_s(plan.finding.rule, m.target, now, m.created_at,
                                                m.kind)
        renewed = replace(m, expires_at=now + ttl_s, params={**m.params, "ttl_s": ttl_s})
        if renewed.state is MitigationState.ACTIVE:
            try:
                self._enforcer.apply(renewed, now)
            except PartiallyApplied as e:
                renewed.params = {**renewed.params,
                                  "partial": {"in_force": e.in_force, "refused": e.refused}}
            except EnforceError as e:
                self._store.add_incident_event(
                    incident.id, "mitigation_failed",
                    f"renewal of {m.kind.value} {m.target} failed: {e}", now,
                    {"mitigation_id": m.id, "error": str(e)})
                return
        self._store.set_mitigation_expiry(m.id, renewed.expires_at, now, renewed.params)
        self._store.add_incident_event(
            incident.id, "mitigation_renewed",
            f"{m.kind.value} {m.target} renewed for {ttl_s:.0f} s", now,
            {"mitigation_id": m.id, "ttl_s": ttl_s, "expires_at": renewed.expires_at})
        self.notify("mitigation", renewed)

    def _lifetime_s(self, rule: str, target: str, now: float, until: float | None,
                    kind: MitigationKind) -> float:
        """The rule's ttl (or the default), grown for each earlier mitigation of the target
        within repeat_window_s (created before `until` when renewing), capped."""
        pol = self._cfg.mitigation
        base_s = self._ttl_by_rule.get(rule) or pol.default_ttl_s
        # A challenge proves nothing against its target: only earlier challenges lengthen a
        # challenge, and they never count as offences towards a block.
        kinds = policy.CHALLENGE_KINDS if kind in policy.CHALLENGE_KINDS else [
            k for k in MitigationKind if k not in policy.CHALLENGE_KINDS]
        prior = self._store.prior_mitigations(target, now - pol.repeat_window_s, until, kinds)
        return policy.lifetime_s(base_s, prior, pol)

    # -- the shared path ---------------------------------------------------------------

    def _put_in_force(self, m: Mitigation, now: float,
                      rule: str | None) -> tuple[Outcome, EnforceError | None]:
        """Record and apply one new mitigation. The row is committed before the host is
        changed (inside a finding's transaction: with the incident, at a commit point,
        unsynced, so the host change never waits for an fsync), so a crash in between is
        repaired by reconcile at the next start rather than forgotten; whatever kind it
        is (a service isolation or a peer quarantine cannot be read back from the host)."""
        if self._is_allowlisted(m.target):
            return Outcome.ALLOWLISTED, None
        # In dry run the enforcer runs every check the live one does and stops before the
        # host change, so the plan meets the same refusals (agent.enforce.composite).
        dry = self._cfg.dry_run
        m.state = MitigationState.DRY_RUN if dry else MitigationState.ACTIVE
        self._store.add_mitigation(m, rule=rule)
        self._store.commit_point()
        try:
            self._enforcer.apply(m, now)
        except PartiallyApplied as e:
            # What is in force stays so: the row stays active (reconcile keeps it), and
            # its parameters say what is in force and what was refused (the status).
            self._note_partial(m, e, now)
            return Outcome.PARTIAL, e
        except AllowlistedError:
            self._store.set_mitigation_state(m.id, MitigationState.FAILED, now)
            m.state = MitigationState.FAILED
            return Outcome.ALLOWLISTED, None
        except EnforceError as e:
            self._store.set_mitigation_state(m.id, MitigationState.FAILED, now)
            m.state = MitigationState.FAILED
            return Outcome.FAILED, e
        return (Outcome.DRY_RUN if dry else Outcome.APPLIED), None

    def _propose(self, m: Mitigation, now: float, finding: Finding | None = None,
                 operator: str = "") -> None:
        """A block this agent put in force (an operator's, or a rule's whose every
        condition rests on unforgeable evidence) becomes a proposal to the fleet, queued in
        the outbox in the block's own transaction. A rule that blocks on forgeable evidence
        (an operator's own `action: block` on net.source SYN rates) stays this node's
        choice: spread, spoofed packets would block their victim on every node. Never in
        dry run, never for anything but block_ip (a fleet decision is no mitigation row
        here: it is never proposed back)."""
        if m.kind is not MitigationKind.BLOCK_IP or self._cfg.dry_run \
                or not self._cfg.fleet.proposing(self._cfg.mesh.endpoint):
            return
        if finding is not None and finding.rule not in self._proposable:
            return
        body = proposal.body(m, now, finding, operator)
        if body is not None:
            fleetstate.queue_proposal(self._store, body, now)

    def _note_partial(self, m: Mitigation, e: PartiallyApplied, now: float) -> None:
        m.params = {**m.params, "partial": {"in_force": e.in_force, "refused": e.refused}}
        self._store.set_mitigation_expiry(m.id, m.expires_at, now, m.params)
        log.warning("mitigation partly applied", extra={
            "kind": m.kind.value, "target": m.target, "in_force": e.in_force,
            "refused": e.refused})

    def record_tampering(self, notes: Sequence[tuple[str, str]]) -> None:
        """Reconcile found a mitigation undone by somebody (a tenant thawing its delegated
        cgroup, continuing or moving its processes) and put it back: note it in the
        mitigation's incident and escalate it."""
        now = self._clock()
        for mitigation_id, text in notes:
            m = self._store.mitigation(mitigation_id)
            if m is None or not m.incident_id:
                log.warning("mitigation tampered with", extra={"mitigation": mitigation_id,
                                                               "note": text})
                continue
            self._store.add_incident_event(m.incident_id, "mitigation_tampered", text, now,
                                           {"mitigation_id": m.id, "kind": m.kind.value,
                                            "target": m.target})
            self._escalate(m.incident_id, "", f"{m.kind.value} {m.target}: {text}")
            if (incident := self._store.incident(m.incident_id)) is not None:
                self.notify("incident", incident)

    def _is_allowlisted(self, target: str) -> bool:
        if self._enforcer.is_allowlisted(target):
            return True
        if target.isdigit():
            return False     # a pid (kill_process), which ip_network would read as an address
        try:
            net = ipaddress.ip_network(target, strict=False)
        except ValueError:
            return False     # a service or peer, not an address
        return any(net.version == a.version and net.subnet_of(a) for a in self._allow)

    def _in_force(self, kind: MitigationKind, target: str, now: float) -> Mitigation | None:
        state = MitigationState.DRY_RUN if self._cfg.dry_run else MitigationState.ACTIVE
        found = self._store.mitigations(state=state, kind=kind, target=target, live_at=now,
                                        limit=1)
        return found[0] if found else None

    # -- lifetimes and manual control --------------------------------------------------

    def expire(self, now: float | None = None) -> list[Mitigation]:
        """Lift and mark EXPIRED every mitigation whose lifetime has run out by `now`.
        A failed lift is noted, not raised: the kernel element carries its own timeout."""
        now = self._clock() if now is None else now
        states = (MitigationState.ACTIVE, MitigationState.DRY_RUN)
        expired = self._store.mitigations(state=states, expired_by=now)
        for m in expired:
            text = f"{m.kind.value} {m.target} expired"
            if m.state is MitigationState.ACTIVE:
                try:
                    self._enforcer.lift(m)
                except EnforceError as e:
                    text += f" (lift failed: {e}; the kernel timeout removes it)"
            self._store.set_mitigation_state(m.id, MitigationState.EXPIRED, now)
            m.state = MitigationState.EXPIRED
            self.notify("mitigation", m)
            if m.incident_id:
                self._store.add_incident_event(m.incident_id, "mitigation_expired", text, now,
                                               {"mitigation_id": m.id})
        return expired

    def desired(self, now: float | None = None) -> list[Mitigation]:
        """What should be in force on the host at `now` (for enforcer setup/reconcile)."""
        return self._store.active_mitigations(self._clock() if now is None else now)

    def apply_manual(self, kind: MitigationKind | str, target: str, ttl_s: float | None,
                     reason: str, operator: str = "") -> Mitigation:
        """An operator's mitigation (ttl_s None: until lifted). Raises ValueError for a bad
        kind or target, AllowlistedError for an allowlisted target, EnforceError when the
        host change failed (the FAILED mitigation is recorded)."""
        kind = MitigationKind(kind)
        target = policy.check_target(kind, target)
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError("ttl_s must be greater than 0")
        now = self._clock()
        expires_at = None if ttl_s is None else now + ttl_s
        existing = self._in_force(kind, target, now)
        if existing is not None:
            return self._extend_manual(existing, expires_at, ttl_s, now)
        m = Mitigation(kind=kind, target=target, created_at=now, expires_at=expires_at,
                       params={**policy.params_for(kind, self._cfg), "ttl_s": ttl_s},
                       reason=reason or "manual")
        outcome, error = self._put_in_force(m, now, rule=None)
        if outcome is Outcome.ALLOWLISTED:
            raise AllowlistedError(f"{target} is allowlisted: it is never blocked")
        if outcome is Outcome.APPLIED:
            self._propose(m, now, operator=operator or reason or "operator")
        self.notify("mitigation", m)
        if error is not None and outcome is not Outcome.PARTIAL:
            raise error
        return m        # partly applied: m.params["partial"] says what is in force

    def _extend_manual(self, m: Mitigation, expires_at: float | None, ttl_s: float | None,
                       now: float) -> Mitigation:
        renewed = replace(m, expires_at=expires_at, params={**m.params, "ttl_s": ttl_s})
        if renewed.state is MitigationState.ACTIVE:
            try:
                self._enforcer.apply(renewed, now)
            except PartiallyApplied as e:
                renewed.params = {**renewed.params,
                                  "partial": {"in_force": e.in_force, "refused": e.refused}}
        self._store.set_mitigation_expiry(m.id, expires_at, now, renewed.params)
        self.notify("mitigation", renewed)
        return renewed

    def lift(self, mitigation_id: str) -> Mitigation:
        """Remove a mitigation now and mark it LIFTED; one no longer in force is returned
        unchanged. Raises KeyError for an unknown id, EnforceError if the host refused."""
        m = self._store.mitigation(mitigation_id)
        if m is None:
            raise KeyError(f"no mitigation {mitigation_id}")
        if m.state not in (MitigationState.ACTIVE, MitigationState.DRY_RUN):
            return m
        if m.state is MitigationState.ACTIVE:
            self._enforcer.lift(m)
        now = self._clock()
        self._store.set_mitigation_state(m.id, MitigationState.LIFTED, now)
        self._store.commit_point()      # degraded storage: kept in the spill before answering
        m.state = MitigationState.LIFTED
        if m.incident_id:
            self._store.add_incident_event(m.incident_id, "mitigation_lifted",
                                           f"{m.kind.value} {m.target} lifted", now,
                                           {"mitigation_id": m.id})
        self.notify("mitigation", m)
        return m

    def set_incident_state(self, incident_id: str, state: IncidentState,
                           note: str = "") -> Incident:
        """An operator's verdict (resolved, false_positive, ...) on an incident, noted in
        its timeline. Raises KeyError for an unknown id."""
        if self._store.incident(incident_id) is None:
            raise KeyError(f"no incident {incident_id}")
        self._store.set_incident_state(incident_id, state, self._clock(), note)
        incident = self._store.incident(incident_id)
        assert incident is not None
        self.notify("incident", incident)
        return incident


def _verdict(kind: MitigationKind, text: str) -> str:
    """`text` prefixed with what an address or service mitigation means to an operator
    ("unverified source: challenged: ..." or "blocked: ...")."""
    if kind in (*policy.SOURCE_KINDS, *policy.SERVICE_KINDS):
        return f"{verdict(kind)}: {text}"
    return text


def _lifetime(m: Mitigation) -> str:
    ttl_s = m.params.get("ttl_s")
    return "until released" if ttl_s is None else f"for {ttl_s:.0f} s"
