"""The hot path degrades instead of losing: the real agent, its event queue cut to the
smallest allowed (1024), under an exec storm in its own namespace, still blocks a port
scan inside the deadline;
status shows the queue (capacity, high-water mark never above it, drops by kind) and no
event failed. (What a crash between a finding's commit and its host change leaves, and
what the next start does with it: test_start_recovery.)"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from swarmlab.lab import sh, spawn_in
from agent.model import EventClass
from swarmlab.scenario import PATTERNS, Scenario, active

pytestmark = pytest.mark.privileged

DEADLINE_MS = EventClass.SYSTEM_ATTACK.deadline_s * 1000
# Shells are among the executables the process probe always reports: each exec of sh
# reaches the agent's queue. Bounded in count.
STORM = 'i=0; while [ $i -lt {n} ]; do /bin/sh -c :; i=$((i+1)); done'


def status(sc: Scenario) -> dict:
    done = subprocess.run([sys.executable, "-m", "agent.cli.main", "status", "--json",
                           "--config", str(sc.agent.config_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_an_exec_storm_does_not_stop_enforcement():
    with Scenario("probes:\n  queue_events: 1024\n") as sc:
        storms = [spawn_in(sc.lab.victim, "sh", "-c", STORM.format(n=3000)) for _ in range(2)]
        try:
            tl = sc.run(PATTERNS["port_scan"])
        finally:
            for p in storms:
                try:
                    p.wait(120)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        d = tl.as_dict()
        attacker = sc.lab.addr("attacker")
        assert ("block_ip", attacker) in {(m["kind"], m["target"])
                                          for m in active(d["mitigations"])}, d
        assert d["mitigated_ms"] is not None and d["mitigated_ms"] < DEADLINE_MS, d
        counters = {k: int(v) for k, v in status(sc)["counters"].items()}   # int64: text
        assert counters["queue.capacity"] == 1024
        assert 0 < counters["queue.depth_max"] <= 1024, counters
        # The storm reached the agent: every exec is counted as processed or dropped.
        seen = counters.get("events.proc.exec", 0) + counters.get("events.dropped.proc.exec", 0)
        assert seen >= 1000, counters
        # A flood of execs never costs a network event its place.
        assert counters.get("events.dropped.net.source", 0) == 0, counters
        assert counters.get("events.failed", 0) == 0 and counters.get("findings.failed", 0) == 0
