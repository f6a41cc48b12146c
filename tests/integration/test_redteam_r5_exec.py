"""Red team round 5, the exec policy end to end (the real agent, the real process probe,
real processes in real cgroups): findings that fail until fixed."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.test_exec_policy import (EXEC_RULES, SH, SLEEP, copy_sleep, incidents,
                                                path_of, run, runs_on,
                                                start_agent, stop_all, workloads)

__all__ = ["workloads"]          # the fixture, re-used
LDSO = "/lib64/ld-linux-x86-64.so.2"


def killed(proc, timeout_s: float = 8) -> bool:
    try:
        return proc.wait(timeout_s) == -9
    except subprocess.TimeoutExpired:
        return False


@pytest.mark.privileged
def test_denied_hash_is_killed_after_a_rewrite_that_restores_mtime(lab, workloads, tmp_path):
    """R5EXEC-1 end to end: a workload runs a harmless file once (the agent hashes and
    caches it), writes the denied program over it (same size, same inode), puts the old
    mtime back (`touch -d`) and runs it: the agent's cache answers the old hash."""
    home = Path("/var/lib") / f"swa-r5-hash-{os.getpid()}"
    prog = copy_sleep(home / "job")
    benign = prog.read_bytes()
    evil = benign[:-1] + bytes([benign[-1] ^ 0xFF])          # still runs: a trailing byte
    agent = start_agent(lab, tmp_path, (
        f"  exec_denied_sha256: [\"{hashlib.sha256(evil).hexdigest()}\"]\n"))
    procs = []
    try:
        control = home / "control"                             # the denied bytes, fresh
        control.write_bytes(evil)
        control.chmod(0o755)
        procs.append(c := run(lab, workloads / "job", str(control), "300"))
        assert killed(c)                                       # the policy is live
        st = prog.stat()
        procs.append(first := run(lab, workloads / "job", str(prog), "300"))
        assert runs_on(first, 2.0)                             # hashed, cached, allowed
        stop_all(first)
        with open(prog, "r+b") as f:
            f.write(evil)
        os.utime(prog, ns=(st.st_atime_ns, st.st_mtime_ns))
        procs.append(second := run(lab, workloads / "job", str(prog), "300"))
        assert killed(second), "the denied bytes ran: the cache keyed on mtime answered"
    finally:
        stop_all(*procs)
        agent.stop()
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.privileged
def test_denied_program_run_through_the_dynamic_loader_is_killed(lab, workloads, tmp_path):
    """R5EXEC-2: `ld-linux-x86-64.so.2 ./miner` maps and runs the miner, but the kernel's
    mm->exe_file is the loader: exe_path, exe_sha256 and exe_location are the loader's.
    A path-denied and a hash-denied program both run untouched this way."""
    home = Path("/var/lib") / f"swa-r5-ldso-{os.getpid()}"
    denied = copy_sleep(home / "denied" / "miner")
    by_hash = copy_sleep(home / "hashed")
    by_hash.write_bytes(by_hash.read_bytes() + b"\0")          # its own hash
    agent = start_agent(lab, tmp_path, (
        f"  exec_denied_paths: [\"{home}/denied/*\"]\n"
        f"  exec_denied_sha256: [\"{hashlib.sha256(by_hash.read_bytes()).hexdigest()}\"]\n"))
    procs = []
    try:
        procs.append(direct := run(lab, workloads / "job", str(denied), "300"))
        assert killed(direct)                                  # the policy is live
        procs.append(a := run(lab, workloads / "job", LDSO, str(denied), "300"))
        procs.append(b := run(lab, workloads / "job", LDSO, str(by_hash), "300"))
        missed = [w for w, p in (("path-denied via ld.so", a), ("hash-denied via ld.so", b))
                  if not killed(p, 4)]
        assert not missed, missed
    finally:
        stop_all(*procs)
        agent.stop()
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.privileged
def test_tmp_program_run_through_the_loader_or_as_a_script_is_seen(lab, workloads, tmp_path):
    """R5EXEC-2/4: with exec_writable_action kill, a dropper in /tmp exec'd directly is
    killed; the same dropper started as `ld.so /tmp/x`, or a `#!/bin/sh` script in /tmp
    exec'd directly (the kernel's exe_file is the interpreter), runs untouched."""
    d = Path("/tmp") / f"swa-r5-tmp-{os.getpid()}"
    dropper = copy_sleep(d / "dropper")
    script = d / "dropper.sh"
    script.write_text(f"#!{SH}\nexec 3</dev/null\nwhile :; do {SLEEP} 1; done\n")
    script.chmod(0o755)
    agent = start_agent(lab, tmp_path, (
        f"  exec_workload_cgroups: [\"{path_of(workloads)}/tenant\"]\n"
        "  exec_writable_action: kill\n"))
    procs = []
    try:
        procs.append(direct := run(lab, workloads / "tenant", str(dropper), "300"))
        assert killed(direct)                                  # the policy is live
        procs.append(a := run(lab, workloads / "tenant", LDSO, str(dropper), "300"))
        procs.append(b := run(lab, workloads / "tenant", str(script)))
        missed = [w for w, p in (("/tmp program via ld.so", a), ("/tmp #! script", b))
                  if not killed(p, 4)]
        assert not missed, missed
    finally:
        stop_all(*procs)
        agent.stop()
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.privileged
def test_a_denied_users_exec_does_not_kill_other_users_programs(lab, workloads, tmp_path):
    """R5EXEC-5: the kill's fork sweep takes every process of the cgroup running the same
    inode that started no earlier than the denied process -- and that start time is its
    fork, not its exec. A denied user's process forked long ago (a sidecar, a daemon)
    that execs /bin/sleep gets every later `sleep` of the cgroup killed, whoever runs
    it: here root's job, started after it and no fork of it."""
    agent = start_agent(lab, tmp_path, "  exec_denied_users: [65534]\n")
    cg = workloads / "shared"
    procs = []
    try:
        code = ("import os,sys,time; os.setgid(65534); os.setuid(65534); time.sleep(4); "
                f"os.execv({SLEEP!r}, ['sleep', '300'])")
        procs.append(nobody := run(lab, cg, sys.executable, "-c", code))
        time.sleep(1.5)                         # root's job starts after nobody's fork
        procs.append(job := run(lab, cg, SLEEP, "300"))
        assert killed(nobody, 12)               # the denied user's exec: killed
        assert runs_on(job, 2.0), "root's own sleep, no fork of the denied one, was killed"
    finally:
        stop_all(*procs)
        agent.stop()


