"""The anomaly engine in the daemon: opened from its state file, saved atomically
(tmp + fsync + rename) every `anomaly.save_every_s` and at stop. A corrupt file, one of
an unknown format or of another feature set is moved aside (`<name>.bad-<time>`), the
engine starts afresh (warm-up again) and status says why. The engine itself is pure
(agent.detect.anomaly); this is its I/O."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from agent.detect.anomaly import AnomalyEngine

log = logging.getLogger("swarm_agent")
STATE_FILE = "anomaly-state.json"
MAX_STATE_BYTES = 64 << 20


def state_path(cfg) -> Path:
    return Path(cfg.anomaly.state_path) if cfg.anomaly.state_path else \
        Path(cfg.state_dir) / STATE_FILE


def known_networks(cfg) -> tuple[str, ...]:
    """Destinations never scored as beacons: the mesh control plane and management."""
    return (*cfg.allowlist.mesh, *cfg.allowlist.management)


def open_engine(cfg, node: str, ignore: tuple[str, ...] = ()) -> AnomalyEngine:
    """The engine from its state file, or a fresh one (the reason in status)."""
    path = state_path(cfg)
    known = known_networks(cfg)
    now_mono, now_wall = time.monotonic_ns(), time.time()
    note = "fresh start (no saved state)"
    try:
        if path.stat().st_size > MAX_STATE_BYTES:
            raise ValueError(f"the anomaly state is larger than {MAX_STATE_BYTES >> 20} MiB")
        with open(path, encoding="utf-8") as f:
            snap = json.load(f)
        eng = AnomalyEngine.restore(cfg.anomaly, node, snap, now_mono, now_wall, known=known)
        eng.ignore_cgroups = (*eng.ignore_cgroups, *_cgroups(ignore))
        return eng
    except FileNotFoundError:
        pass
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        aside = path.with_name(f"{path.name}.bad-{int(now_wall)}")
        try:
            os.replace(path, aside)
            note = f"fresh start: {reason}; the old state was moved to {aside}"
        except OSError as e2:
            note = f"fresh start: {reason}; the old state could not be moved aside ({e2.strerror})"
        log.error("anomaly state not restored; warm-up starts again", extra={"reason": note})
    eng = AnomalyEngine(cfg.anomaly, node, known=known)
    eng.ignore_cgroups = (*eng.ignore_cgroups, *_cgroups(ignore))
    eng.restored = note
    return eng


def _cgroups(paths: tuple[str, ...]) -> tuple[str, ...]:
    """The agent's own cgroup, never the root one (that would be every workload)."""
    return tuple(p.rstrip("/") for p in paths if p.rstrip("/"))


def snapshot_text(eng: AnomalyEngine) -> str:
    """The state to write, taken on the loop thread (consistent between two events)."""
    return json.dumps(eng.snapshot(time.time()), separators=(",", ":"))


def write(path: Path, text: str) -> int:
    """Write atomically: a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        data = text.encode()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return len(data)


async def save(eng: AnomalyEngine, cfg, saved: dict[str, Any], counters) -> None:
    """Snapshot on the loop thread (consistent between two events), write on a thread; a
    failure is logged, counted (anomaly.save_failed) and in status; the agent goes on."""
    saved["at"] = time.time()
    text = snapshot_text(eng)
    try:
        n = await asyncio.to_thread(write, state_path(cfg), text)
    except OSError as e:
        saved["error"] = e.strerror or str(e)
        counters["anomaly.save_failed"] += 1
        log.error("anomaly state not saved", extra={"reason": saved["error"]})
        return
    saved.update(bytes=n, error="")


def save_now(eng: AnomalyEngine, cfg, saved: dict[str, Any]) -> None:
    """At stop, on the loop thread."""
    try:
        saved["bytes"] = write(state_path(cfg), snapshot_text(eng))
    except (OSError, ValueError) as e:
        log.error("anomaly state not saved at stop", extra={"reason": str(e)})


class AnomalyCollector:
    """Prometheus view of the engine (registered on the agent's metrics registry):
    windows scored, findings and shadow findings per detector, state bytes."""

    def __init__(self, read):
        self._read = read

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        st: dict[str, Any] = self._read() or {}
        prefix = "swarm_agent_anomaly"
        windows = CounterMetricFamily(f"{prefix}_windows", "Windows scored per detector",
                                      labels=["detector"])
        hits = CounterMetricFamily(f"{prefix}_findings",
                                   "Findings per detector (mode: alerting or shadow)",
                                   labels=["detector", "mode"])
        alerting = GaugeMetricFamily(f"{prefix}_alerting",
                                     "1 when the detector alerts, 0 in shadow mode (warm-up)",
                                     labels=["detector"])
        for det, d in st.get("detectors", {}).items():
            windows.add_metric([det], d.get("windows", 0))
            hits.add_metric([det, "alerting"], d.get("hits", 0))
            hits.add_metric([det, "shadow"], d.get("shadow_hits", 0))
            alerting.add_metric([det], 1 if d.get("mode") == "alerting" else 0)
        yield from (windows, hits, alerting)
        yield GaugeMetricFamily(f"{prefix}_state_bytes", "Size of the saved model state",
                                value=st.get("state_bytes", 0))
        yield GaugeMetricFamily(f"{prefix}_workloads", "Workloads tracked",
                                value=st.get("workloads", 0))
