"""GPU authorization at run time (issue 10 item 6): the grants in force, from the config
(gpu.authorized) and from the store (a scheduler's AuthorizeGpu calls, which survive a
restart), handed to the detector as one immutable GpuPolicy whenever they change; and the
re-check that turns processes already on a GPU into findings when their verdict changes.

The GPU source emits a gpu.process event once per process (first seen on a GPU); the
detector judges it with the policy in force (agent.gpugrant). A process judged authorized
stays so until something changes, hence the re-check, over the source's current process
list (`GpuSource.processes()`), each pid identified afresh from /proc:
  - at once when a grant is revoked (or added): a revoked workload's processes still on a
    GPU become violations without waiting for a sample;
  - every RECHECK_S: a process that moved to another cgroup since it was judged is judged
    where it is now.
An identity (GPU, pid, start time, cgroup) is sent to the detector again only when it was
last judged under another policy version, so an unchanged process is never re-reported.
A pid that exited or was reused since the sample (its start time differs) is skipped:
the next sample reports the new process on its own.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any, Callable

from agent import cgroupview
from agent.config import Config
from agent.gpugrant import (MAX_GRANTS, GpuPolicy, Grant, GrantError, parse_gpus, parse_job,
                            parse_workload)
from agent.model import Event
from agent.sources import gpuproc
from agent.state import gpugrants
from agent.state.store import Store

log = logging.getLogger("swarm_agent")
RECHECK_S = 2.0
_Key = tuple[Any, int, int, Any]    # (GPU uuid, pid, start ticks, cgroup)


class GpuGuard:
    """The GPU authorizations of one agent. `publish(policy)` hands the detector each new
    policy (on the loop thread); `emit` queues an event for the detector."""

    def __init__(self, cfg: Config, store: Store, publish: Callable[[GpuPolicy], None],
                 emit: Callable[[Event], None], agent_cgroup: str | None = None,
                 proc: str = "/proc"):
        self._cfg, self._store, self._publish, self._emit = cfg, store, publish, emit
        self._agent_cgroup, self._proc = agent_cgroup, proc
        self._judged: dict[_Key, int] = {}
        self._version = 0
        self._rechecked_at = 0.0
        self.policy = self._build()

    def _build(self) -> GpuPolicy:
        g = self._cfg.gpu
        self._version += 1
        return GpuPolicy(tuple(g.authorized) + tuple(gpugrants.grants(self._store)),
                         g.system_cgroups, g.system_exes, self._agent_cgroup, self._version,
                         enrolled=bool(g.authorized)
                         or gpugrants.enrolled_at(self._store) is not None)

    def status(self) -> dict[str, str]:
        """What an unauthorized GPU process gets now (gpu.on_violation, auto resolved), as
        a line of `status`'s probes: state enforcing (kill, freeze) or reporting."""
        on, p = self._cfg.gpu.on_violation, self.policy
        acting = on if on != "auto" else ("kill" if p.enrolled else "report")
        why = {"auto": "on_violation auto, " + ("enrolled" if p.enrolled else
                                                  "no workload ever authorized here")}
        reason = (f"unauthorized GPU processes: {acting} ({why.get(on, 'on_violation ' + on)}"
                  f"; {len(p.grants)} grants in force)")
        if cgroupview.namespace_root() is None:
            return {"state": "degraded", "reason": reason + "; the agent's cgroup namespace "
                    "is not found in the host's hierarchy (mount the host's /sys/fs/cgroup): "
                    "processes outside it are unresolved, never acted on"}
        return {"state": "reporting" if acting == "report" else "enforcing", "reason": reason}

    def refresh(self) -> GpuPolicy:
        self.policy = self._build()
        self._publish(self.policy)
        return self.policy

    # -- the control API's calls ---------------------------------------------------------

    def authorize(self, workload: Any, gpus: Any, job: Any, by: str,
                  now: float) -> tuple[str, tuple[str, ...]]:
        """Store a grant (GrantError, one sentence, for bad input; nothing stored then)."""
        workload, gpus, job = parse_workload(workload), parse_gpus(gpus), parse_job(job)
        stored = {(g.workload, g.gpu) for g in gpugrants.grants(self._store)}
        new = {(workload, g) for g in gpus} - stored
        if len(stored) + len(new) > MAX_GRANTS:
            raise GrantError(f"this would make {len(stored) + len(new)} stored GPU "
                             f"authorizations, over the limit of {MAX_GRANTS}: revoke those of "
                             "ended jobs first")
        gpugrants.authorize(self._store, workload, gpus, job, now, by)
        self.refresh()
        return workload, gpus

    def revoke(self, workload: Any, gpus: Any, source: Any) -> tuple[int, int]:
        """Remove a workload's grants (all, or for `gpus`) and re-check the processes on
        the GPUs at once: (grants removed, processes sent to the detector again)."""
        workload = parse_workload(workload)
        gpus = parse_gpus(gpus) if gpus else ()
        removed = gpugrants.revoke(self._store, workload, gpus)
        if not removed:
            raise LookupError(f"no GPU authorization of {workload} "
                              f"{'for ' + ', '.join(gpus) if gpus else ''}made through the "
                              "control API (those of the config change with the config)")
        self.refresh()
        return removed, self.recheck(source)

    def listing(self) -> list[dict[str, Any]]:
        return self.policy.listing()

    # -- events ----------------------------------------------------------------------------

    def observe(self, event: Event) -> None:
        """What the GPU source emits to: note that the process is judged under the policy
        in force, and queue the event."""
        f = event.fields
        if event.kind == "gpu.process" and f.get("resolved") is True:
            self._judged[(f.get("gpu_uuid"), f.get("pid"), f.get("start_ticks"),
                          f.get("cgroup"))] = self._version
        if event.kind == "gpu.usage":
            event = replace(event, fields={**f, **self.usage_verdict(f)})
        self._emit(event)

    def usage_verdict(self, f: Any) -> dict[str, bool]:
        """A gpu.usage sample under the policy in force: authorized when a grant covers
        the workload on every GPU it uses; system when it is one of the host's own."""
        verdicts = [self.policy.verdict({"resolved": True, "cgroup": f.get("cgroup"),
                                         "gpu_uuid": uuid, "gpu_index": index})
                    for index, uuid in zip(f.get("gpu_indexes") or (), f.get("gpu_uuids") or ())]
        return {"authorized": bool(verdicts) and all(v.get("authorized") for v in verdicts),
                "system": bool(verdicts) and all(v.get("system") for v in verdicts)}

    def recheck(self, source: Any, now: float | None = None) -> int:
        """Send the detector every process on a GPU whose identity was last judged under
        another policy (module docstring); how many were sent."""
        if source is None:
            return 0
        self._rechecked_at = time.monotonic() if now is None else now
        sent, live = 0, set()
        for rec in source.processes():
            if rec.get("resolved") is not True:
                continue
            pid = rec.get("pid")
            fresh = self._where_now(pid, rec.get("start_ticks"))
            if fresh is None:
                continue             # gone or reused: the next sample says what runs there
            key = (rec.get("gpu_uuid"), pid, rec.get("start_ticks"), fresh["cgroup"])
            live.add(key)
            if self._judged.get(key) == self._version:
                continue
            self._judged[key] = self._version
            now_ns = time.monotonic_ns()
            self._emit(Event(kind="gpu.process", subject=f"pid:{pid}", mono_ns=now_ns,
                             first_mono_ns=now_ns, source="gpu",
                             fields={**rec, **fresh, "rechecked": True}))
            sent += 1
        # forget identities no longer on a GPU (bounded by the processes NVML lists)
        listed = {(r.get("gpu_uuid"), r.get("pid")) for r in source.processes()}
        self._judged = {k: v for k, v in self._judged.items()
                        if k in live or (k[0], k[1]) in listed}
        return sent

    def _where_now(self, pid: object, start: object) -> dict | None:
        """The process's cgroup now (and the container it names), read between two reads
        of its start time; None when the pid no longer names the judged process. Cheap on
        purpose (three small /proc reads, on the loop thread; no scan of open files): the
        other fields stay the sample's (uid and executable only matter to the system
        exemption, which also needs root in a system unit), a cgroup move is what this
        looks for."""
        if not isinstance(pid, int) or isinstance(pid, bool) or start is None:
            return None
        if gpuproc.start_ticks(pid, self._proc) != start:
            return None
        cgroup = gpuproc.cgroup_of(pid, self._proc)
        if cgroup is None or gpuproc.start_ticks(pid, self._proc) != start:
            return None
        return {"cgroup": cgroup, "container_id": gpuproc.container_of(cgroup)}

    def due(self, now: float) -> bool:
        return now - self._rechecked_at >= RECHECK_S


__all__ = ["GpuGuard", "GrantError", "Grant"]