@pytest.mark.privileged
def test_the_fork_sweep_does_not_kill_another_files_same_inode_number(lab, workloads,
                                                                      tmp_path):
    """R5EXEC-8: the sweep matches forks by inode number only (agent/enforce/process.py
    _runs: st_ino, no device). Two filesystems reuse inode numbers (two fresh tmpfs give
    their first files the same one; a workload can also create files on /dev/shm until
    the number it wants comes up). A dropper in /tmp (writable location, action kill),
    exec'd by a process forked before the innocent job started, gets the job -- another
    file on another filesystem that shares the dropper's inode number -- killed too."""
    base = Path("/tmp") / f"swa-r5-ino-{os.getpid()}"
    other = Path("/var/lib") / f"swa-r5-ino-{os.getpid()}"
    for d in (base, other):
        d.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "swa-r5", str(d)], check=True)
    agent = None
    procs = []
    try:
        dropper = copy_sleep(base / "dropper")
        job = copy_sleep(other / "job")
        assert dropper.stat().st_ino == job.stat().st_ino
        assert dropper.stat().st_dev != job.stat().st_dev
        # the dropper denied by its path (a tmpfs is itself a writable location now, so
        # the job, reported there, must not be killed as one: the writable rule reports)
        agent = start_agent(lab, tmp_path, f"  exec_denied_paths: [\"{dropper}\"]\n")
        cg = workloads / "tenant"
        procs.append(control := run(lab, cg, str(job), "300"))   # the job alone: not judged
        assert runs_on(control, 1.0)
        code = f"import os,time; time.sleep(4); os.execv({str(dropper)!r}, ['d', '300'])"
        procs.append(attacker := run(lab, cg, sys.executable, "-c", code))
        time.sleep(1.5)                          # the job starts after the attacker's fork
        procs.append(innocent := run(lab, cg, str(job), "300"))
        assert killed(attacker, 12)              # the dropper: killed
        assert runs_on(control, 0.1)             # started before the attacker's fork
        assert runs_on(innocent, 2.0), "another file that shares the inode number was killed"
    finally:
        stop_all(*procs)
        if agent is not None:
            agent.stop()
        for d in (base, other):
            subprocess.run(["umount", "-l", str(d)], check=False)
            shutil.rmtree(d, ignore_errors=True)


