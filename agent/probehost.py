"""Opening the agent's sources (a part of agent.daemon.Agent): the network, process and
activity probes and the GPU source. A probe that cannot open leaves the agent running
without it, its state "failed" with the reason in status, never a failed start."""
from __future__ import annotations

import logging
from typing import Any, Callable

from agent.detect.rules import kernel_thresholds

log = logging.getLogger("swarm_agent")


class ProbeHost:
    """The source-opening methods of the agent."""

    def _open_source(self, name: str, what: str, make: Callable[[], Any]) -> Any | None:
        """`make()` opened, or None with {name: failed, reason} in status and a log line."""
        try:
            probe = make()
            probe.open()
        except (OSError, RuntimeError, ImportError) as e:
            reason = getattr(e, "strerror", None) or str(e)
            setattr(self, f"{'probe' if name == 'net' else name}_status",
                    {name: {"state": "failed", "reason": reason}})
            log.error(f"{what} unavailable", extra={"reason": reason})
            return None
        return probe

    def _open_probe(self) -> None:
        """The network probe. Without it the agent keeps enforcing and answering."""
        def make():
            from agent.sources.net import NetProbe

            return NetProbe(self.cfg.probes, list(self.cfg.interfaces),
                            kernel_thresholds(self.rules))
        probe = self._open_source("net", "network probe", make)
        if probe is not None:
            self.probe, self.probe_status = probe, probe.status()

    def _open_proc_probe(self) -> None:
        """The process probe (breach rules) beside the network probe, for the processes this
        agent owns (agent.sources.owners: its namespace's; the host agent's also those of
        namespaces without an agent). Without it the agent runs on, reported degraded."""
        def make():
            from agent.sources.proc import ProcProbe

            return ProcProbe(self.cfg)
        probe = self._open_source("proc", "process probe", make)
        if probe is not None:
            probe.set_exec_policy(self.detector.exec_needs)   # what the loaded rules need
            self.proc_probe, self.proc_status = probe, probe.status()

    def _open_activity_probe(self) -> None:
        """The activity probe (connections, listeners, bytes, execs: what the anomaly
        models learn from), for the same processes as the process probe. Off with
        probes.activity false; without it the agent runs on, reported degraded."""
        if not self.cfg.probes.activity:
            self.activity_status = {"activity": {"state": "disabled",
                                                 "reason": "probes.activity is false"}}
            return

        def make():
            from agent.sources.activity import ActivityProbe

            return ActivityProbe(self.cfg)
        probe = self._open_source("activity", "activity probe", make)
        if probe is not None:
            self.activity_probe, self.activity_status = probe, probe.status()

    def _open_gpu(self) -> None:
        """The GPU source (NVML in its own thread; agent.sources.gpu). Opening NVML happens
        in that thread: no driver, no GPU or a failing NVML never delays or stops the start."""
        if self.cfg.gpu.enabled:
            from agent.sources.gpu import GpuSource

            self.gpu = GpuSource(self.cfg.gpu.sample_s, self.cfg.gpu.nvml_library)
