"""The agent process: one asyncio loop whose TaskGroup owns the probe, the drift watcher,
housekeeping and the control server. Data flows sources -> detect -> respond -> enforce.

Ready (the control API's status and health say so; sd_notify READY=1) only after the
table is reconciled with the database, the probes are attached and the control socket
listens. Control calls run on the same loop thread as the detector, so every host change
is serialised. The first SIGTERM/SIGINT stops gracefully;
a second exits at once. Mitigations stay in the kernel across a restart (they carry their
own timeouts) and are re-asserted from the database on the next start.

Storage never stops the agent (agent.state.backing): a full or failing disk keeps the
state in memory (an escalated agent_health incident, `storage` in status, metrics) until
`watch_storage` can write it back; a fresh database (first start, or a corrupt one moved
aside) is seeded from what the kernel table holds in force before setup() asserts it.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from agent import anomalystate, bundles, egresswatch
from agent.agentview import AgentView
from agent.anomalyhost import AnomalyHost
from agent.probehost import ProbeHost
from agent.bundles import BundleManager
from agent.config import Config, ConfigError, check_host_root, check_interfaces
from agent.control.server import ControlServer
from agent.detect import triage
from agent.detect.rules import Detector, RuleError, kernel_thresholds
from agent.detect.ruleset import RuleSet, load_ruleset
from agent.enforce.base import EnforceError
from agent.enforce.cgroup import own_cgroup
from agent.enforce.egress import EgressMeter
from agent.filepolicy import FilePolicy
from agent.gpuguard import GpuGuard
from agent.model import Event, Finding
from agent.report.reporting import Reporting
from agent.respond import health
from agent.respond.engine import Responder
from agent.respond.feedbackbook import FeedbackBook
from agent.respond.investigate import Investigator
from agent.respond.policy import INVESTIGATE
from agent.rulereload import Reloaded, RuleReloader
from agent.sources.queue import EventQueue
from agent.state.store import Store

log = logging.getLogger("swarm_agent")

HOUSEKEEPING_S = 0.5
RECONCILE_EVERY_S = 5.0   # a backstop: change notifications can be lost (ENOBUFS)
UNSAVED_STATE = "unsaved-state.db"   # in run_dir: the state a degraded run could not write
STORAGE_CHECK_S = 0.5     # how often degraded storage is looked at (tries are backed off)
# The consumer of the event queue hands the loop back (to the ring-buffer readers, the
# control server) after this long or this many events, whichever comes first.
CONSUME_BUDGET_S = 0.005
CONSUME_BATCH = 256
STOP_DRAIN_S = 2.0        # at stop, queued events still go through the detector this long
DROP_LOG_S = 10.0         # at most one log line about queue drops this often


class Agent(AgentView, ProbeHost, AnomalyHost):
    """Wires one namespace's sources, detector, responder and enforcer together."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        # the bundle in force (agent.bundles) loads after the packaged rules and
        # rules_extra; one whose rules do not load is left out, status says why
        bundles.VALIDATORS["anomaly"] = anomalystate.bundle_validator(cfg.anomaly)
        self.bundles = BundleManager(cfg.state_dir)
        self.bundles.use_parts = self._use_parts
        try:
            ruleset = self.bundles.start(self._check_rules, list(cfg.rule_paths))
        except RuleError as e:
            raise ConfigError(str(e)) from None
        self.rules = list(ruleset.rules)
        self.detector = Detector(self.rules, cfg)
        self.rulebook = RuleReloader(cfg, ruleset, self._use_rules)
        self.rulebook.paths = lambda: list(cfg.rule_paths) + self.bundles.rule_dirs()
        self.rulebook.bundle = self.bundles.status
        self.counters: Counter[str] = Counter()
        self.started_at = time.time()
        self.probe = None
        self.proc_probe = None
        self.activity_probe = None     # agent.sources.activity, when probes.activity
        self.activity_status: dict[str, dict[str, str]] = {}
        self.probe_status: dict[str, dict[str, str]] = {}
        self.proc_status: dict[str, dict[str, str]] = {}
        self.gpu = None           # agent.sources.gpu.GpuSource, when gpu.enabled
        self.last_drift_at: float | None = None
        self._lock_fd: int | None = None
        self._storage_incident: str | None = None
        self.queue: EventQueue[Event] = EventQueue(cfg.probes.queue_events)
        self._drops_seen: dict[str, int] = {}      # lane.kind -> drops already told
        self._drops_logged_at = 0.0
        self.ready = False
        self.files = FilePolicy(cfg, agent_cgroup=_own_cgroup())   # policy.files (fanotify)
        self.egress_meter = EgressMeter(egresswatch.REPORT_EVERY_S)   # egress drop totals
        # Set by prepare() (they need the store): false-positive verdicts, investigations.
        self.feedback: FeedbackBook | None = None
        self.investigator: Investigator | None = None
        self.anomaly = None       # agent.detect.anomaly.AnomalyEngine, when anomaly.enabled
        self.anomaly_saved = {"at": 0.0, "bytes": 0, "error": ""}
        self.fleet = None         # agent.fleet.subscriber.FleetSubscriber, when fleet.nats_url

    # -- start-up: everything that can fail with a clear sentence happens here -------------

    def prepare(self) -> None:
        check_interfaces(self.cfg)
        check_host_root(self.cfg)
        self._lock_state_dir()
        self._ensure_mounts()
        # Never fails on storage: a corrupt file is moved aside, a failing disk leaves the
        # state in memory (agent.state.backing); status, log, metric and incident say so.
        self.store = Store(self.cfg.db_path, spill=Path(self.cfg.run_dir) / UNSAVED_STATE)
        self.enforcer = self._make_enforcer()
        seeded = self._seed_from_kernel() if self.store.fresh else 0
        self.store.on_lost(self._seed_from_kernel)
        # Commits are fsync'd on a thread from here on (agent.state.batch): the host
        # change of a finding never waits for a disk.
        self.store.start_syncing()
        self.responder = Responder(self.cfg, self.store, self.enforcer)
        self.node = self.cfg.mesh.node_id or socket.gethostname()
        self.feedback = FeedbackBook(self.store, self.node,
                                     max_ttl_s=self.cfg.feedback.max_ttl_s, learn=self._learn,
                                     unlearn=self._unlearn)
        self.rulebook.audit = lambda result, detail: self.store.record_audit(
            time.time(), "signal:SIGHUP", "local", "ReloadRules", {}, result, detail)
        now = time.time()
        self.enforcer.nft.infrastructure[:] = self._infrastructure()
        self.enforcer.setup(self.responder.desired(now), now)
        self._open_fleet()
        self._open_probe()
        self._open_proc_probe()
        self._open_activity_probe()
        self._open_gpu()
        self.gpu_guard = GpuGuard(self.cfg, self.store, self._use_gpu_policy, self.enqueue,
                                  agent_cgroup=_own_cgroup())
        self.detector.gpu_policy = self.gpu_guard.policy
        self.reporting = Reporting(self.cfg, self.store, self.responder.observers,
                                   status=self.status, losses=self.losses, unparsed=self.unparsed,
                                   queue=self.queue_status, gpus=self.gpu_metrics,
                                   policy_denied=self.policy_denied,
                                   feedback=self.feedback.counts, fleet=self.fleet_status)
        inv = self.cfg.investigation
        self.investigator = Investigator(
            self.store, refresh_s=inv.refresh_s, timeout_s=inv.timeout_s,
            max_bytes=inv.max_bytes, recent=self._recent,
            gpu_processes=lambda: self.gpu.processes() if self.gpu is not None else [],
            counters=lambda: {**self.counters, "ringbuf_losses": self.losses()},
            notify=lambda incident: self.responder.notify("incident", incident),
            outbox_add=self.reporting.outbox.add_evidence)
        self._open_anomaly()
        for what in self.store.health.recovered:
            health.state_recovered(self.store, self.responder.notify, what, seeded)
        self._storage_incident = health.open_storage_incident(self.store)
        self.check_storage()

    def _open_fleet(self) -> None:
        """Fleet decisions (config fleet:): the fleet table made from the database now,
        the subscriber started with the other tasks. A key file that does not load is a
        ConfigError: decisions are never applied unverified."""
        if not self.cfg.fleet.enabled:
            return
        from agent.enforce.fleet import FleetEnforcer
        from agent.fleet.subscriber import FleetSubscriber

        self.fleet = FleetSubscriber(self.cfg, self.store, FleetEnforcer(dry_run=self.cfg.dry_run),
                                     self.node, self.enforcer.nft.allow_networks,
                                     servers=self.enforcer.nft.infrastructure)
        self.fleet.start()

    def _infrastructure(self) -> list:
        """The addresses of the mesh's reporting endpoint and of the fleet's NATS servers
        (a name resolved once, waiting RESOLVE_WAIT_S at most): the agent's own table never
        blocks them, whatever allowlist.mesh says -- a local block of the mesh (a rule
        fooled by forged packets in its name) would cut the node off from the channel that
        reports it and lifts fleet decisions."""
        from agent.fleet.config import server_networks

        hosts = list(self.cfg.fleet.server_hosts()) if self.cfg.fleet.enabled else []
        hosts.append(self.cfg.mesh.host())
        nets, unresolved = server_networks([h for h in hosts if h])
        if unresolved:
            log.warning("mesh or fleet servers not resolved at start: not allowlisted until "
                        "met", extra={"names": unresolved})
        return nets

    def fleet_status(self) -> dict:
        fleet = getattr(self, "fleet", None)
        return fleet.status() if fleet is not None else {"enabled": False}

    def _lock_state_dir(self) -> None:
        """One agent per state_dir. A state_dir that cannot be written (read-only, full,
        gone) does not stop the agent: it runs with its state in memory."""
        state = Path(self.cfg.state_dir)
        try:
            state.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._lock_fd = os.open(state / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            with contextlib.suppress(OSError):
                self._lock_fd = os.open(state / "agent.lock", os.O_RDONLY)
            if self._lock_fd is None:
                log.error("state_dir unusable: running without its lock, state in memory",
                          extra={"state_dir": str(state), "reason": e.strerror})
                return
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another agent is already running with state_dir {state}") from None

    def _seed_from_kernel(self) -> int:
        """A fresh database (first start, or the old one moved aside): record what the
        kernel table holds in force, so setup() keeps it instead of wiping it."""
        return 0 if self.cfg.dry_run else health.reseed_from_kernel(self.store, self.cfg)

    def _ensure_mounts(self) -> None:
        """`ip netns exec` gives the agent a fresh /sys without tracefs (tracepoints) and
        without cgroup v2 (nft's socket cgroupv2 match, the freezer, cgroup names): mount
        them in this private mount namespace. A failure degrades, never stops, the agent."""
        from agent.enforce.cgroup import ensure_cgroup2
        from agent.sources.capability import ensure_tracefs

        for what, problem in (("tracefs", ensure_tracefs()), ("cgroup2", ensure_cgroup2())):
            if problem:
                log.warning(f"{what} unavailable", extra={"reason": problem})
        from agent.sources.capability import CAPABILITIES, missing_capabilities

        for cap in missing_capabilities():   # what then fails says why; this says what lacks
            log.warning(f"{cap} missing", extra={"reason": f"needed to {CAPABILITIES[cap]}"})

    def _make_enforcer(self):
        # Dry run is the live enforcer stopping before each host change, so it plans what
        # the live agent would do (its checks, refusals, peer quarantines).
        from agent.enforce.composite import CompositeEnforcer

        return CompositeEnforcer(self.cfg, dry_run=self.cfg.dry_run)

    # -- the pipeline -----------------------------------------------------------------------

    def enqueue(self, event: Event) -> None:
        """What the probes emit to, on the loop thread: queue the event and return (a full
        queue drops and counts, agent.sources.queue); `consume` takes it from there. An
        event that already matches a severe rule takes the urgent lane, and each lane is
        fair between the events' owners (agent.detect.triage)."""
        self.queue.put(event.kind, event, owner=triage.owner(event),
                       urgent=triage.urgent(self.detector, event))

    async def consume(self) -> None:
        """Run queued events through detector and responder in budgeted batches; one that
        fails is counted (events.failed) and logged, and the rest go on."""
        while True:
            await self.queue.wait()
            deadline = time.monotonic() + CONSUME_BUDGET_S
            for _ in range(CONSUME_BATCH):
                batch = self.queue.take(1)
                if not batch:
                    break
                self._process(batch[0])
                if time.monotonic() >= deadline:
                    break
            await asyncio.sleep(0)      # the readers and the control server get the loop

    def _process(self, event: Event) -> None:
        try:
            self.on_event(event)
        except Exception as e:   # noqa: BLE001 -- one event must not stop the pipeline
            self._failed("events.failed", e, kind=event.kind, subject=event.subject)

    def _failed(self, counter: str, e: Exception, **about: str) -> None:
        self.counters[counter] += 1
        if getattr(self, "reporting", None) is not None:
            self.reporting.metrics.failed.labels(counter.split(".")[0].removesuffix("s")).inc()
        n = self.counters[counter]
        if n & (n - 1) == 0:     # the 1st, 2nd, 4th, 8th...: a flood of them is no log flood
            log.error("event processing failed; counted, the rest go on", exc_info=e,
                      extra={"counter": counter, "count": n, "error": str(e) or type(e).__name__,
                             **about})

    def on_event(self, event: Event) -> None:
        """One event through the detector and the responder, on the loop thread."""
        self.counters[f"events.{event.kind}"] += 1
        findings = self.detector.evaluate(event, event.mono_ns)
        decided_ns = time.monotonic_ns()   # when the detector decided: the incident's detected_at
        findings = [replace(f, decided_mono_ns=decided_ns) for f in findings]
        self.reporting.observe_event(event, findings)
        self.handle_findings(findings)
        if self.anomaly is not None:
            try:    # cheap (a window's counters); never stops the rules' pipeline
                self.anomaly.observe(event)
            except Exception as e:   # noqa: BLE001
                self._failed("anomaly.failed", e, kind=event.kind)

    def handle_findings(self, findings: list[Finding]) -> None:
        """Findings (of the rules or the anomaly models) to the responder, on the loop
        thread; one the responder fails on is counted (findings.failed), the others go on."""
        for finding in findings:
            self.counters[f"findings.{finding.rule}"] += 1   # the rule's hits
            self.rulebook.hit(finding.rule)
            # An operator's false-positive verdict on this rule and scope: counted, not
            # handled (agent.respond.feedbackbook). Feedback failing never hides a finding.
            try:
                kept = self.feedback.check(finding) if self.feedback is not None else None
            except Exception as e:   # noqa: BLE001
                self._failed("feedback.failed", e, rule=finding.rule, entity=finding.entity)
                kept = None
            if kept is not None:
                self.counters[f"findings_suppressed.{finding.rule}"] += 1
                log.debug("finding suppressed by feedback", extra={
                    "rule": finding.rule, "entity": finding.entity, "feedback": kept.id})
                continue
            try:
                incident = self.responder.handle(finding)
            except Exception as e:   # noqa: BLE001 -- the next finding must still be handled
                self._failed("findings.failed", e, rule=finding.rule, entity=finding.entity)
                continue
            if finding.action == INVESTIGATE and self.investigator is not None:
                try:     # its evidence, on a thread: never holds up or fails the finding
                    self.investigator.on_finding(incident, finding)
                except Exception as e:   # noqa: BLE001
                    self._failed("investigation.failed", e, incident=incident.id)
            log.info("finding", extra={"rule": finding.rule, "entity": finding.entity,
                                       "incident": incident.id, "state": str(incident.state)})

    def check_drops(self) -> None:
        """New queue drops: a log line (at most one per DROP_LOG_S, with what was dropped
        since the last one); drops from the urgent lane (each one a severe detection lost)
        also open or add to an escalated agent_health incident."""
        drops = self.queue_drops()
        new = {k: n - self._drops_seen.get(k, 0) for k, n in drops.items()
               if n > self._drops_seen.get(k, 0)}
        urgent = {k: n for k, n in new.items() if k.startswith("urgent.")}
        if urgent and getattr(self, "responder", None) is not None:
            try:
                health.events_dropped(self.store, self.responder.notify, urgent,
                                      self.queue.urgent.capacity)
            except Exception as e:   # noqa: BLE001 -- the log line below still tells it
                self._failed("health.failed", e, what="events_dropped incident")
        now = time.monotonic()
        if not new or (not urgent and now - self._drops_logged_at < DROP_LOG_S):
            return      # untold drops stay counted and are told with the next line
        self._drops_logged_at, self._drops_seen = now, drops
        log.warning("event queue full: events dropped (counted; see status and metrics)",
                    extra={"dropped": new, "capacity": self.queue.capacity,
                           "urgent_capacity": self.queue.urgent.capacity})

    def on_drift(self) -> None:
        now = time.time()
        try:
            drift = self.enforcer.reconcile(self.responder.desired(now), now)
        except EnforceError as e:
            log.error("reconcile failed", extra={"error": str(e)})
            self.counters["reconcile.failed"] += 1
            return
        if drift.notes:
            self.counters["reconcile.tampered"] += len(drift.notes)
            self.responder.record_tampering(drift.notes)
        if drift:
            self.last_drift_at = now
            self.counters["reconcile.repaired"] += 1
            log.warning("nftables drift repaired", extra={
                "table_recreated": drift.table_recreated, "added": drift.elements_added,
                "removed": drift.elements_removed})

    async def housekeeping(self) -> None:
        last_reconcile = 0.0
        while True:
            now = time.time()
            for m in self.responder.expire(now):
                log.info("mitigation expired", extra={"kind": str(m.kind), "target": m.target})
            if now - last_reconcile >= RECONCILE_EVERY_S:
                self.on_drift()
                last_reconcile = now
            self.check_drops()
            if self.feedback is not None:
                self.feedback.flush()
            self.anomaly_tick()
            await self.save_anomaly(now)
            if self.gpu is not None and self.gpu_guard.due(time.monotonic()):
                self.gpu_guard.recheck(self.gpu)   # processes that moved cgroups
            await asyncio.sleep(HOUSEKEEPING_S)

    def check_storage(self) -> None:
        """Open the storage incident when the store went to memory, resolve it once the
        memory copy is written back."""
        h = self.store.health
        if self.store.degraded and self._storage_incident is None:
            self.counters["storage.degraded"] += 1
            incident = health.storage_failing(self.store, self.responder.notify, h.reason,
                                              h.since)
            self._storage_incident = incident.id
        elif not self.store.degraded and self._storage_incident is not None:
            incident_id, self._storage_incident = self._storage_incident, None
            health.storage_recovered(self.store, self.responder.notify, incident_id)

    async def watch_storage(self) -> None:
        """While the store is in memory, try (backed off) to write it back."""
        while True:
            await asyncio.sleep(STORAGE_CHECK_S)
            if self.store.degraded:
                await asyncio.to_thread(self.store.catch_up)
            self.check_storage()

    async def watch_table(self) -> None:
        if self.cfg.dry_run:
            return
        from agent.enforce.monitor import NftMonitor, watch

        monitor = NftMonitor()
        try:
            await watch(monitor, self.on_drift)
        finally:
            monitor.close()

    async def reload_rules(self, origin: str = "control") -> Reloaded:
        """Re-read every rule file and use the set everywhere (agent.rulereload); raises
        ConfigError naming file, line and reason, and keeps the rules in use."""
        return await self.rulebook.reload(origin)

    def _check_rules(self, paths: list[Path]) -> RuleSet:
        """The full rule set of `paths`, read and its detector built (RuleError if not)."""
        ruleset = load_ruleset(paths)
        Detector(list(ruleset.rules), self.cfg)
        return ruleset

    async def apply_bundle(self, rules: dict[str, bytes], parts: dict[str, bytes],
                           label: str, comment: str, by: str) -> dict:
        """A rule/config bundle from the control API (agent.bundles); raises BundleError."""
        return await self.bundles.apply(rules, parts, label, comment, by,
                                        list(self.cfg.rule_paths), self._check_rules,
                                        self.rulebook.reload)

    async def rollback_bundle(self) -> tuple[int, int]:
        return await self.bundles.rollback(self.rulebook.reload)

    def _use_rules(self, ruleset: RuleSet, detector: Detector) -> None:
        """Put a validated set in use, on the loop thread (so between two events): the
        kernel thresholds first -- one map element, written whole or not at all, the only
        step that can fail (OSError, and then nothing changed) -- then the rest."""
        rules = list(ruleset.rules)
        if self.proc_probe is not None:     # the exec policy's kernel switch (one element)
            self.proc_probe.set_exec_policy(detector.exec_needs)
        if self.probe is not None:
            try:
                self.probe.set_thresholds(kernel_thresholds(rules))
            except OSError:
                if self.proc_probe is not None:     # nothing changed: switch it back
                    self.proc_probe.set_exec_policy(self.detector.exec_needs)
                raise
        if getattr(self, "responder", None) is not None:
            self.responder.set_rules(rules)
        self.rules, self.detector = rules, detector
        if getattr(self, "gpu_guard", None) is not None:
            # refresh() gives the new detector the GPU policy (_use_gpu_policy) under a new
            # version, so the processes already on the GPUs are judged by the new rules too.
            self.gpu_guard.refresh()
            self.gpu_guard.recheck(getattr(self, "gpu", None))

    def _use_gpu_policy(self, policy) -> None:
        """New GPU authorizations (agent.gpuguard), on the loop thread: judged by from the
        next event on."""
        self.detector.gpu_policy = policy

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        self.prepare()
        control = ControlServer(self)
        try:
            await control.start()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(control.run())
                for probe in (self.probe, self.proc_probe, self.activity_probe):
                    if probe is not None:
                        tg.create_task(probe.run(self.enqueue))
                if self.gpu is not None:
                    tg.create_task(self.gpu.run(self.gpu_guard.observe))
                tg.create_task(self.consume())
                if self.fleet is not None:
                    tg.create_task(self.fleet.run())
                tg.create_task(self.watch_table())
                tg.create_task(self.housekeeping())
                tg.create_task(self.watch_storage())
                if self.cfg.policy.egress and not self.cfg.dry_run:
                    tg.create_task(egresswatch.watch(
                        self.cfg, self.enforcer.egress_counts, self.enqueue,
                        lambda e: self._failed("egress.read_failed", e), self.egress_meter))
                self.files.start(asyncio.get_running_loop(), self.enqueue, self.cfg.dry_run)
                tg.create_task(self.files.watch())
                for task in self.reporting.tasks():
                    tg.create_task(task)
                self.ready = True
                self.rulebook.started()     # a SIGHUP during start-up is served now
                sd_notify("READY=1")
                log.info("agent ready", extra={"probes": {**self.probe_status, **self.proc_status,
                                                          **self.activity_status},
                                               "dry_run": self.cfg.dry_run})
        finally:
            self.close()

    def close(self) -> None:
        self.ready = False
        self.files.close()
        for probe in (self.probe, self.proc_probe, self.activity_probe):
            if probe is not None:
                probe.close()
        if self.gpu is not None:
            self.gpu.stop()
        self.drain_at_stop()
        if self.feedback is not None:
            self.feedback.flush()
        self.save_anomaly_now()
        if getattr(self, "reporting", None) is not None:
            self.reporting.close()
        if getattr(self, "store", None) is not None:
            self.store.close()

    def drain_at_stop(self, deadline_s: float = STOP_DRAIN_S) -> None:
        """What is still queued at stop goes through the detector and responder for up to
        `deadline_s` (urgent lane first); what is left then is counted
        (events.dropped_at_stop.<kind>) and logged -- never silently discarded."""
        if getattr(self, "responder", None) is not None and \
                getattr(self, "reporting", None) is not None:
            deadline = time.monotonic() + deadline_s
            while len(self.queue) and time.monotonic() < deadline:
                for event in self.queue.take(CONSUME_BATCH):
                    self._process(event)
        left = Counter(e.kind for e in self.queue.take(len(self.queue)))
        if left:
            for kind, n in left.items():
                self.counters[f"events.dropped_at_stop.{kind}"] += n
            log.error("stopping: queued events not processed within the deadline, dropped",
                      extra={"dropped": dict(left), "deadline_s": deadline_s})
        if getattr(self, "store", None) is not None:
            self.check_drops()      # an urgent lane that dropped is recorded before the end


def _own_cgroup() -> str | None:
    try:
        return own_cgroup()
    except OSError:
        return None


def sd_notify(message: str) -> None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message.encode(), addr)


def run_forever(cfg: Config) -> None:
    """Run until SIGTERM/SIGINT; a second signal exits at once. SIGHUP reloads the rules
    (agent.rulereload); one before the loop runs is kept for when the agent is ready."""
    early_hup: list[int] = []
    # From here on a SIGHUP is remembered (its default would end the process); before
    # this, cmd_run ignores it: the rules are not read yet.
    signal.signal(signal.SIGHUP, lambda signum, frame: early_hup.append(signum))
    agent = Agent(cfg)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        stopping = False

        def on_signal() -> None:
            nonlocal stopping
            if stopping:
                os._exit(1)
            stopping = True
            log.info("stopping")
            task.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        loop.add_signal_handler(signal.SIGHUP, lambda: agent.rulebook.on_sighup(agent.ready))
        if early_hup:
            agent.rulebook.on_sighup(False)
        with contextlib.suppress(asyncio.CancelledError):
            await agent.run()

    asyncio.run(main())