SITE_RULE = """rules:
  - id: site.no_{name}
    version: 1
    class: {cls}
    severity: high
    action: kill
    description: the site's own exec rule
    match:
      - event: proc.exec
        where:
          exe_known: true
          exe_path: {{glob: "{path}"}}
"""


@pytest.mark.parametrize("cls", ["policy_violation", "security_breach", "suspicious_activity"])
@pytest.mark.privileged
def test_an_operators_exec_rule_of_another_class_sees_every_exec(lab, workloads, tmp_path,
                                                                 cls):
    """R5EXEC-9: README: "while a deny list is filled (or an operator's exec rule is
    loaded), every exec goes to user space". agent/detect/execpolicy.needs() switches the
    kernel's exec_policy map on only for class policy_violation: an operator's rule on
    proc.exec of any other class loads without a word and never sees the execs it names
    (a copied sleep is no watched program): no incident. policy_violation is the
    control (passes today)."""
    home = Path("/var/lib") / f"swa-r5-cls-{os.getpid()}"
    target = copy_sleep(home / "forbidden")
    rules = tmp_path / "rules"
    rules.mkdir()
    shutil.copy2(EXEC_RULES.with_name("policy.yaml"), rules / "policy.yaml")
    extra = tmp_path / "rules.d"
    extra.mkdir()
    (extra / "site.yaml").write_text(SITE_RULE.format(name="forbidden", cls=cls, path=target))
    agent = start_agent(lab, tmp_path, "  exec_workload_cgroups: [\"/nowhere\"]\n",
                        rules=rules, extra=extra)
    p = None
    try:
        p = run(lab, workloads / "w", str(target), "300")
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline and not any(
                "site.no_forbidden@1" in i["rules"] for i in incidents(agent)):
            time.sleep(0.5)
        assert any("site.no_forbidden@1" in i["rules"] for i in incidents(agent)), \
            f"an operator's {cls} rule on proc.exec never saw the exec"
    finally:
        stop_all(p)
        agent.stop()
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.parametrize("depth", [20, 45])
@pytest.mark.privileged
def test_a_dropper_deep_below_tmp_is_seen(lab, workloads, tmp_path, depth):
    """R5EXEC-10: a dropper in /tmp, but `depth` directories down. The kernel prefilter
    (EXEC_POLICY_WRITABLE, probes/proc.bpf.h tmp_on_chain) looks for a "tmp" directory
    only WRITABLE_DEPTH (16) dentries up, and the path walk (probes/ident.bpf.h
    WALK_DEPTH 40) gives no exe_path past 40: with /tmp on the root filesystem (no device
    of its own) exe_location is "" either way. `mkdir -p /tmp/a/a/.../a` is all it takes
    to exec from /tmp unseen with exec_writable_action kill."""
    top = Path("/tmp") / f"swa-r5-deep-{os.getpid()}"
    deep = top.joinpath(*(["d"] * depth))
    dropper = copy_sleep(deep / "dropper")
    shallow = copy_sleep(top / "dropper")
    agent = start_agent(lab, tmp_path, (
        f"  exec_workload_cgroups: [\"{path_of(workloads)}/tenant\"]\n"
        "  exec_writable_action: kill\n"))
    procs = []
    try:
        procs.append(direct := run(lab, workloads / "tenant", str(shallow), "300"))
        assert killed(direct)                                  # the policy is live
        procs.append(p := run(lab, workloads / "tenant", str(dropper), "300"))
        assert killed(p), f"a dropper {depth} directories below /tmp ran unseen"
    finally:
        stop_all(*procs)
        agent.stop()
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.privileged
def test_a_dropper_in_another_world_writable_directory_is_seen(lab, workloads, tmp_path):
    """R5EXEC-12: exe_location knows /tmp, /var/tmp and /dev/shm by name (and their own
    devices). /run/lock is world-writable (1777) on every Debian host (a tmpfs of its
    own there, a plain directory here): any unprivileged job writes a program there and
    execs it, exe_location "", unseen with exec_writable_action kill. The issue names
    "location the workload could write": every sticky world-writable directory is one."""
    lock = Path("/run/lock")
    if not lock.is_dir() or (lock.stat().st_mode & 0o1777) != 0o1777:
        pytest.skip("no world-writable /run/lock on this host")
    dropper = copy_sleep(lock / f"swa-r5-{os.getpid()}")
    os.chown(dropper, 65534, 65534)                 # written by an unprivileged job
    agent = start_agent(lab, tmp_path, (
        f"  exec_workload_cgroups: [\"{path_of(workloads)}/tenant\"]\n"
        "  exec_writable_action: kill\n"))
    p = None
    try:
        code = ("import os; os.setgid(65534); os.setuid(65534); "
                f"os.execv({str(dropper)!r}, ['d', '300'])")
        p = run(lab, workloads / "tenant", sys.executable, "-c", code)
        assert killed(p), "a dropper in /run/lock (1777) ran unseen"
    finally:
        stop_all(p)
        agent.stop()
        dropper.unlink(missing_ok=True)


