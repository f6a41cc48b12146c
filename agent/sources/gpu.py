"""The GPU source: NVML in its own thread, feeding the agent's event queue through the
same `emit` the probes use (handed over on the loop with call_soon_threadsafe), never
blocking the loop.

Every `sample_s` it reads each GPU's counters (agent.sources.nvml.Sample: utilisation,
memory, temperature, power, clocks, throttle reasons, volatile double-bit ECC count),
kept for the metrics (`samples`), and the processes on each GPU, mapped to who they are
(agent.sources.gpuproc). Between samples it waits on NVML's event API, so an XID reaches
the detector as it happens. Events (all source "gpu"):

  gpu.process  subject "pid:<pid>", a process seen on a GPU for the first time (per GPU,
               pid and start time): gpu_index, gpu_uuid, gpu_name, process_type,
               used_memory_bytes, and the gpuproc identity (resolved, cgroup,
               container_id, uid, euid, exe, comm, start_ticks, gpu_device_fds, netns)
  gpu.xid      subject "gpu:<uuid>": xid, repeats (the same XID on the same GPU is
               emitted at most once per XID_REPEAT_S; those held back are counted)
  gpu.ecc      subject "gpu:<uuid>": dbe_new (double-bit errors since the last sample,
               or an ECC event), ecc_dbe_volatile
  gpu.throttle subject "gpu:<uuid>": reasons (those that became active), active (all),
               throttle_bits -- on each change, never per sample
  gpu.usage    subject "cgroup:<path>", every sample for each cgroup with a process on a
               GPU: cgroup, container ("" outside one), gpu_util (the SM utilisation of
               its processes, NVML's per-process samples since the last sample, 0-100 per
               GPU summed over GPUs), util_known (false where NVML does not answer per
               process: gpu_util is then 0), gpu_memory_bytes, gpu_indexes and gpu_uuids
               (in step), pids, window_ns; the agent's GPU guard adds authorized (a grant
               covers the workload on every GPU it uses) and system

State (`status`): "loaded", "absent" (no library, driver or GPU: looked for again every
ABSENT_RETRY_S) or "degraded" (NVML failed mid-run: closed and reopened with backoff,
BACKOFF_S up to BACKOFF_MAX_S), with a reason. The agent runs on in every state.

Standalone (stdlib + the vendored binding): `python3 -m agent.sources.gpu --once --json`.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import asdict
from typing import Callable

from agent.sources import gpuproc
from agent.sources.nvml import DBE_EVENT, XID_EVENT, Absent, Device, Nvml, NvmlFailure, \
    Sample, reason_names

try:
    from agent.model import Event
except AttributeError:   # Python < 3.11 (no enum.StrEnum): only the standalone check runs
    from dataclasses import dataclass, field   # there (bench/gpu_check.sh), never the agent

    @dataclass(frozen=True)
    class Event:   # type: ignore[no-redef] -- agent.model.Event's fields
        kind: str
        subject: str
        mono_ns: int
        first_mono_ns: int
        fields: dict = field(default_factory=dict)
        source: str = ""

log = logging.getLogger("swarm_agent")

ABSENT_RETRY_S = 60.0
BACKOFF_S = 1.0
BACKOFF_MAX_S = 60.0
XID_REPEAT_S = 10.0
WAIT_SLICE_MS = 500       # longest NVML event wait: how soon a stop is noticed


class GpuSource:
    """NVML in a thread. `start(emit, call)` runs it (`call` hands a function to the
    loop thread: loop.call_soon_threadsafe), `stop()` ends it within WAIT_SLICE_MS;
    `status()`, `samples()` and `processes()` are safe from any thread."""

    def __init__(self, sample_s: float = 5.0, library: str | None = None,
                 proc: str = "/proc"):
        self.sample_s, self.library, self.proc = sample_s, library, proc
        self._lock = threading.Lock()
        self._state = {"state": "starting", "reason": "NVML not opened yet"}
        self._samples: dict[str, Sample] = {}
        self._procs: dict[tuple[str, int], dict] = {}      # (uuid, pid) -> latest record
        self._seen: dict[tuple[str, int], int | None] = {}  # (uuid, pid) -> start ticks
        self._throttle: dict[str, int] = {}
        self._dbe: dict[str, int] = {}
        self._xid_at: dict[tuple[str, int], float] = {}
        self._xid_held: dict[tuple[str, int], int] = {}
        self._util_seen: dict[str, int] = {}    # GPU uuid -> newest utilisation sample (us)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.driver = ""
        self.sample_cpu_s = 0.0          # thread CPU time spent sampling
        self.sample_count = 0
        self.xid_count: dict[tuple[str, int], int] = {}
        self.last_xid: dict[str, int] = {}

    # -- what the agent reads -----------------------------------------------------------

    def status(self) -> dict[str, str]:
        with self._lock:
            return dict(self._state)

    def samples(self) -> list[Sample]:
        with self._lock:
            return list(self._samples.values())

    def processes(self) -> list[dict]:
        """The processes on the GPUs at the last sample, with their identities."""
        with self._lock:
            return [dict(p) for p in self._procs.values()]

    def xids(self) -> tuple[dict[tuple[str, int], int], dict[str, int]]:
        """(XIDs seen per (GPU uuid, XID), the last XID per GPU uuid), copies."""
        with self._lock:
            return dict(self.xid_count), dict(self.last_xid)

    def _set_state(self, state: str, reason: str) -> None:
        with self._lock:
            changed = self._state.get("state") != state or self._state.get("reason") != reason
            self._state = {"state": state, "reason": reason}
        if changed:
            (log.info if state == "loaded" else log.warning)(
                f"GPU source {state}", extra={"reason": reason})

    # -- the thread ---------------------------------------------------------------------

    def start(self, emit: Callable[[Event], None], call: Callable) -> None:
        self._emit = lambda e: call(emit, e)
        self._thread = threading.Thread(target=self._run, name="gpu-source", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    async def run(self, emit: Callable[[Event], None]) -> None:
        """The agent's task: start the thread, stop it when cancelled."""
        loop = asyncio.get_running_loop()
        self.start(emit, loop.call_soon_threadsafe)
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.to_thread(self.stop)

    def _run(self) -> None:
        backoff = BACKOFF_S
        while not self._stop.is_set():
            nvml = Nvml(self.library)
            try:
                nvml.open()
                self.driver = nvml.driver
                self._set_state("loaded", f"{len(nvml.devices)} GPU(s), driver {nvml.driver}")
                backoff = BACKOFF_S
                self._watch(nvml)
            except Absent as e:
                nvml.close()
                self._set_state("absent", str(e))
                self._stop.wait(ABSENT_RETRY_S)
            except NvmlFailure as e:
                nvml.close()
                self._set_state("degraded", f"{e}; retrying in {backoff:.0f} s")
                self._stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
            except Exception as e:   # noqa: BLE001 -- the source must never take the agent down
                nvml.close()
                log.exception("GPU source failed")
                self._set_state("degraded", f"{type(e).__name__}: {e}; retrying in "
                                f"{backoff:.0f} s")
                self._stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
        with self._lock:
            self._state = {"state": "stopped", "reason": "the agent is stopping"}

    def _watch(self, nvml: Nvml) -> None:
        """Sample every sample_s; in between, wait for NVML events (NvmlFailure out)."""
        next_at = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_at:
                self.sample_once(nvml)
                next_at = now + self.sample_s
            left_ms = max(1, min(WAIT_SLICE_MS, int((next_at - time.monotonic()) * 1000)))
            got = nvml.wait_event(left_ms)
            if got is None and not nvml.has_events:
                self._stop.wait(left_ms / 1000)
            elif got is not None:
                self._on_nvml_event(*got)

    def sample_once(self, nvml: Nvml) -> None:
        cpu0 = time.thread_time()
        samples, procs, usage = {}, {}, {}
        for d in nvml.devices:
            s = nvml.sample(d)
            samples[d.uuid] = s
            listed = nvml.processes(d)
            util = self._process_util(nvml, d) if listed else ({}, 0)
            for pid, used, kind in listed:
                procs[(d.uuid, pid)] = rec = self._process(d, pid, used, kind)
                _add_usage(usage, rec, d, used, None if util is None else util[0].get(pid, 0))
            self._health(d, s)
        with self._lock:
            self._samples, self._procs = samples, procs
        self._seen = {k: v for k, v in self._seen.items() if k in procs}
        for cgroup, u in usage.items():
            gpus, pids = sorted(u.pop("gpus")), sorted(u.pop("pids"))
            self._event("gpu.usage", f"cgroup:{cgroup}", {
                **u, "gpu_indexes": [i for i, _ in gpus], "gpu_uuids": [g for _, g in gpus],
                "pids": pids, "window_ns": int(self.sample_s * 1e9)})
        self.sample_cpu_s += time.thread_time() - cpu0
        self.sample_count += 1

    def _process_util(self, nvml: Nvml, d: Device) -> tuple[dict[int, int], int] | None:
        """Per-process SM utilisation on `d` since the last sample (None: not answered)."""
        since = self._util_seen.get(d.uuid, int((time.time() - self.sample_s) * 1e6))
        got = nvml.process_util(d, since)
        if got is not None:
            self._util_seen[d.uuid] = got[1]
        return got

    # -- events -------------------------------------------------------------------------

    def _event(self, kind: str, subject: str, fields: dict) -> None:
        now = time.monotonic_ns()
        self._emit(Event(kind=kind, subject=subject, mono_ns=now, first_mono_ns=now,
                         fields=fields, source="gpu"))

    @staticmethod
    def _gpu_fields(d: Device | Sample) -> dict:
        return {"gpu_index": d.index, "gpu_uuid": d.uuid, "gpu_name": d.name}

    def _process(self, d: Device, pid: int, used: int | None, kind: str) -> dict:
        key = (d.uuid, pid)
        known = self._procs.get(key) if key in self._seen else None
        if known is not None and gpuproc.start_ticks(pid, self.proc) == self._seen[key]:
            return {**known, "used_memory_bytes": used}
        record = {**self._gpu_fields(d), "process_type": kind, "used_memory_bytes": used,
                  **gpuproc.identify(pid, self.proc)}
        self._seen[key] = record.get("start_ticks")
        self._event("gpu.process", f"pid:{pid}", record)
        return record

    def _health(self, d: Device, s: Sample) -> None:
        if s.ecc_dbe_volatile is not None:
            before = self._dbe.get(d.uuid)
            self._dbe[d.uuid] = s.ecc_dbe_volatile
            new = s.ecc_dbe_volatile - (before if before is not None else 0)
            if new > 0:   # the first sample reports errors from before the agent started too
                self._event("gpu.ecc", f"gpu:{d.uuid}", {**self._gpu_fields(d), "dbe_new": new,
                            "ecc_dbe_volatile": s.ecc_dbe_volatile})
        if s.throttle_bits is not None:
            before = self._throttle.get(d.uuid, 0)
            self._throttle[d.uuid] = s.throttle_bits
            if s.throttle_bits != before:
                self._event("gpu.throttle", f"gpu:{d.uuid}", {
                    **self._gpu_fields(d), "reasons": reason_names(s.throttle_bits & ~before),
                    "active": reason_names(s.throttle_bits), "throttle_bits": s.throttle_bits})

    def _on_nvml_event(self, d: Device | None, etype: int, data: int) -> None:
        if d is None:
            return
        if etype & XID_EVENT:
            key = (d.uuid, data)
            with self._lock:
                self.xid_count[key] = self.xid_count.get(key, 0) + 1
                self.last_xid[d.uuid] = data
            now = time.monotonic()
            if now - self._xid_at.get(key, -XID_REPEAT_S) < XID_REPEAT_S:
                self._xid_held[key] = self._xid_held.get(key, 0) + 1
                return
            self._xid_at[key] = now
            self._event("gpu.xid", f"gpu:{d.uuid}", {**self._gpu_fields(d), "xid": data,
                        "repeats": self._xid_held.pop(key, 0)})
        elif etype & DBE_EVENT:
            self._event("gpu.ecc", f"gpu:{d.uuid}", {**self._gpu_fields(d), "dbe_new": 1,
                        "ecc_dbe_volatile": self._dbe.get(d.uuid)})


