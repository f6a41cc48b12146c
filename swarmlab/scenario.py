"""Attack scenarios against a real agent in a throw-away victim namespace.

One scenario run: a fresh Lab (attacker + victim namespaces), the agent started in the
victim with `ip netns exec VICTIM swarm-agent run`, an echo server on the victim, a
handshake probe from the attacker, then the attack. The result is a timeline on one clock
(CLOCK_MONOTONIC, shared by all namespaces): first packet, kernel event, detected (the
detector's decision), mitigated, attacker cut off, and whether the run is valid
(swarmlab.figures). Used by `swarm-agent demo`, the end-to-end tests and bench/attack_latency.py.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import agent
from agent.model import Mitigation, MitigationState
from agent.state.store import Store
from swarmlab import attacks, figures
from swarmlab.lab import Lab

SERVICE_PORT = 8080
NETWORK_RULES = Path(agent.__file__).resolve().parent / "rules" / "network.yaml"
READY_TIMEOUT_S = 60.0     # an agent is ready in a few seconds; this is for a loaded host
# Mitigations that were put in force at some point (not failed, not dry-run).
APPLIED_STATES = frozenset({MitigationState.ACTIVE, MitigationState.EXPIRED,
                            MitigationState.LIFTED})


@dataclass(frozen=True)
class Pattern:
    """An attack as the demo runs it and what the agent must do about it."""

    name: str
    attack: str
    v6: bool
    opts: dict[str, Any]
    rule: str
    kind: str                 # the MitigationKind expected
    description: str


PATTERNS: dict[str, Pattern] = {p.name: p for p in (
    # SYN counts and UDP rates are forgeable: the source is challenged, never blocked, and
    # its real owner (the handshake probe here) keeps connecting through the SYN proxy.
    Pattern("syn_flood", "syn_flood", False, {"duration_s": 4}, "net.syn_flood@2", "challenge",
            "SYN flood from one IPv4 source"),
    Pattern("syn_flood_v6", "syn_flood", True, {"duration_s": 4}, "net.syn_flood@2", "challenge",
            "SYN flood from one IPv6 source"),
    Pattern("udp_flood", "udp_flood", False, {"duration_s": 4}, "net.udp_flood@2", "challenge",
            "UDP flood from one IPv4 source"),
    # Below the SYN-flood rate, so the connection-rate rule is the one that answers.
    Pattern("conn_flood", "conn_flood", False, {"duration_s": 4, "rate": 120, "count": 480},
            "net.conn_flood@1", "rate_limit", "120 full TCP connections/s from one source"),
    # A connect scan is challenged at once, then blocked on the resets its completed
    # (cookie-answering) handshakes draw.
    Pattern("port_scan", "port_scan", False, {"ports": "1000-3000", "duration_s": 4},
            "net.connect_scan@1", "block_ip", "TCP connect scan of 2000 ports"),
    Pattern("port_scan_v6", "port_scan", True, {"ports": "1000-3000", "duration_s": 4},
            "net.connect_scan@1", "block_ip", "TCP connect scan of 2000 ports over IPv6"),
    Pattern("distributed_syn_flood", "distributed_syn_flood", False,
            {"duration_s": 4, "sources": 4000, "rate": 20000, "count": 80000},
            "net.distributed_syn_flood@2",
            "challenge_service", "SYN flood from 4000 spoofed sources at one service"),
)}


class AgentProcess:
    """`swarm-agent run` inside a namespace, with its config and state in a temp dir.

    start() returns once the agent logged that it is ready (and refuses an agent that
    ended up in this process's own network namespace: a test must never isolate the
    host); stop() sends SIGTERM and waits. The state dir survives stop() so a restart
    sees the same database.

    The process probe is host-global, so unless `extra_config` sets rules_file the agent
    gets only the network rules: breach rules would otherwise act on whatever else runs
    on the host (other tests' shells and BPF loads). Breach tests bring their own, scoped
    to processes they start (tests/integration/test_breach_e2e.py)."""

    def __init__(self, ns: str, workdir: Path, extra_config: str = ""):
        self.ns, self.workdir = ns, workdir
        self.config_path = workdir / "config.yaml"
        rules = "" if "rules_file:" in extra_config else f"rules_file: {NETWORK_RULES}\n"
        self.config_path.write_text(
            f"state_dir: {workdir}/state\nrun_dir: {workdir}/run\n{rules}{extra_config}")
        self.proc: subprocess.Popen[str] | None = None
        self.log_lines: list[str] = []
        self._drain: threading.Thread | None = None

    @property
    def db_path(self) -> Path:
        return self.workdir / "state" / "agent.db"

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        exe = Path(sys.executable).with_name("swarm-agent")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "agent.cli.main"]
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, *cmd, "run", "--config", str(self.config_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout_s
        first = len(self.log_lines)   # a restart must not see the last run's "ready"
        # One thread reads the log from the start: a select() on the pipe beside readline()
        # misses lines already in the reader's buffer (two log lines in one pipe read).
        # It keeps draining after: an agent that logs a lot (a finding a line) would block
        # on a full pipe and stop answering.
        self._drain = threading.Thread(target=self._read_log, args=(self.proc.stderr,), daemon=True)
        self._drain.start()
        while not any('"agent ready"' in line for line in self.log_lines[first:]):
            if time.monotonic() >= deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("agent did not become ready: " + "".join(self.log_lines[-5:]))
            time.sleep(0.02)
        if os.stat(f"/proc/{self.proc.pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino:
            self.stop()
            raise RuntimeError(f"the agent runs in this process's network namespace, not {self.ns}")

    def _read_log(self, stream) -> None:
        for line in stream:
            self.log_lines.append(line)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid   # `ip netns exec` execs the agent: same pid

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self._drain is not None:
            self._drain.join(5)
            self._drain = None
        elif self.proc.stderr:
            self.log_lines.extend(self.proc.stderr.read().splitlines(keepends=True))
        return self.proc.returncode

    def store(self) -> Store:
        return Store(self.db_path, readonly=True)


@dataclass
class Timeline:
    """One run on CLOCK_MONOTONIC (the clocks: swarmlab.figures): first packet, kernel event,
    detected (the detector's decision), applying/mitigated, cut off; `invalid` says why
    the run measured nothing (None when it is valid)."""

    pattern: str
    first_packet_mono_ns: int | None = None
    detected_mono_ns: int | None = None
    mitigated_mono_ns: int | None = None
    cut_off_mono_ns: int | None = None
    kernel_event_mono_ns: int | None = None
    applying_mono_ns: int | None = None
    rule: str | None = None
    mitigations: list[dict[str, Any]] = field(default_factory=list)
    incidents: int = 0
    attack: dict[str, Any] = field(default_factory=dict)
    probe: dict[str, Any] = field(default_factory=dict)
    agent_peak_rss_kb: int | None = None
    agent_cpu_s: float | None = None

    def ms(self, mono: int | None) -> float | None:
        if mono is None or self.first_packet_mono_ns is None:
            return None
        return round((mono - self.first_packet_mono_ns) / 1e6, 1)

    @property
    def invalid(self) -> str | None:
        pattern = PATTERNS.get(self.pattern)
        return figures.invalid_reason(figures.Marks(
            first_packet=self.first_packet_mono_ns,
            probe_first_ok=self.probe.get("first_success_mono_ns"),
            detected=self.detected_mono_ns, applying=self.applying_mono_ns,
            mitigated=self.mitigated_mono_ns, cut_off=self.cut_off_mono_ns,
            expect_cut_off=pattern is not None and pattern.kind == "block_ip",
            kernel_event=self.kernel_event_mono_ns))

    def as_dict(self) -> dict[str, Any]:
        kernel_to_detected = None
        if self.kernel_event_mono_ns is not None and self.detected_mono_ns is not None:
            kernel_to_detected = round((self.detected_mono_ns - self.kernel_event_mono_ns) / 1e6, 3)
        return {
            "pattern": self.pattern, "rule": self.rule, "incidents": self.incidents,
            "kernel_event_ms": self.ms(self.kernel_event_mono_ns),
            "detected_ms": self.ms(self.detected_mono_ns),
            "kernel_to_detected_ms": kernel_to_detected,
            "applying_ms": self.ms(self.applying_mono_ns),
            "mitigated_ms": self.ms(self.mitigated_mono_ns),
            "cut_off_ms": self.ms(self.cut_off_mono_ns),
            "invalid": self.invalid,
            "mitigations": self.mitigations,
            "packets_sent": self.attack.get("sent"),
            "agent_peak_rss_kb": self.agent_peak_rss_kb, "agent_cpu_s": self.agent_cpu_s,
        }


def _wall_to_mono_ns(wall: float | None) -> int | None:
    if wall is None:
        return None
    return time.monotonic_ns() - int((time.time() - wall) * 1e9)


def proc_stat(pid: int) -> tuple[int | None, float | None]:
    """(peak RSS in kB, CPU seconds used) of a live process."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None, None
    hwm = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), None)
    ticks = os.sysconf("SC_CLK_TCK")
    return hwm, (int(fields[11]) + int(fields[12])) / ticks


