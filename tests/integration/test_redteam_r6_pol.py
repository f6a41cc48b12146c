"""Red team round 6, the exec policy's script and loader coverage (agent/sources/exectarget.py)
end to end: the real agent, the real process probe, real processes in real cgroups.
Findings that fail until fixed."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.test_exec_policy import (SH, path_of, run, start_agent, stop_all,
                                                workloads, copy_sleep)

__all__ = ["workloads"]          # the fixture, re-used
LDSO = "/lib64/ld-linux-x86-64.so.2"


def killed(proc, timeout_s: float = 6) -> bool:
    try:
        return proc.wait(timeout_s) == -9
    except subprocess.TimeoutExpired:
        return False


def _agent(lab, tmp_path, workloads):
    return start_agent(lab, tmp_path, (
        f"  exec_workload_cgroups: [\"{path_of(workloads)}/tenant\"]\n"
        "  exec_writable_action: kill\n"))


@pytest.mark.privileged
@pytest.mark.parametrize("how", ["dev-fd", "long-path"])
def test_a_tmp_script_named_so_the_agent_cannot_resolve_it(lab, workloads, tmp_path, how):
    """R6POL-1/2: a `#!/bin/sh` script in /tmp exec'd directly is killed (R5EXEC-4's fix),
    but not when the caller names it
    - dev-fd: as /dev/fd/3 (the script open on fd 3, `exec /dev/fd/3`; fexecve does the
      same): exectarget._open resolves /proc/PID/root/dev/fd/3 -> /proc/self/fd/3, and
      /proc/self is the AGENT: the agent judges its own fd 3 (or nothing), not the script;
    - long-path: by a path longer than the probe's 256-byte filename (PATH_LEN): the
      truncated name resolves to nothing (or to a prefix file the attacker chose)."""
    d = Path("/tmp") / f"swa-r6-sc-{os.getpid()}"
    if how == "long-path":
        d = d / ("d" * 120) / ("e" * 120)
    d.mkdir(parents=True, exist_ok=True)
    script = d / "dropper.sh"
    script.write_text(f"#!{SH}\nwhile :; do sleep 1; done\n")
    script.chmod(0o755)
    agent = _agent(lab, tmp_path, workloads)
    procs = []
    try:
        procs.append(direct := run(lab, workloads / "tenant", str(copy_sleep(
            Path("/tmp") / f"swa-r6-live-{os.getpid()}")), "300"))
        assert killed(direct)                                  # the policy is live
        if how == "dev-fd":
            argv = (SH, "-c", f"exec 3<{script}; exec /dev/fd/3")
        else:
            argv = (str(script),)
        procs.append(p := run(lab, workloads / "tenant", *argv))
        assert killed(p), f"the /tmp #! script ran untouched ({how})"
    finally:
        stop_all(*procs)
        agent.stop()
        shutil.rmtree(Path("/tmp") / f"swa-r6-sc-{os.getpid()}", ignore_errors=True)
        Path(f"/tmp/swa-r6-live-{os.getpid()}").unlink(missing_ok=True)