def _add_usage(usage: dict, rec: dict, d: Device, used: int | None, util: int | None) -> None:
    """Count one process's sample to its cgroup's gpu.usage (a process whose identity
    could not be read is nobody's: its gpu.process event says so)."""
    cgroup = rec.get("cgroup") if rec.get("resolved") else None
    if cgroup is None:
        return
    u = usage.setdefault(cgroup, {"cgroup": cgroup, "container": rec.get("container_id") or "",
                                  "gpu_util": 0, "gpu_memory_bytes": 0, "util_known": True,
                                  "gpus": set(), "pids": set()})
    u["gpu_memory_bytes"] += used or 0
    u["gpus"].add((d.index, d.uuid))
    u["pids"].add(rec["pid"])
    if util is None:
        u["util_known"] = False
    else:
        u["gpu_util"] += util


def snapshot(source: GpuSource) -> dict:
    """Status, per-GPU counters, processes and sampling cost, as JSON-ready data."""
    per_sample = source.sample_cpu_s / source.sample_count if source.sample_count else None
    return {"gpu": source.status(), "driver": source.driver,
            "gpus": [asdict(s) for s in source.samples()], "processes": source.processes(),
            "xids": {f"{u}/{x}": n for (u, x), n in source.xids()[0].items()},
            "sampling": {"samples": source.sample_count, "cpu_s": round(source.sample_cpu_s, 6),
                         "cpu_s_per_sample": per_sample}}


if __name__ == "__main__":
    from agent.sources.gpumain import main

    raise SystemExit(main())
