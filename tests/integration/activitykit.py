"""What the activity probe's integration tests share: building and loading the probe
(skipped only where the kernel cannot run it), collecting its events across polls, and
running a command in a throwaway cgroup and a lab namespace."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.config import Config, Probes
from agent.sources import capability
from agent.sources.abi import ACTIVITY_OBJECT, ActivityProg
from agent.sources.activity import ActivityProbe
from swarmlab.lab import wait_for
from tests.conftest import skip_unsupported

REPO = Path(__file__).resolve().parents[2]
PY = os.path.realpath(sys.executable)


def id_of(path: str) -> str:
    st = os.stat(path)
    return f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}:{st.st_ino}"


def require_probe() -> None:
    if shutil.which("clang") is None and not ACTIVITY_OBJECT.exists():
        skip_unsupported("no clang to build probes/activity.bpf.o")
    subprocess.run(["make", "-s", "-C", str(REPO / "probes")], check=True, timeout=300)
    caps = capability.probe()
    for need in ("btf", "tracepoint", "tracefs"):
        if not caps[need][0]:
            skip_unsupported(f"{need}: {caps[need][1]}")


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> Config:
    d = tmp_path_factory.mktemp("activity")
    return Config(state_dir=str(d), probes=Probes(process_owners=str(d / "owners")))


def open_probe(cfg: Config, **kw) -> ActivityProbe:
    """The probe loaded (closed by the caller); a skip where a program other than the
    bytes counter (sock:sock_send_length, Linux >= 6.3: need_bytes) cannot run."""
    require_probe()
    p = ActivityProbe(cfg, **kw)
    p.open()
    bad = {k: v for k, v in p.status().items() if v["state"] != "loaded"
           and k not in (ActivityProg.SEND.value, "activity")}
    if bad:
        p.close()
        skip_unsupported(f"activity probe degraded here: {bad}")
    return p


def need_bytes(p: ActivityProbe) -> None:
    """Skip a test of flow.bytes where this kernel has no sock:sock_send_length."""
    send = p.status()[ActivityProg.SEND.value]
    if send["state"] != "loaded":
        skip_unsupported(send["reason"])


@pytest.fixture(scope="module")
def probe(cfg):  # noqa: F811 (a fixture)
    p = open_probe(cfg)
    yield p
    p.close()


class Collector:
    """Every event the probe queued, kept across polls (the ring buffer is shared by the
    module's tests)."""

    def __init__(self, probe: ActivityProbe):
        self.probe, self.events = probe, []

    def until(self, pred, timeout_s: float = 5.0) -> list:
        def seen():
            self.events += self.probe.poll()
            return [e for e in self.events if pred(e)]
        return wait_for(seen, timeout_s)

    def settle(self, s: float = 0.3) -> None:
        """Let late events arrive (none expected), and take them."""
        time.sleep(s)
        self.events += self.probe.poll()


def in_cgroup(cg: Path, argv: list[str], ns: str | None = None) -> subprocess.CompletedProcess:
    """Run argv in cgroup `cg` (and in network namespace `ns`: entered after joining the
    cgroup, as `ip netns exec` mounts a /sys of its own), waiting for it."""
    pre = ["ip", "netns", "exec", ns] if ns else []
    script = f'echo $$ > "{cg}/cgroup.procs" && exec "$@"'
    return subprocess.run(["sh", "-c", script, "sh", *pre, *argv], capture_output=True,
                          text=True, timeout=30, check=True)
