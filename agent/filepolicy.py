"""The daemon's file policy: `policy.files` rules enforced by fanotify (agent/enforce/fanotify.py).

Every open of a marked file waits until the agent's answering thread has judged its opener:
a process whose cgroup (read from /proc/PID/cgroup while its open is blocked; the kernel
sets it, the process cannot) lies in a rule's cgroup subtree, or names one of its
containers, gets EPERM. Everyone else -- the operators' shells in /user.slice, the host's
services, the agent and its own cgroup -- is allowed, and so is every open the agent fails
to judge.

Each denial counts per rule (status, the Prometheus counter
swarm_agent_policy_denied_total{policy_kind="files"}) and becomes a `policy.file_denied` event,
rate-limited per rule and opening cgroup: the first at once, then one per REPORT_EVERY_S
with the opens since. The refusal itself never waits for that: it was the open's answer.
"""
from __future__ import annotations

import asyncio
import fnmatch
import logging
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable


from agent import cgroupview
from agent.config import Config
from agent.enforce.fanotify import FileGate, Unsupported
from agent.enforce.process import host_pid_namespace
from agent.gpugrant import container_of, within
from agent.model import Event

KIND = "policy.file_denied"
REPORT_EVERY_S = 10.0    # per rule and opening cgroup, after its first report
TICK_S = 1.0             # how often pending reports are looked at
RESCAN_S = 5.0           # new files, subdirectories and paths under the rules get marked
MAX_SCOPES = 4096        # (rule, cgroup) pairs remembered; more share one overflow entry
OVERFLOW = "(other workloads)"
SWITCH_INTERVAL_S = 0.0005

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    opens: int = 0              # since the last report
    total: int = 0
    first_mono_ns: int = 0
    reported_at: float = 0.0    # monotonic s; 0: never
    pid: int = 0
    exe: str = ""
    path: str = ""


def _covers(cgroup: str, rule_cgroup: str) -> bool:
    """Whether `cgroup` lies in the subtree `rule_cgroup` names: a path, or a glob any of
    `cgroup`'s ancestors (or itself) matches whole ("/system.slice/docker-*.scope")."""
    if "*" not in rule_cgroup:
        return within(cgroup, rule_cgroup)
    parts = cgroup.split("/")
    return any(fnmatch.fnmatchcase("/".join(parts[:i]), rule_cgroup)
               for i in range(2, len(parts) + 1))


def cgroup_of(pid: int) -> str | None:
    """The cgroup v2 path of `pid` as the host names it (agent.cgroupview)."""
    return cgroupview.cgroup_of(pid)