@pytest.mark.parametrize("how", ["bind", "tmpfs"])
@pytest.mark.privileged
def test_a_dropper_in_tmp_reached_through_a_users_own_mount_is_seen(lab, workloads, tmp_path,
                                                                     how):
    """R5EXEC-13: an unprivileged job (uid 65534) makes a user namespace with its own mount
    namespace (`unshare -Urm`, allowed on this host as on stock Debian 12) and either
    bind-mounts its /tmp directory on /mnt, or mounts a fresh tmpfs there and copies the
    dropper in; then execs /mnt/dropper. exe_path is the path in its own mount namespace
    (/mnt/dropper), /tmp is no filesystem of its own here (the device test cannot help),
    the kernel prefilter's "tmp" chain stops at the bind's root: exe_location "", the
    dropper runs with exec_writable_action kill."""
    d = Path("/tmp") / f"swa-r5-bind-{os.getpid()}"
    dropper = copy_sleep(d / "dropper")
    agent = start_agent(lab, tmp_path, (
        f"  exec_workload_cgroups: [\"{path_of(workloads)}/tenant\"]\n"
        "  exec_writable_action: kill\n"))
    script = (f"mount --bind {d} /mnt && exec /mnt/dropper 300" if how == "bind" else
              f"mount -t tmpfs x /mnt && cp {dropper} /mnt/d && exec /mnt/d 300")
    p = None
    try:
        p = run(lab, workloads / "tenant", "setpriv", "--reuid", "65534", "--regid", "65534",
                "--clear-groups", "unshare", "-Urm", SH, "-c", script)
        ok = killed(p)
        assert ok or p.poll() is None, f"the setup failed (exit {p.returncode})"
        assert ok, f"a /tmp dropper exec'd through a user's own {how} mount ran unseen"
    finally:
        stop_all(p)
        agent.stop()
        shutil.rmtree(d, ignore_errors=True)
