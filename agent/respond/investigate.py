"""Investigations: the evidence bundle of an escalated suspicious_activity incident.

When a finding asks for an investigation (action "investigate") and its incident has no
evidence yet, or its last is older than `investigation.refresh_s`, the bundle is collected
(agent.respond.evidence) on a thread of its own, bounded in time (`timeout_s`) and size
(`max_bytes`), and stored with the incident as a timeline entry of kind "evidence" whose
data is the bundle; the same transaction queues it for the mesh (the outbox's "evidence"
reports). Collection never fails the finding: the finding was handled before it starts,
and a failure is counted and logged. At most MAX_IN_FLIGHT collections run at once; a
finding beyond that is counted (investigation.evidence_skipped) and the next refresh
tries again.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import Counter
from typing import Any, Callable, Mapping

from agent.model import Finding, Incident
from agent.respond import evidence
from agent.state.store import Store

log = logging.getLogger("swarm_agent")
MAX_IN_FLIGHT = 4
MAX_REMEMBERED = 10_000     # incidents whose last collection time is kept in memory
EVIDENCE = "evidence"       # the timeline entry's kind


class Investigator:
    """See the module docstring. `recent(workload)`: recent events of "cgroup:<path>";
    `gpu_processes()`: the GPU source's processes; `counters()`: the agent's counters;
    `notify(incident)`: after a bundle is stored (observers: alerts, mesh, watchers);
    `outbox_add(incident_id, evidence_id, bundle, at)`: queue it for the mesh (inside the
    store's transaction)."""

    def __init__(self, store: Store, *, refresh_s: float, timeout_s: float, max_bytes: int,
                 recent: Callable[[str], list] | None = None,
                 gpu_processes: Callable[[], list] | None = None,
                 counters: Callable[[], Mapping[str, Any]] = dict,
                 notify: Callable[[Incident], None] = lambda i: None,
                 outbox_add: Callable[[str, str, dict, float], None] | None = None,
                 clock: Callable[[], float] = time.time):
        self._store = store
        self.refresh_s, self.timeout_s, self.max_bytes = refresh_s, timeout_s, max_bytes
        self.recent, self.gpu_processes, self.counters = recent, gpu_processes, counters
        self._notify, self._outbox_add, self._clock = notify, outbox_add, clock
        self.stats: Counter[str] = Counter()
        self._last: dict[str, float] = {}        # incident id -> last collection (wall)
        self._in_flight: set[str] = set()
        self.tasks: set[asyncio.Future] = set()

    def due(self, incident: Incident) -> bool:
        if incident.id in self._in_flight:
            return False
        last = self._last.get(incident.id)
        if last is None:
            last = self._stored_at(incident.id)
            if last is not None:
                self._last[incident.id] = last
        return last is None or self._clock() - last >= self.refresh_s

    def on_finding(self, incident: Incident, finding: Finding) -> None:
        """After the responder handled an investigation's finding: collect if due. On the
        event loop it runs on a thread and returns at once; without one, it waits."""
        if not self.due(incident):
            return
        if len(self._in_flight) >= MAX_IN_FLIGHT:
            self.stats["evidence_skipped"] += 1
            return
        targets = evidence.targets_of(incident.entity, finding.evidence)
        self._in_flight.add(incident.id)
        if len(self._last) >= MAX_REMEMBERED:     # the oldest are read back from the store
            for old in sorted(self._last, key=self._last.__getitem__)[:MAX_REMEMBERED // 2]:
                del self._last[old]
        self._last[incident.id] = self._clock()
        bundle = evidence.Bundle({**targets, "incident_id": incident.id,
                                  "rule": finding.rule, "entity": incident.entity})
        # Read here, on the caller's (the loop's) thread, where they change: the counters
        # and the anomaly engine's recent events (bounded lists, quick to copy).
        bundle.data["agent"] = dict(self.counters())
        for workload in targets["workloads"] if self.recent is not None else []:
            try:
                bundle.data["recent"].extend(list(self.recent(workload) or []))
            except Exception:   # noqa: BLE001 -- another part's hook: never fail the bundle
                bundle.data["errors"] += 1
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:
            self._collect(bundle, time.monotonic() + self.timeout_s)
            self._finish(incident.id, bundle)
            return
        task = loop.create_task(self._collect_async(incident.id, bundle))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _collect_async(self, incident_id: str, bundle: evidence.Bundle) -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        deadline = time.monotonic() + self.timeout_s

        def work() -> None:
            self._collect(bundle, deadline)
            try:
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))
            except RuntimeError:    # the loop is gone (stopped): nobody waits any more
                pass
        # Its own daemon thread, not the default executor: a read that blocks for ever
        # must not hold a pool thread that everything else waits on.
        threading.Thread(target=work, name="evidence", daemon=True).start()
        try:
            await asyncio.wait_for(asyncio.shield(done), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            self.stats["evidence_timed_out"] += 1
        self._finish(incident_id, bundle)

    def _collect(self, bundle: evidence.Bundle, deadline: float) -> None:
        try:
            evidence.collect(bundle, deadline=deadline, gpu_processes=self.gpu_processes)
        except Exception:   # noqa: BLE001 -- what was gathered is still stored
            self.stats["evidence_failed"] += 1
            log.exception("evidence collection failed; what was gathered is kept")

    def _finish(self, incident_id: str, bundle: evidence.Bundle) -> None:
        """Store what was gathered (on the loop thread)."""
        self._in_flight.discard(incident_id)
        try:
            data = bundle.snapshot(self.max_bytes)
        except (RuntimeError, ValueError):    # changed under us: the thread is still at it
            self.stats["evidence_failed"] += 1
            return
        at = self._clock()
        data["evidence_id"] = uuid.uuid4().hex
        data["collected_at"] = at
        data["summary"] = evidence.summary(data)
        try:
            with self._store.batch():
                self._store.add_incident_event(incident_id, EVIDENCE, data["summary"], at,
                                               data)
                if self._outbox_add is not None:
                    self._outbox_add(incident_id, data["evidence_id"], data, at)
        except Exception:   # noqa: BLE001 -- the incident stands without its bundle
            self.stats["evidence_failed"] += 1
            log.exception("evidence could not be stored", extra={"incident": incident_id})
            return
        self.stats["evidence_collected"] += 1
        if data.get("truncated"):
            self.stats["evidence_truncated"] += 1
        incident = self._store.incident(incident_id)
        if incident is not None:
            self._notify(incident)

    def _stored_at(self, incident_id: str) -> float | None:
        found = [e.at for e in self._store.incident_events(incident_id) if e.kind == EVIDENCE]
        return max(found) if found else None

    def status(self) -> dict[str, int]:
        return {f"investigation.{k}": n for k, n in self.stats.items()}