class FilePolicy:
    """Owns the gate; `emit` takes events on the loop thread. Never raises for the host's
    lack of fanotify: status says degraded and why."""

    def __init__(self, cfg: Config, agent_cgroup: str | None = None):
        self.rules = cfg.policy.files
        # The agent's own cgroup is never refused (like egress): its CLI run by
        # `kubectl exec` in its pod, under a rule over /kubepods.slice, reads its config.
        self.agent_cgroup = agent_cgroup if agent_cgroup not in (None, "/") else None
        self.state, self.reason = ("off", "no policy.files rules") if not self.rules else ("starting", "")
        self.denied: Counter[str] = Counter()
        self._host_pids = host_pid_namespace()
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._emit: Callable[[Event], None] | None = None
        self.gate: FileGate | None = None

    def start(self, loop: asyncio.AbstractEventLoop, emit: Callable[[Event], None],
              dry_run: bool = False) -> None:
        if not self.rules:
            return
        if dry_run:     # a refused open cannot be recorded instead of done
            self.state, self.reason = "off", "dry run: opens are not refused"
            return
        self._loop, self._emit = loop, emit
        try:
            self.gate = FileGate([(r.name, r.paths) for r in self.rules], self._judge, self._on_denied)
        except OSError as e:    # Unsupported: no fanotify here; else no fd for it
            self.state, self.reason = "degraded", e.strerror if isinstance(e, Unsupported) \
                else f"fanotify: {e.strerror}"
            log.error("file policy not enforced", extra={"reason": self.reason})
            return
        self.gate.start()
        # A waiting open is answered once the answering thread gets the interpreter: a
        # busy loop thread gives it up after the switch interval (5 ms by default). The
        # other threads mostly sleep, so a shorter interval costs little.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        self._judge_state()
        log.info("file policy enforced", extra={"marks": self.gate.marks()})

    def close(self) -> None:
        if self.gate is not None:
            self.gate.close()
            self.gate = None
            self.state, self.reason = "stopped", ""

    # -- on the answering thread: quick, and an exception means allow ------------------------

    def _judge(self, index: int, pid: int) -> str | None:
        rule = self.rules[index]
        cgroup = cgroup_of(pid)
        if cgroup is None or cgroup == self.agent_cgroup:
            return None
        if any(_covers(cgroup, c) for c in rule.cgroups):
            return cgroup
        if rule.containers and container_of(cgroup) in rule.containers:
            return cgroup
        return None

    def _on_denied(self, index: int, pid: int, cgroup: str, exe: str, path: str) -> None:
        name = self.rules[index].name
        now_ns = time.monotonic_ns()
        with self._lock:
            self.denied[name] += 1
            key = (name, cgroup)
            if key not in self._pending and len(self._pending) >= MAX_SCOPES \
                    and not self._evict_idle():
                key = (name, OVERFLOW)
            p = self._pending.setdefault(key, _Pending())
            if not p.opens:
                p.first_mono_ns = now_ns
            p.opens += 1
            p.total += 1
            p.pid, p.exe, p.path = pid, exe, path
            first = p.reported_at == 0.0
        if first and self._loop is not None:
            self._loop.call_soon_threadsafe(self.flush)    # the first at once

    def _evict_idle(self) -> bool:
        """Forget the scope reported longest ago with nothing pending (a short job's cgroup
        long gone, most likely); False when every scope has opens waiting for their
        report. Under self._lock."""
        idle = [(p.reported_at, k) for k, p in self._pending.items()
                if not p.opens and p.reported_at]
        if not idle:
            return False
        del self._pending[min(idle)[1]]
        return True

    # -- on the loop ---------------------------------------------------------------------

    def flush(self, now_s: float | None = None) -> None:
        """Emit the events that are due: a scope's first denial, then its opens since the
        last report once per REPORT_EVERY_S."""
        now_s = time.monotonic() if now_s is None else now_s
        due: list[Event] = []
        with self._lock:
            for (name, cgroup), p in self._pending.items():
                if p.opens and (p.reported_at == 0.0 or now_s - p.reported_at >= REPORT_EVERY_S):
                    due.append(self._event(name, cgroup, p))
                    p.opens, p.reported_at = 0, now_s
        for event in due:
            if self._emit is not None:
                self._emit(event)

    @staticmethod
    def _event(name: str, cgroup: str, p: _Pending) -> Event:
        fields: dict[str, Any] = {"policy": name, "cgroup": cgroup,
                                  "container_id": container_of(cgroup), "pid": p.pid,
                                  "exe": p.exe, "path": p.path, "opens": p.opens,
                                  "opens_total": p.total}
        return Event(KIND, f"file:{name}:cgroup:{cgroup}", time.monotonic_ns(), p.first_mono_ns,
                     fields, source="fanotify")

    async def watch(self) -> None:
        """Report pending denials every TICK_S and re-mark the configured files (one
        replaced by a new inode is covered again within a tick); mark what appeared in
        the directories every RESCAN_S."""
        next_scan = time.monotonic() + RESCAN_S
        while True:
            await asyncio.sleep(TICK_S)
            self.flush()
            if self.gate is None:
                continue
            full = time.monotonic() >= next_scan
            if full:
                next_scan = time.monotonic() + RESCAN_S
            await asyncio.to_thread(self.gate.rescan, not full)
            self._judge_state()

    # -- status --------------------------------------------------------------------------

    def _judge_state(self) -> None:
        gate = self.gate
        if gate is None:
            return
        if gate.failed:
            self.state, self.reason = "degraded", gate.failed
            return
        if not self._host_pids:
            # fanotify gives the opener's pid in the listener's pid namespace: from
            # another, every opener is pid 0 and allowed
            self.state, self.reason = "degraded", (
                "the agent does not see the host's pids (run it in the host's pid "
                "namespace: hostPID): openers cannot be told apart, nothing is refused")
            return
        gaps = [f"{g.name}: {u}" for g in gate.rules for u in g.uncovered]
        missing = [f"{g.name}: {m}" for g in gate.rules for m in g.missing]
        if gaps:
            self.state, self.reason = "degraded", "; ".join(gaps[:5])
        else:     # a path that is not there (yet) is marked by the rescan after it appears
            self.state = "loaded"
            self.reason = f"not present (marked when they appear): {'; '.join(missing[:5])}" \
                if missing else ""

    def status(self) -> dict[str, Any]:
        self._judge_state()
        gate = self.gate
        rules = {}
        for i, r in enumerate(self.rules):
            g = gate.rules[i] if gate is not None else None
            rules[r.name] = {"paths": list(r.paths), "cgroups": list(r.cgroups),
                             "containers": list(r.containers), "denied": self.denied[r.name],
                             "marks": len(g.marked) if g else 0,
                             "missing": list(g.missing) if g else [],
                             "uncovered": list(g.uncovered) if g else []}
        return {"state": self.state, "reason": self.reason,
                "marks": gate.marks() if gate is not None else 0,
                "answered": gate.answered if gate is not None else 0,
                "allowed_on_error": gate.allowed_on_error if gate is not None else 0,
                "rules": rules}

    def state_reason(self) -> dict[str, str]:
        """As a component in `status` (the control API carries state and reason)."""
        self._judge_state()
        return {"state": self.state, "reason": self.reason}

    def counters(self) -> dict[str, int]:
        gate = self.gate
        return {"files.denied": sum(self.denied.values()),
                **{f"files.denied.{r.name}": self.denied[r.name] for r in self.rules},
                "files.marks": gate.marks() if gate is not None else 0,
                "files.answered": gate.answered if gate is not None else 0,
                "files.allowed_on_error": gate.allowed_on_error if gate is not None else 0,
                "files.missing": sum(len(g.missing) for g in gate.rules) if gate else 0}
