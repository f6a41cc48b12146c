"""Red team round 5, the exec policy: findings that fail until fixed (unit level, real
files and real processes, no agent)."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.policyconfig import Policy, check_exec
from agent.sources.execfacts import ExeHasher
from agent.sources.gpuproc import container_of

SLEEP = shutil.which("sleep") or "/bin/sleep"


def test_hash_cache_is_not_fooled_by_a_rewrite_that_restores_mtime(tmp_path):
    """R5EXEC-1: the cache key is (dev, ino, mtime, size); mtime is the file owner's to set
    (utime/`touch -d`). Run a harmless file once (its hash is cached), write the denied
    program's bytes over it (same size), put the old mtime back, run it again: the cache
    answers the harmless hash and the denied one is never seen. ctime (which no one can
    set) must be part of the key."""
    prog = tmp_path / "job"
    benign = bytearray(Path(SLEEP).read_bytes())
    evil = bytes(benign[:-1]) + bytes([benign[-1] ^ 0xFF])    # same size, other bytes
    prog.write_bytes(bytes(benign))
    prog.chmod(0o755)
    st = prog.stat()
    hasher = ExeHasher(max_bytes=64 << 20)
    p = subprocess.Popen([str(prog), "30"])
    try:
        first, state = hasher.digest(p.pid, (st.st_dev, st.st_ino))
        assert state == "ok"
        assert first == hashlib.sha256(bytes(benign)).hexdigest()
    finally:
        p.kill()
        p.wait()
    with open(prog, "r+b") as f:          # the same inode, rewritten in place
        f.write(evil)
    os.utime(prog, ns=(st.st_atime_ns, st.st_mtime_ns))     # touch -d: the old mtime
    assert prog.stat().st_mtime_ns == st.st_mtime_ns and prog.stat().st_ino == st.st_ino
    p = subprocess.Popen([str(prog), "30"])
    try:
        second, state = hasher.digest(p.pid, (st.st_dev, st.st_ino))
    finally:
        p.kill()
        p.wait()
    assert second == hashlib.sha256(evil).hexdigest(), \
        "the cached hash of the old bytes was returned for the rewritten file"


CID = "a" * 64
OTHER = "b" * 64


def test_container_of_a_process_in_a_deep_subcgroup_of_its_container():
    """R5EXEC-3: container_of looks at the last 3 parts of the cgroup path only. A
    workload with a delegated cgroup (systemd in the container, cgroupns + nesting) moves
    itself 3 levels below its scope: container None, exec_denied_containers misses it."""
    base = f"/system.slice/docker-{CID}.scope"
    assert container_of(base + "/a") == CID
    assert container_of(base + "/a/b/c") == CID


def test_container_of_is_not_the_name_a_workload_gave_its_own_subcgroup():
    """R5EXEC-3: inside its delegated subtree the workload names a cgroup after another
    (allowed) container: the innermost match wins, so the denied container's processes
    carry the allowed id (or an innocent one's id: its deny rule, its incidents)."""
    assert container_of(f"/system.slice/docker-{CID}.scope/docker-{OTHER}.scope") == CID


@pytest.mark.parametrize("glob", ["/system.slice/*", "/system.slice*", "/system.slice/**",
                                  "/init.scope*"])
def test_freeze_refuses_every_spelling_of_the_hosts_services(glob):
    """R5EXEC-11: check_exec refuses exec_writable_action freeze over "/system.slice" and
    "/init.scope" spelt exactly so, but not "/system.slice/*" or "/system.slice*", which
    name the same services (every subtree glob is expanded the same way, exec_lists): a
    service that runs a helper from /tmp (a build, an installer's postinst, `go run`)
    gets its whole cgroup frozen -- sshd's, the container runtime's."""
    with pytest.raises(ValueError):
        check_exec(Policy(exec_workload_cgroups=(glob,), exec_writable_action="freeze"))
