"""The anomaly engine's place in the agent (a part of agent.daemon.Agent): opened from its
state file under the config file's `anomaly:` section or a bundle's anomaly part, fed by
on_event, ticked by housekeeping (its findings go through handle_findings like the rules'),
saved every `anomaly.save_every_s` and at stop (agent.anomalystate), and the two hooks the
investigations and feedback use: a workload's recent events, "learn as normal"."""
from __future__ import annotations

import logging
import socket
import time
from dataclasses import replace

from agent import anomalystate
from agent.enforce.cgroup import own_cgroup

log = logging.getLogger("swarm_agent")


class AnomalyHost:
    """The anomaly engine's methods of the agent (self.anomaly: the engine or None)."""

    anomaly = None

    def _open_anomaly(self) -> None:
        """The anomaly engine from its saved state (agent.anomalystate): a bad file is moved
        aside and warm-up starts again, never a failed start. Its config: the bundle's
        anomaly part in force, else the config file's section."""
        if getattr(self, "reporting", None) is not None:    # a bundle may turn it on later
            self.reporting.metrics.registry.register(
                anomalystate.AnomalyCollector(self.anomaly_status))
        acfg = self.cfg.anomaly
        try:
            acfg = self.bundles.parts_now().get("anomaly") or acfg
        except ValueError as e:     # the bundle's rules were checked; its part no longer is
            log.error("the bundle's anomaly part is not used", extra={"reason": str(e)})
        if acfg.enabled:
            self.anomaly = anomalystate.open_engine(self.cfg, self._node(), self._unmodelled(),
                                                    acfg)

    def _use_parts(self, parts: dict) -> None:
        """A bundle's config parts put in force, or the config file's again at a rollback
        to none (agent.bundles calls it; raising undoes the bundle)."""
        acfg = parts.get("anomaly") or self.cfg.anomaly
        if not acfg.enabled:
            self.save_anomaly_now()     # kept for a later bundle that turns it on again
            self.anomaly = None
        elif self.anomaly is None:
            self.anomaly = anomalystate.open_engine(self.cfg, self._node(), self._unmodelled(),
                                                    acfg)
        else:
            self.anomaly = anomalystate.reconfigure(self.anomaly, acfg, self._node(), self.cfg,
                                                    self._unmodelled())

    def _node(self) -> str:
        return self.cfg.mesh.node_id or socket.gethostname()

    @staticmethod
    def _unmodelled() -> tuple[str, ...]:
        try:                            # the agent's own activity is not a workload's
            own = own_cgroup()
        except OSError:
            own = None
        return (own,) if own else ()

    def anomaly_tick(self) -> None:
        """Close due windows and score them (agent.detect.anomaly), on the loop thread;
        the findings go to the responder like the rules' do."""
        if self.anomaly is None:
            return
        try:
            findings = self.anomaly.tick(time.monotonic_ns())
        except Exception as e:   # noqa: BLE001 -- counted and logged; the agent goes on
            self._failed("anomaly.failed", e, what="tick")
            return
        decided_ns = time.monotonic_ns()
        findings = [replace(f, decided_mono_ns=decided_ns) for f in findings]
        for f in findings:
            self.reporting.metrics.findings.labels("anomaly", f.rule).inc()
        self.handle_findings(findings)

    async def save_anomaly(self, now: float) -> None:
        """The engine's state to its file every anomaly.save_every_s (agent.anomalystate)."""
        if self.anomaly is not None and \
                now - self.anomaly_saved["at"] >= self.cfg.anomaly.save_every_s:
            await anomalystate.save(self.anomaly, self.cfg, self.anomaly_saved, self.counters)

    def save_anomaly_now(self) -> None:
        """At stop: the state written before the process ends."""
        if self.anomaly is not None:
            anomalystate.save_now(self.anomaly, self.cfg, self.anomaly_saved)

    def _learn(self, evidence, record_id: str = "") -> None:
        """Feedback's "learn as normal": the anomaly engine's, when the agent has one."""
        engine = getattr(self, "anomaly", None)
        if engine is not None:
            engine.learn(dict(evidence), record_id)

    def _unlearn(self, record_id: str) -> dict | None:
        """A "learn" record reverted: the engine takes back what it taught."""
        engine = getattr(self, "anomaly", None)
        return None if engine is None else engine.unlearn(record_id)

    def _recent(self, workload: str) -> list:
        """A workload's recent exec/connect events, for evidence (the anomaly engine's)."""
        engine = getattr(self, "anomaly", None)
        return list(engine.recent(workload)) if engine is not None else []
