"""GPU metrics under the names and labels of NVIDIA's DCGM exporter where the meaning is
the same, so operators' dashboards and alerts work unchanged: labels gpu (index), UUID,
device (nvidia<index>), modelName, Hostname. Values come from the GPU source's last
sample (agent/sources/gpu.py), read at scrape time; a counter a GPU does not support
is left out for that GPU, never reported as 0.

All DCGM names are gauges, as the exporter's own output types most of them and as
prometheus_client would append `_total` to a counter's name; the agent's own GPU
metrics (swarm_agent_gpu_*) use the usual types.
"""
from __future__ import annotations

import socket
from typing import Any, Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "swarm_agent"
MIB = 1 << 20
# DCGM name -> (help, sample field, scale)
DCGM = {
    "DCGM_FI_DEV_GPU_UTIL": ("GPU utilization (in %).", "util_gpu", 1),
    "DCGM_FI_DEV_MEM_COPY_UTIL": ("Memory utilization (in %).", "util_mem", 1),
    "DCGM_FI_DEV_FB_USED": ("Framebuffer memory used (in MiB).", "mem_used_bytes", 1 / MIB),
    "DCGM_FI_DEV_FB_TOTAL": ("Framebuffer memory total (in MiB).", "mem_total_bytes", 1 / MIB),
    "DCGM_FI_DEV_GPU_TEMP": ("GPU temperature (in C).", "temp_c", 1),
    "DCGM_FI_DEV_POWER_USAGE": ("Power draw (in W).", "power_w", 1),
    "DCGM_FI_DEV_SM_CLOCK": ("SM clock frequency (in MHz).", "sm_clock_mhz", 1),
    "DCGM_FI_DEV_MEM_CLOCK": ("Memory clock frequency (in MHz).", "mem_clock_mhz", 1),
    "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS": ("Current clock throttle reasons (bitmask).",
                                           "throttle_bits", 1),
    "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": ("Total number of double-bit volatile ECC errors.",
                                      "ecc_dbe_volatile", 1),
}
LABELS = ["gpu", "UUID", "device", "modelName", "Hostname"]
STATES = ("starting", "loaded", "absent", "degraded", "disabled", "stopped")


class GpuCollector:
    """`read()` gives {"state": {...}, "gpus": [sample dicts], "last_xid": {uuid: xid},
    "xid_count": {(uuid, xid): n}, "processes": {uuid: n}, "samples": n,
    "sample_cpu_s": s} (agent.daemon.Agent.gpu_metrics)."""

    def __init__(self, read: Callable[[], dict[str, Any]]):
        self._read = read
        self._host = socket.gethostname()

    def collect(self):
        r = self._read()
        gpus = r.get("gpus", [])
        labels = {g["uuid"]: [str(g["index"]), g["uuid"], f"nvidia{g['index']}", g["name"],
                              self._host] for g in gpus}
        for name, (text, key, scale) in DCGM.items():
            fam = GaugeMetricFamily(name, text, labels=LABELS)
            for g in gpus:
                if g.get(key) is not None:
                    fam.add_metric(labels[g["uuid"]], g[key] * scale)
            yield fam
        free = GaugeMetricFamily("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).",
                                 labels=LABELS)
        xid = GaugeMetricFamily("DCGM_FI_DEV_XID_ERRORS",
                                "Value of the last XID error encountered.", labels=LABELS)
        procs = GaugeMetricFamily(f"{PREFIX}_gpu_processes",
                                  "Processes NVML lists on the GPU at the last sample",
                                  labels=LABELS)
        for g in gpus:
            lab = labels[g["uuid"]]
            if g.get("mem_total_bytes") is not None and g.get("mem_used_bytes") is not None:
                free.add_metric(lab, (g["mem_total_bytes"] - g["mem_used_bytes"]) / MIB)
            xid.add_metric(lab, r.get("last_xid", {}).get(g["uuid"], 0))
            procs.add_metric(lab, r.get("processes", {}).get(g["uuid"], 0))
        yield from (free, xid, procs)
        xids = CounterMetricFamily(f"{PREFIX}_gpu_xid_events",
                                   "XID events NVML reported, per GPU and XID",
                                   labels=["UUID", "xid"])
        for (uuid, code), n in r.get("xid_count", {}).items():
            xids.add_metric([uuid, str(code)], n)
        yield xids
        state = GaugeMetricFamily(f"{PREFIX}_gpu_source_state",
                                  "1 for the GPU source's state (loaded, absent, degraded...)",
                                  labels=["state"])
        now = r.get("state", {}).get("state", "disabled")
        for s in STATES:
            state.add_metric([s], int(s == now))
        yield state
        yield CounterMetricFamily(f"{PREFIX}_gpu_samples", "GPU samples taken",
                                  value=r.get("samples", 0))
        yield CounterMetricFamily(f"{PREFIX}_gpu_sample_cpu_seconds",
                                  "CPU time the GPU source's thread spent sampling",
                                  value=r.get("sample_cpu_s", 0.0))
