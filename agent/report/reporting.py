"""Everything that tells the outside world what the agent saw and did: the mesh reporter
(with its outbox), the Alertmanager notifier and the Prometheus metrics.

Built by the daemon after the store and the responder (a bad mesh certificate is a
ConfigError then, before the agent is ready); it listens to the responder's observer
hook; `tasks()` go into the agent's TaskGroup; `close()` on the way out. Without a mesh
endpoint the agent is standalone: nothing is sent and the outbox is kept empty. A metrics
address that cannot be bound is logged and reported as a degraded reporter, never fatal:
metrics must not keep the agent from protecting the host.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Coroutine, Iterable

from agent import __version__
from agent.config import Config
from agent.model import Event, Finding, IncidentState
from agent.report.alerts import Notifier
from agent.report.mesh import MeshReporter
from agent.report.metrics import Metrics
from agent.state.outbox import Outbox
from agent.state.store import Store

log = logging.getLogger("swarm_agent")

STANDALONE_CLEAR_S = 5.0
_LIVE = (IncidentState.OPEN.value, IncidentState.MITIGATED.value, IncidentState.ESCALATED.value)


class Reporting:
    """See the module docstring. `status()` is the agent's status dict (for heartbeats),
    `losses()` the probe's lost ring-buffer events, `unparsed()` the packets its parser
    could not follow, by reason, `queue()` the event queue's status (depth, depth_max,
    capacity, dropped by kind)."""

    def __init__(self, cfg: Config, store: Store, observers: list, *,
                 status: Callable[[], dict[str, Any]], losses: Callable[[], int],
                 unparsed: Callable[[], dict[str, int]] = dict,
                 queue: Callable[[], dict[str, Any]] | None = None,
                 gpus: Callable[[], dict[str, Any]] | None = None,
                 policy_denied: Callable[[], dict[tuple[str, str], int]] | None = None,
                 feedback: Callable[[], dict[str, dict[str, int]]] | None = None,
                 fleet: Callable[[], dict[str, Any]] | None = None):
        self.cfg, self._store, self._status, self._losses = cfg, store, status, losses
        self._fleet = fleet
        self.problems: dict[str, str] = {}     # reporter -> why it is not working
        # The store's own connection: while storage is degraded the outbox lives in memory
        # with everything else (agent.state.backing).
        self.outbox = Outbox(store, max_reports=cfg.mesh.outbox_max,
                             hard_max_reports=cfg.mesh.outbox_hard_max)
        standalone = cfg.mesh.endpoint is None
        self.metrics = Metrics(store, losses=losses, outbox=None if standalone else self.outbox,
                               unparsed=unparsed, queue=queue, gpus=gpus,
                               policy_denied=policy_denied, feedback=feedback, fleet=fleet)
        observers.append(self.metrics.observe)
        self.mesh: MeshReporter | None = None
        if not standalone:
            self.mesh = MeshReporter(cfg.mesh, self.outbox, self._heartbeat,
                                     on_delivered=self.metrics.on_delivered,
                                     on_failure=self.metrics.delivery_failures.inc)
            observers.append(lambda kind, obj: self.mesh.wake())
        self.notifier: Notifier | None = None
        if cfg.alerts.url is not None:
            self.notifier = Notifier(cfg.alerts, store, cfg.mesh.node_id,
                                     on_sent=self.metrics.alerts_sent.inc,
                                     on_failure=self.metrics.alert_failures.inc)
            observers.append(self.notifier.observe)
        if cfg.metrics.listen is not None:
            try:
                self.metrics.serve(cfg.metrics.listen)
            except OSError as e:
                self.problems["metrics"] = f"cannot listen on {cfg.metrics.listen}: {e.strerror}"
                log.error("metrics unavailable", extra={"reason": self.problems["metrics"]})

    def observe_event(self, event: Event, findings: Iterable[Finding]) -> None:
        self.metrics.observe_event(event, findings)

    def tasks(self) -> list[Coroutine[Any, Any, None]]:
        out: list[Coroutine[Any, Any, None]] = []
        if self.mesh is not None:
            out.append(supervised("mesh reporter", self.mesh.run))
        else:
            out.append(supervised("outbox cleanup", self._standalone))
        if self.notifier is not None:
            out.append(supervised("alert notifier", self.notifier.run))
        return out

    async def _standalone(self) -> None:
        # The triggers queue every change whether or not a mesh is configured.
        while True:
            self.outbox.clear()
            await asyncio.sleep(STANDALONE_CLEAR_S)

    def status(self) -> dict[str, Any]:
        """For the agent's status: mesh state, outbox figures, notifier state, problems."""
        if self.mesh is None:
            mesh = "standalone"
        else:
            mesh = {None: "connecting", True: "reachable", False: "unreachable"}[self.mesh.reachable]
            if self.mesh.refused:
                mesh = f"refused: {self.mesh.refused}"
        out: dict[str, Any] = {"mesh": mesh, "problems": dict(self.problems)}
        if self.mesh is not None:
            out["outbox"] = self.outbox.depth()
            out["outbox_dropped"] = dict(self.outbox.dropped)
        if self.notifier is not None:
            out["alerts"] = "failing" if self.notifier.failing else "ok"
        return out

    def _heartbeat(self) -> dict[str, Any]:
        s = self._status()
        probes = {name: str(p.get("state", "")) + (f": {p['reason']}" if p.get("reason") else "")
                  for name, p in (s.get("probes") or {}).items() if isinstance(p, dict)}
        counts = self._store.counts_by_class().values()
        return {"version": __version__, "started_at": float(s.get("started_at") or 0.0),
                "ready": bool(s.get("ready")), "dry_run": self.cfg.dry_run, "probes": probes,
                "active_mitigations": len(self._store.active_mitigations(time.time())),
                "live_incidents": sum(c[state] for c in counts for state in _LIVE),
                "ringbuf_losses": self._losses(),
                "ruleset_version": str((s.get("ruleset") or {}).get("version") or ""),
                "rules": [str(r) for r in s.get("rules") or []], **self._fleet_fields()}

    def _fleet_fields(self) -> dict[str, int]:
        """The heartbeat's fleet figures (no MitigationReport per fleet decision)."""
        f = self._fleet() if self._fleet is not None else {}
        if not f.get("enabled"):
            return {}
        return {"fleet_seq": int(f.get("seq") or 0), "fleet_active": int(f.get("in_force") or 0),
                "fleet_refused": sum((f.get("refused") or {}).values())}

    def close(self) -> None:
        self.metrics.close()
        self.outbox.close()


RESTART_S = (1.0, 30.0)     # first and largest delay before a failed reporter is restarted


async def supervised(name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run `run()` for ever: a reporter that fails is logged and restarted after a growing
    delay, never allowed to end the agent's TaskGroup (reporting must not stop detection
    or enforcement; a failing disk once did exactly that through the outbox)."""
    delay = RESTART_S[0]
    while True:
        started = time.monotonic()
        try:
            await run()
            return
        except Exception as e:   # noqa: BLE001 -- anything but cancellation is survivable
            log.error("reporter failed; restarting it", exc_info=True,
                      extra={"reporter": name, "error": str(e) or type(e).__name__,
                             "restart_in_s": delay})
        if time.monotonic() - started > 10 * RESTART_S[1]:
            delay = RESTART_S[0]            # it had been running fine: start over
        await asyncio.sleep(delay)
        delay = min(RESTART_S[1], delay * 2)
