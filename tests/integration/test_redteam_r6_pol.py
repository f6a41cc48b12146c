"""Red team round 6, the exec policy's script and loader coverage (agent/sources/exectarget.py)
end to end: the real agent, the real process probe, real processes in real cgroups.
Findings that fail until fixed."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
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


@pytest.mark.privileged
def test_a_denied_scripts_kill_does_not_sweep_the_workloads_other_shells(lab, workloads,
                                                                         tmp_path):
    """R6POL-3: a path-denied `#!/bin/sh` script is judged by its target_path (R5EXEC-4's
    fix), but the kill's fork sweep (agent/respond/policy.py exact_kill -> exe_id, and
    agent/enforce/process.py _sweep_forks) is keyed on the EXECUTABLE's inode, which for a
    script is /bin/sh's: every shell of the workload's cgroup and uid started since the
    denied exec is killed with it -- here an innocent `sh -c 'sleep 300; :'` job the
    workload started a moment later, which runs no denied file. Only the denied script's
    process (and its own forks) should be hit."""
    home = Path("/var/lib") / f"swa-r6-sweep-{os.getpid()}"
    (home / "bad").mkdir(parents=True, exist_ok=True)
    script = home / "bad" / "miner.sh"
    script.write_text(f"#!{SH}\nwhile :; do sleep 1; done\n")
    script.chmod(0o755)
    agent = start_agent(lab, tmp_path, f"  exec_denied_paths: [\"{home}/bad/*\"]\n")
    procs = []
    try:
        procs.append(alone := run(lab, workloads / "job", SH, "-c", "sleep 300; :"))
        time.sleep(1.0)
        assert alone.poll() is None          # the same job alone runs: the policy allows it
        # the workload's own shell starts the denied script in the background, then an
        # innocent job a moment later (its exit status lands in `rc`)
        rc, pidf = home / "rc", home / "pid"
        procs.append(outer := run(lab, workloads / "job", SH, "-c",
                                  f"{script} & echo $! > {pidf}; sh -c 'sleep 300; :'; "
                                  f"echo $? > {rc}"))
        deadline = time.monotonic() + 5
        while not (pidf.exists() and pidf.read_text().strip()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        bg = int(pidf.read_text())
        deadline = time.monotonic() + 5
        while _alive(bg) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(bg), "the denied script ran (the policy is not live)"
        time.sleep(0.5)
        assert not rc.exists() and outer.poll() is None, (
            "an innocent shell of the same workload was killed with the denied script "
            f"(its exit status {rc.read_text().strip() if rc.exists() else '?'})")
    finally:
        stop_all(*procs)
        agent.stop()
        shutil.rmtree(home, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.privileged
def test_a_script_on_the_workloads_own_fuse_mount_does_not_stall_the_agent(lab, workloads,
                                                                           tmp_path):
    """R6POL-4: exectarget.target_fields runs on the agent's event loop (the ring buffer's
    reader) and opens the script the caller named, O_RDONLY, through /proc/PID/root. A
    workload with FUSE (gcsfuse, s3fs, rclone mounts of its data sets, or its own daemon)
    runs a `#!` script from its mount and never answers the agent's FUSE OPEN (the request
    carries the opener's pid, so only the agent's is held): the agent's loop blocks in
    open(2) and every detection and response on the host stops -- a /tmp dropper started
    afterwards runs untouched. (The exe hasher's open of /proc/PID/exe has the same
    exposure for hash rules.)"""
    from tests.integration.minifuse import MiniFuse
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse here")

    held = set()

    def hang(pid: int) -> bool:          # the workload's daemon: hold only the agent's
        return pid in held
    mnt = Path("/tmp") / f"swa-r6-fuse-{os.getpid()}"
    mnt.mkdir(exist_ok=True)
    dropper = copy_sleep(Path("/tmp") / f"swa-r6-fz-{os.getpid()}" / "dropper")
    (workloads / "tenant").mkdir(exist_ok=True)
    agent = _agent(lab, tmp_path, workloads)
    held.add(agent.pid)
    fs = MiniFuse(str(mnt), "job.sh", f"#!{SH}\nwhile :; do sleep 1; done\n".encode(), hang)
    procs = []
    try:
        procs.append(first := run(lab, workloads / "tenant", str(dropper), "300"))
        assert killed(first)                                   # the policy is live
        procs.append(run(lab, workloads / "tenant", str(mnt / "job.sh")))
        time.sleep(1.0)
        procs.append(later := run(lab, workloads / "tenant", str(dropper), "300"))
        assert killed(later, 8), (f"the agent stalled: a /tmp dropper ran untouched "
                                  f"({fs.hung} FUSE requests of the agent held)")
    finally:
        fs.close()                   # first: whatever waits on the daemon fails now
        stop_all(*procs)
        agent.stop()
        shutil.rmtree(dropper.parent, ignore_errors=True)
        mnt.rmdir()
