"""A dry run of bench/gpu_check.sh (the check prepared for a real GPU machine) against the
stand-in NVML and a stand-in libcuda (tests/nvml/fake_cuda.c: its cuMemAlloc puts the
calling process into the stand-in NVML's process list, as a driver would). Everything the
script checks passes except what only a real driver gives: /dev/nvidia* files held open."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.nvml.fakenvml import Script, build

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.privileged     # it creates (and removes) two cgroups


def test_gpu_check_dry_run(tmp_path):
    libs = tmp_path / "libs"
    libs.mkdir()
    build(libs)
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wall", "-Werror", "-o",
                    str(libs / "libcuda.so.1"), str(ROOT / "tests/nvml/fake_cuda.c")],
                   check=True)
    script = Script(tmp_path / "nvml.state")
    script.gpu(util=20, used=1 << 30)
    script.write()
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), LD_LIBRARY_PATH=str(libs),
               FAKE_NVML_STATE=str(script.path),
               GPU_CHECK_ARGS="--hold-s 30 --measure-s 3 --sample-s 0.5")
    done = subprocess.run([str(ROOT / "bench/gpu_check.sh")], capture_output=True, text=True,
                          env=env, timeout=170)
    text = (out / "gpu_check.txt").read_text()
    assert done.stdout == text
    summary = json.loads((out / "gpu_check.json").read_text())
    failed = {c["check"] for c in summary["checks"] if c["verdict"] == "FAIL"}
    assert failed == {"it holds /dev/nvidia*"}, text
    assert done.returncode == summary["exit"] == 1, text
    ok, bad = summary["processes"]
    assert ok["seen"] and bad["seen"] and ok["cgroup"] != bad["cgroup"], text
    assert ok["cgroup"].startswith("/swa-gpucheck-ok-") and ok["used_memory_bytes"] == 512 << 20
    assert "[PASS] unauthorized process flagged" in text
    assert "[PASS] unauthorized process stopped" in text          # the agent's exact kill
    assert "[PASS] authorized process keeps running" in text
    assert summary["sampling"]["samples"] >= 4 and summary["nvml"]["gpus"] == 1
    assert "== gpu_check exit 1" in text
    assert not list(Path("/sys/fs/cgroup/unified").glob("swa-gpucheck-*")) and \
        not list(Path("/sys/fs/cgroup").glob("swa-gpucheck-*"))       # removed
