"""The probe loader degrades with a reason instead of failing: here, tracepoints without
tracefs (what `ip netns exec` gives a process: a fresh /sys without it)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.privileged

SCRIPT = """
import json
from agent.config import Probes
from agent.sources.net import NetProbe
p = NetProbe(Probes(), ["v0"], {"syns": 200})
p.open()
print(json.dumps(p.status()))
p.close()
"""


def _status(lab, code: str) -> dict:
    out = subprocess.run(["ip", "netns", "exec", lab.victim, sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_tracepoints_degrade_with_a_reason_and_xdp_still_loads(lab):
    status = _status(lab, "import os; assert not os.path.isdir('/sys/kernel/tracing/events')\n" + SCRIPT)
    assert status["handle_xdp"]["state"] == "loaded", status
    for prog in ("handle_inet_sock_set_state", "handle_tcp_send_reset"):
        assert status[prog]["state"] == "degraded", status
        assert "tracepoint" in status[prog]["reason"], status


def test_the_agent_mounts_tracefs_in_its_own_mount_namespace(lab):
    code = "from agent.sources.capability import ensure_tracefs; assert ensure_tracefs() is None\n" + SCRIPT
    status = _status(lab, code)
    assert all(p["state"] == "loaded" for p in status.values()), status
