"""`swarm-agent demo` as an operator runs it: its own namespaces, a real agent, cleanup."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys

import pytest


def demo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli.main", "demo", *args],
                          capture_output=True, text=True, timeout=120,
                          env=None if env is None else {**os.environ, **env})


def test_list_and_unknown_pattern():
    listed = demo("--list")
    assert listed.returncode == 0 and "syn_flood" in listed.stdout and "port_scan_v6" in listed.stdout
    bad = demo("--patterns", "nope")
    assert bad.returncode == 2 and "unknown pattern nope" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.privileged
def test_demo_stops_a_port_scan_and_leaves_nothing_behind():
    # the demo's labs carry this mark; other tests' labs may come and go meanwhile
    mark = f"demo{secrets.token_hex(2)}"
    out = demo("--patterns", "port_scan", "--json", env={"SWARM_LAB_TAG_PREFIX": mark})
    assert out.returncode == 0, out.stderr
    [tl] = json.loads(out.stdout)
    assert "net.connect_scan@1" in tl["rule"]
    assert tl["mitigated_ms"] < 30_000 and tl["cut_off_ms"] is not None
    assert tl["invalid"] is None, tl
    assert tl["kernel_event_ms"] <= tl["detected_ms"] + 2, tl   # decision after the event
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert mark not in listed

    human = demo("--patterns", "port_scan")
    assert human.returncode == 0
    assert "attacker cut off" in human.stdout and "block_ip" in human.stdout
    assert "detector's decision" in human.stdout and "INVALID" not in human.stdout
