"""Red team r7 (area B): an evidence bundle the attacker shapes by process count.

The bundle keeps the workload's first MAX_PROCESSES processes in pid order, and reads
sockets only for those kept. A workload that starts 520 idle decoys before its miner
pushes the miner (the process running the very executable the finding names in its
scope) out of the evidence, with its connections; the security team sees 512 `sleep`s."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from agent.respond import evidence
from tests.conftest import skip_unsupported

V2 = next((p for p in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))
           if (p / "cgroup.procs").exists()), None)
# root is the privileged marker's (a skip for a user, a failure in CI); a host without a
# cgroup v2 hierarchy is unsupported (a failure in CI too)
pytestmark = pytest.mark.privileged


def _file_id(path: str) -> str:
    st = os.stat(path)
    return f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}:{st.st_ino}"


def test_decoys_do_not_push_the_findings_executable_out_of_the_evidence(tmp_path: Path):
    if V2 is None:
        skip_unsupported("needs a cgroup v2 hierarchy")
    name = f"r7b-ev-{uuid.uuid4().hex[:8]}"
    cg = V2 / name
    cg.mkdir()
    procs: list[subprocess.Popen] = []
    try:
        def start(argv: list[str]) -> subprocess.Popen:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            (cg / "cgroup.procs").write_text(str(p.pid))
            procs.append(p)
            return p
        def stop(batch: list[subprocess.Popen]) -> None:
            for p in batch:
                p.send_signal(signal.SIGKILL)
            for p in batch:
                p.wait()
                procs.remove(p)
        miner_exe = tmp_path / "kworker"          # a copy: its own file id
        shutil.copy("/bin/sleep", miner_exe)
        # the miner must come after every decoy in pid order. pid_max can be 32768, so
        # the pids may wrap inside a batch: then the batch is dropped and started again
        # (a second wrap needs another 32768 forks, far more than one batch)
        for _ in range(3):
            decoys = [start(["sleep", "60"]) for _ in range(evidence.MAX_PROCESSES + 8)]
            miner = start([str(miner_exe), "60"])
            if miner.pid > max(p.pid for p in decoys):
                break
            stop(decoys + [miner])
        else:
            pytest.fail("pids wrapped in three batches running")
        path = "/" + name
        finding_evidence = {"scope": {"cgroup": path, "exe_id": [_file_id(str(miner_exe))],
                                      "node": "n"}}
        bundle = evidence.Bundle(evidence.targets_of(f"cgroup:{path}", finding_evidence))
        evidence.collect(bundle, deadline=time.monotonic() + 20)
        data = bundle.snapshot(1 << 20)
        pids = {p["pid"] for p in data["processes"]}
        assert len(pids) >= evidence.MAX_PROCESSES - 8    # the decoys were read
        assert miner.pid in pids, (
            f"the process running the finding's executable ({miner_exe}, pid {miner.pid}) "
            f"is not in the evidence; it holds {len(pids)} decoys "
            f"(truncated: {data['truncated']})")
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait()
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)
