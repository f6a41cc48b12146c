"""What the agent shows of itself: `status` (the CLI, the control API, the mesh
heartbeat), the rule listing, and what the metrics read at each scrape. The base class of
agent.daemon.Agent: reads the agent's parts, changes nothing.
"""
from __future__ import annotations

import os
import socket
import time
from collections import Counter

from agent import __version__


def netns_id() -> str:
    """The inode of this process's network namespace, to tell agents apart."""
    return os.readlink("/proc/self/ns/net")


class AgentView:
    """Read-only views of agent.daemon.Agent's state (the attributes it sets)."""

    def gpu_status(self) -> dict[str, str]:
        if self.gpu is None:
            return {"state": "disabled", "reason": "gpu.enabled is false"}
        return self.gpu.status()

    def gpu_metrics(self) -> dict:
        """What the GPU metrics read at each scrape (agent.report.gpumetrics)."""
        from dataclasses import asdict

        if self.gpu is None:
            return {"state": self.gpu_status()}
        per_gpu = Counter(p.get("gpu_uuid") for p in self.gpu.processes())
        xid_count, last_xid = self.gpu.xids()
        return {"state": self.gpu.status(), "gpus": [asdict(s) for s in self.gpu.samples()],
                "last_xid": last_xid, "xid_count": xid_count,
                "processes": dict(per_gpu), "samples": self.gpu.sample_count,
                "sample_cpu_s": self.gpu.sample_cpu_s}

    def policy_denied(self) -> dict[tuple[str, str], int]:
        """What kernel-enforced policies refused so far, per policy rule (metrics)."""
        out: dict[tuple[str, str], int] = {}
        for scope, n in self.egress_meter.total.items():
            out[("egress", scope.policy)] = out.get(("egress", scope.policy), 0) + n
        out.update({("files", name): n for name, n in self.files.denied.items()})
        return out

    def losses(self) -> int:
        """Events the probes' kernels could not queue."""
        return sum(p.losses() for p in (self.probe, self.proc_probe,
                                        self.activity_probe) if p is not None)

    def unparsed(self) -> dict[str, int]:
        """Packets the network probe's parser could not follow, by reason."""
        return self.probe.unparsed() if self.probe is not None else {}

    def queue_status(self) -> dict:
        """The event queue: depth now, its high-water mark, capacity, drops by kind (the
        urgent lane's under "urgent")."""
        return self.queue.status()

    def queue_drops(self) -> dict[str, int]:
        """Drops by lane and kind ("ordinary.proc.exec", "urgent.proc.exec")."""
        return {**{f"ordinary.{k}": n for k, n in self.queue.dropped.items()},
                **{f"urgent.{k}": n for k, n in self.queue.urgent.dropped.items()}}

    def status(self) -> dict:
        if self.probe is not None:
            self.probe_status = self.probe.status()
        if self.proc_probe is not None:
            self.proc_status = self.proc_probe.status()
        if self.activity_probe is not None:
            self.activity_status = self.activity_probe.status()
        feedback = self.feedback_status()
        return {
            "version": __version__,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "netns": netns_id(),
            "started_at": self.started_at,
            "updated_at": time.time(),
            "ready": self.ready,
            "dry_run": self.cfg.dry_run,
            "probes": {**self.probe_status, **self.proc_status,
                       **self.activity_status, **self._storage_status(),
                       "gpu": self.gpu_status(), "file_policy": self.files.state_reason(),
                       **({"gpu_authorization": self.gpu_guard.status()}
                          if getattr(self, "gpu_guard", None) else {}),
                       **self._anomaly_probe()},
            "gpu": {**self.gpu_status(), "gpus": len(self.gpu.samples()) if self.gpu else 0,
                    "processes": len(self.gpu.processes()) if self.gpu else 0},
            "storage": self.store.health.as_dict() if getattr(self, "store", None) else {},
            "ringbuf_losses": self.losses(),
            "queue": self.queue_status(),
            # What the packet parser could not follow: in `status` and the control API.
            "counters": {**self.counters,
                         **{f"events.dropped.{k}": n for k, n in self.queue.dropped.items()},
                         **{f"events.dropped_urgent.{k}": n
                            for k, n in self.queue.urgent.dropped.items()},
                         # The control API carries counters, not the queue dict.
                         "queue.depth": len(self.queue), "queue.depth_max": self.queue.depth_max,
                         "queue.capacity": self.queue.capacity,
                         **{f"net.unparsed.{why}": n for why, n in self.unparsed().items()},
                         **self._egress_counters(), **self.files.counters(),
                         **(self.investigator.status()
                            if getattr(self, "investigator", None) else {}),
                         # The control API carries counters: false positives per rule too.
                         **{f"false_positives.{rule}": c["false_positives"]
                            for rule, c in (feedback.get("rules") or {}).items()
                            if c["false_positives"]},
                         **self._anomaly_counters(), **self._fleet_counters()},
            "last_drift_at": self.last_drift_at,
            # The egress policy in force (config policy.egress, read at start only).
            "egress": self.enforcer.egress_status() if getattr(self, "enforcer", None) else {},
            "files": self.files.status(),     # the file policy (config policy.files, at start)
            "rules": [f"{r.id}@{r.version}" for r in self.rules],
            "ruleset": self.rulebook.status(),
            "reporting": self.reporting.status() if getattr(self, "reporting", None) else {},
            # Per rule or model: hits, incidents marked false positive, findings suppressed.
            "feedback": feedback,
            "anomaly": self.anomaly_status(),
            "fleet": self.fleet_status() if hasattr(self, "fleet_status") else {"enabled": False},
        }

    def _fleet_counters(self) -> dict[str, int]:
        """The control API carries counters: the fleet's figures as fleet.* ones."""
        f = self.fleet_status() if hasattr(self, "fleet_status") else {}
        if not f.get("enabled"):
            return {}
        return {"fleet.connected": int(bool(f.get("connected"))), "fleet.seq": f.get("seq", 0),
                "fleet.lag": f.get("lag", 0), "fleet.in_force": f.get("in_force", 0),
                "fleet.applied": f.get("applied", 0), "fleet.snapshots": f.get("snapshots", 0),
                **{f"fleet.refused.{r}": n for r, n in (f.get("refused") or {}).items()}}

    def feedback_status(self) -> dict:
        """Live feedback records, and per rule ("id@version") its hits since start, the
        incidents marked false positive and the findings feedback kept back."""
        book = getattr(self, "feedback", None)
        if book is None:
            return {}
        per_rule = {rule: {"hits": 0, **c} for rule, c in book.counts().items()}
        for key, n in self.counters.items():
            if key.startswith("findings.") and key != "findings.failed":
                rule = key.removeprefix("findings.")
                per_rule.setdefault(rule, {"hits": 0, "false_positives": 0,
                                           "suppressed": 0})["hits"] = n
        return {"live_records": book.status()["live"], "rules": per_rule}

    def anomaly_status(self) -> dict:
        """The anomaly engine: per detector mode (shadow|alerting), windows, threshold,
        hits, shadow hits; workloads tracked; the state file's size and last save."""
        eng = getattr(self, "anomaly", None)
        if eng is None:
            return {"enabled": False}
        saved = getattr(self, "anomaly_saved", {})
        return {"enabled": True, **eng.status(), "state_bytes": saved.get("bytes", 0),
                "saved_at": saved.get("at", 0.0), "save_error": saved.get("error", "")}

    def _anomaly_counters(self) -> dict[str, int]:
        """The engine's figures as counters (what the control API's Status carries)."""
        st = self.anomaly_status()
        if not st.get("enabled"):
            return {}
        out = {"anomaly.state_bytes": int(st["state_bytes"]), "anomaly.workloads": st["workloads"]}
        for det, d in st["detectors"].items():
            out[f"anomaly.{det}.alerting"] = int(d["mode"] == "alerting")
            for k in ("windows", "hits", "shadow_hits", "deduplicated"):
                out[f"anomaly.{det}.{k}"] = int(d[k])
        return out

    def _anomaly_probe(self) -> dict[str, dict[str, str]]:
        """The engine as one component line: warming up (shadow) or alerting, and how its
        state was restored."""
        st = self.anomaly_status()
        if not st.get("enabled"):
            return {}
        modes = ", ".join(f"{k} {d['mode']}" for k, d in st["detectors"].items())
        err = f"; last save failed: {st['save_error']}" if st["save_error"] else ""
        return {"anomaly": {"state": "ok" if st["warm"] else "warming up",
                            "reason": f"{modes}; {st['restored']}{err}"}}

    def _egress_counters(self) -> dict[str, int]:
        """The egress policy in counters (what the control API carries): the scopes in
        force and the configured cgroups that do not exist (yet)."""
        if getattr(self, "enforcer", None) is None:
            return {}
        eg = self.enforcer.egress_status()
        return {"egress.scopes_enforced": sum(len(v) for v in eg.get("enforced", {}).values()),
                "egress.cgroups_waiting": len(eg.get("waiting", []))}

    def _storage_status(self) -> dict[str, dict[str, str]]:
        """Storage as one more component in `status` (state ok or degraded, and why)."""
        if getattr(self, "store", None) is None:
            return {}
        h = self.store.health
        if h.state == "ok":
            reason = "; ".join(h.recovered)
        else:
            reason = f"{h.reason}; state kept in memory, retried"
        return {"storage": {"state": h.state, "reason": reason}}

    def rule_listing(self) -> dict:
        """The rules in use with their hits, and hits of rules no longer in use."""
        rows = self._anomaly_rules()
        in_use = {f"{r['id']}@{r['version']}" for r in rows}
        rules = self.rulebook.listing(self.counters) + rows
        book = getattr(self, "feedback", None)
        counts = book.counts() if book is not None else {}
        for r in rules:
            c = counts.get(f"{r['id']}@{r['version']}", {})
            r["false_positives"] = c.get("false_positives", 0)
            r["suppressed"] = c.get("suppressed", 0)
        return {"ruleset": self.rulebook.status(),
                "rules": rules,
                "retired_hits": {k: n for k, n in self.rulebook.retired_hits(self.counters).items()
                                 if k not in in_use}}

    def _anomaly_rules(self) -> list[dict]:
        """The anomaly detectors in use, listed like rules (their findings are counted
        under the same findings.<id>@<version> counters)."""
        eng = getattr(self, "anomaly", None)
        if eng is None:
            return []
        from agent.detect.anomaly import MODEL_VERSION

        rows = []
        for det, d in eng.status()["detectors"].items():
            name = f"anomaly.{det}@{MODEL_VERSION}"
            rows.append({"id": f"anomaly.{det}", "version": MODEL_VERSION,
                         "class": "suspicious_activity", "severity": "medium",
                         "action": "investigate", "scope": "workload",
                         "description": f"anomaly detector {det} ({d['mode']})",
                         "source": "anomaly engine", "hits": self.counters.get(f"findings.{name}", 0),
                         "last_hit_at": self.rulebook.last_hit_at.get(name, 0.0)})
        return rows
