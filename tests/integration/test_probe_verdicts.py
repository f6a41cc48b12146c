"""A program the verifier rejects is a failure of ours, reported with the verifier's log;
only what the kernel lacks (a tracepoint, a helper) is "degraded". Real loads of a
test-only object (verdicts.bpf.c, built here with the probes' flags and vmlinux.h)
through the loader every probe uses (BpfProbe)."""
from __future__ import annotations

import ctypes
import enum
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.sources.probe import BpfProbe
from tests.conftest import skip_unsupported
from tests.integration.test_proc_probe import require_proc_probe

pytestmark = pytest.mark.privileged
REPO = Path(__file__).resolve().parents[2]


class Prog(enum.StrEnum):
    GOOD = "handle_good"
    BROKEN = "handle_broken"
    MISSING = "handle_missing"
    LACKING = "handle_lacking"


class Verdicts(BpfProbe):
    NAME = "verdicts"
    PROGS = Prog
    TRACEPOINTS = {Prog.GOOD: ("syscalls", "sys_enter_getppid"),
                   Prog.BROKEN: ("syscalls", "sys_enter_getppid"),
                   Prog.MISSING: ("swarm_no_such_category", "swarm_no_such_event"),
                   Prog.LACKING: ("syscalls", "sys_enter_getppid")}
    RING_MAP = "events"
    LOSS_MAP = "losses"

    def _configure(self, obj) -> None:
        pass

    def _decode(self, record: bytes):
        return None


@pytest.fixture(scope="module")
def verdicts_obj(tmp_path_factory) -> Path:
    """tests/integration/verdicts.bpf.o in a temp dir (vmlinux.h from the probes' build)."""
    if shutil.which("clang") is None:
        skip_unsupported("no clang to build the test object")
    require_proc_probe()        # builds probes/build/vmlinux.h; skips without tracefs/BTF
    out = tmp_path_factory.mktemp("bpf") / "verdicts.bpf.o"
    subprocess.run(["clang", "-g", "-O2", "-target", "bpf", "-mcpu=v3",
                    f"-I{REPO / 'probes/build'}", "-c",
                    str(Path(__file__).with_name("verdicts.bpf.c")), "-o", str(out)],
                   check=True, timeout=120)
    return out


def test_verifier_rejection_fails_with_its_log_and_missing_hooks_degrade(verdicts_obj, caplog):
    probe = Verdicts(verdicts_obj)
    with caplog.at_level(logging.ERROR, logger="swarm_agent"):
        probe.open()
    try:
        status = probe.status()
        assert status[Prog.GOOD]["state"] == "loaded", status      # the rest keeps running
        broken = status[Prog.BROKEN]
        assert broken["state"] == "failed", status
        assert broken["reason"].startswith("the verifier rejected the program")
        assert "invalid mem access 'map_value_or_null'" in broken["reason"]
        # the whole log is in the agent's log, from its first instruction
        [record] = [r for r in caplog.records if Prog.BROKEN.value in r.getMessage()]
        assert "invalid mem access" in record.getMessage() and "\n0: " in record.getMessage()
        missing = status[Prog.MISSING]
        assert missing["state"] == "degraded" and "swarm_no_such_event" in missing["reason"]
        lacking = status[Prog.LACKING]
        assert lacking["state"] == "degraded", status
        assert "cannot use helper bpf_get_socket_cookie" in lacking["reason"]
        # the loaded program runs
        before = _count(probe)
        os.getppid()
        assert _count(probe) > before
    finally:
        probe.close()


def _count(probe: Verdicts) -> int:
    value = ctypes.c_uint64()
    probe._map("losses").lookup(ctypes.c_uint32(0), value)
    return value.value