class Scenario:
    """A lab plus an agent for its victim; context manager that removes everything."""

    def __init__(self, extra_config: str = ""):
        self.extra_config = extra_config
        self.lab = Lab()
        self.tmp = Path(tempfile.mkdtemp(prefix="swarm-agent-scenario-"))
        self.agent: AgentProcess | None = None
        self.server: subprocess.Popen[str] | None = None

    def __enter__(self) -> "Scenario":
        try:
            self.lab.create()
            self.agent = AgentProcess(self.lab.victim, self.tmp, self.extra_config)
            self.agent.start()
            self.server = attacks.start_server(self.lab.victim, SERVICE_PORT, duration_s=120)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.kill()
            self.server.wait()
        if self.agent is not None:
            self.agent.stop()
        self.lab.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def target(self, v6: bool) -> str:
        return self.lab.addr("victim", v6=v6)

    def run(self, pattern: Pattern, probe_s: float = 6.0, source_ns: str | None = None,
            cut_off_failures: int | None = 20) -> Timeline:
        """Launch `pattern` with a handshake probe beside it and build the timeline.

        The probe tries a handshake every 20 ms (50 ms timeout) from the attacker's own
        address; "cut off" is the start of the first run of `cut_off_failures` failed
        handshakes in a row (about a second), after which the probe stops. A rate limit
        lets a trickle through later, so the probe must not wait for the end."""
        assert self.agent is not None
        ns = source_ns or self.lab.attacker
        target = self.target(pattern.v6)
        probe = attacks.start(ns, "probe", target=target, port=SERVICE_PORT,
                              duration_s=probe_s, interval_ms=20, timeout_ms=50,
                              stop_after_failures=cut_off_failures)
        time.sleep(0.3)   # a few successful handshakes first, so a cut-off is meaningful
        _, cpu_before = proc_stat(self.agent.pid)
        attack = attacks.run(ns, pattern.attack, timeout_s=60, target=target,
                             port=SERVICE_PORT, **pattern.opts)
        rss, cpu_after = proc_stat(self.agent.pid)
        probed = attacks.result(probe, timeout_s=probe_s + 30)
        tl = Timeline(pattern.name, attack=attack, probe=probed,
                      first_packet_mono_ns=attack.get("first_packet_mono_ns"),
                      cut_off_mono_ns=probed.get("cut_off_mono_ns"), agent_peak_rss_kb=rss)
        if cpu_before is not None and cpu_after is not None:
            tl.agent_cpu_s = round(cpu_after - cpu_before, 3)
        self._fill_from_store(tl, pattern)
        return tl

    def _fill_from_store(self, tl: Timeline, pattern: Pattern) -> None:
        with self.agent.store() as store:
            incidents = store.incidents()
            mitigations = store.mitigations()
            first = min(incidents, key=lambda i: i.detected_at) if incidents else None
            lines = store.incident_events(first.id) if first else []
        tl.incidents = len(incidents)
        tl.mitigations = [_mitigation_summary(m) for m in mitigations]
        if first is None:
            return
        tl.rule = ",".join(sorted({r for i in incidents for r in i.rules}))
        tl.detected_mono_ns = _wall_to_mono_ns(first.detected_at)
        lag_ms = next((e.data.get("event_to_decision_ms") for e in lines
                       if e.kind == "finding" and e.data.get("event_to_decision_ms") is not None),
                      None)
        if lag_ms is not None and tl.detected_mono_ns is not None:
            tl.kernel_event_mono_ns = tl.detected_mono_ns - int(lag_ms * 1e6)
        done = [i.mitigated_at for i in incidents if i.mitigated_at]
        tl.mitigated_mono_ns = _wall_to_mono_ns(min(done)) if done else None
        # In force from when the responder created the mitigation that answers the pattern
        # (a scan's block, not its challenge), or else its first one.
        applied = [m for m in mitigations if m.state in APPLIED_STATES]
        applied = [m.created_at for m in applied if m.kind.value == pattern.kind] or \
            [m.created_at for m in applied]
        tl.applying_mono_ns = _wall_to_mono_ns(min(applied)) if applied else None


def _mitigation_summary(m: Mitigation) -> dict[str, Any]:
    return {"kind": str(m.kind), "target": m.target, "state": str(m.state),
            "ttl_s": None if m.expires_at is None else round(m.expires_at - m.created_at)}


def active(mitigations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in mitigations if m["state"] == MitigationState.ACTIVE.value]


def dumps(timelines: list[Timeline]) -> str:
    return json.dumps([t.as_dict() for t in timelines], indent=2)
