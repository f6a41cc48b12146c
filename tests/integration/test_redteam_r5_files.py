"""Red team, round 5: the file policy (fanotify). Each test fails on the code as found and
passes once its finding is fixed. Real fanotify groups, real cgroup v2 groups, real
processes; whatever could hang the host is confined to a private mount namespace or to
files in a temp directory."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Iterator

import pytest

from agent.config import Config
from agent.filepolicy import FilePolicy
from agent.policyconfig import FileRule, Policy
from swarmlab.breachlab import throwaway_cgroup
from agent.policyconfig import AGENT_SECRETS
from tests.integration.test_file_policy import cgroup_path, containers, open_from  # noqa: F401 (fixture)

pytestmark = pytest.mark.privileged
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def restricted() -> Iterator[Path]:
    with throwaway_cgroup("swa-r5f") as cg:
        yield cg


def _script(tmp_path: Path, body: str) -> Path:
    s = tmp_path / "agent_side.py"
    s.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\n" + textwrap.dedent(body))
    return s


def test_r5f_1_agent_loading_a_library_through_a_marked_file_deadlocks(tmp_path, restricted):
    """Any agent thread that opens a marked file while holding the interpreter lock (a
    dlopen: ctypes.CDLL, an extension module's import, the dynamic loader reading
    /etc/ld.so.cache) waits for an answer only the answering thread -- which needs that
    lock -- can give: the agent hangs, and with it every open of every marked file on the
    host, until the agent is killed. The real path: the GPU source with no driver calls
    CDLL("libnvidia-ml.so.1") at start and every 60 s after (ABSENT_RETRY_S), and the
    loader reads /etc/ld.so.cache; a rule over /etc/ (or the library directories) is
    accepted at load: only Python's own directories are refused. Here the marked
    /etc/ld.so.cache is a copy bind-mounted in a private mount namespace, so the host's
    is never marked. Expected: refused at load, or answered without the lock (no hang)."""
    cache = tmp_path / "ld.so.cache"
    cache.write_bytes(Path("/etc/ld.so.cache").read_bytes())
    script = _script(tmp_path, f"""
        import asyncio, time
        from agent.config import Config
        from agent.filepolicy import FilePolicy
        from agent.policyconfig import FileRule, Policy, check_files
        from agent.sources.nvml import Nvml
        rules = (FileRule(name="etc", paths=("/etc/",), cgroups=({cgroup_path(restricted)!r},)),)
        try:
            check_files(rules)
        except ValueError as e:
            print("REFUSED", e, flush=True); raise SystemExit(0)
        p = FilePolicy(Config(policy=Policy(files=rules)))
        p.start(asyncio.new_event_loop(), lambda e: None)
        assert p.state == "loaded", p.status()
        print("LOADED", p.status()["marks"], flush=True)
        t = time.monotonic()
        try:
            Nvml(None).open()      # the GPU source's open: no driver here -> Absent
        except Exception as e:
            print("nvml:", type(e).__name__, flush=True)
        print("DONE", round(time.monotonic() - t, 3), flush=True)
        p.close()
        """)
    # /etc in the private namespace: a tmpfs with the host's entries bind-mounted read
    # only would still be the host's inodes, so only ld.so.cache is a copy; the rule
    # marks the tmpfs (the namespace's /etc) and that copy, nothing of the host's.
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "ld.so.cache").write_bytes(cache.read_bytes())
    sh = f'mount --bind "{etc}" /etc && exec "{sys.executable}" "{script}"'
    try:
        out = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", sh],
                             capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the agent deadlocked on its own dlopen of a marked file: {e.stdout!r}"
                    f" {e.stderr!r}")
    assert "REFUSED" in out.stdout or "DONE" in out.stdout, out


def test_r5f_2_agent_in_its_own_pid_namespace_enforces_nothing_but_says_loaded(tmp_path, restricted):
    """An agent started in a pid namespace of its own (a DaemonSet without hostPID, a
    container run without --pid=host) sees every opener as pid 0, which it allows: no
    open is refused, and status says "loaded" with no reason. Expected: enforced, or
    status degraded saying why (the exec/GPU code already detects this namespace)."""
    secret = tmp_path / "secret"
    secret.write_text("key")
    script = _script(tmp_path, f"""
        import asyncio
        from agent.config import Config
        from agent.filepolicy import FilePolicy
        from agent.policyconfig import FileRule, Policy
        rules = (FileRule(name="s", paths=({str(secret)!r},), cgroups=({cgroup_path(restricted)!r},)),)
        p = FilePolicy(Config(policy=Policy(files=rules)))
        p.start(asyncio.new_event_loop(), lambda e: None)
        print("STATE", p.state, flush=True)
        sys.stdin.readline()
        p.close()
        """)
    agent = subprocess.Popen(["unshare", "-pf", "--mount-proc", sys.executable, str(script)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        state = agent.stdout.readline().split()[-1]
        got = open_from(restricted, secret)
    finally:
        agent.communicate("x\n", timeout=20)
    assert got == "EPERM" or state != "loaded", \
        f"the workload read the denied file ({got}) while the policy said {state!r}"


def test_r5f_3_a_planted_symlink_makes_the_agent_mark_what_load_refuses(tmp_path, restricted):
    """A configured path that does not exist yet is marked by the rescan after it appears,
    following symlinks. A workload that can create that name (a world-writable parent,
    a user's home, a shared scratch) makes it a symlink to /proc/..., /, /usr/lib or the
    agent's own code -- the very paths refused at load -- and the next rescan marks
    there (up to 20,000 inodes, 8 levels deep): every open on the host under them then
    waits on the agent (or deadlocks it, see r5f_1). Here the target is the agent's own
    package (this worktree's copy: no other process uses it), which load refuses because
    the answering thread may open it. Expected: the rescan does not follow a symlink to a
    place load would refuse (re-validate the resolved path, or mark with
    FAN_MARK_DONT_FOLLOW and walk with O_NOFOLLOW)."""
    ws = tmp_path / "scratch"
    ws.mkdir()
    ws.chmod(0o1777)
    target = str(REPO / "agent" / "sources")
    from agent.policyconfig import check_files
    with pytest.raises(ValueError, match="agent's own code"):
        check_files((FileRule(name="p", paths=(target + "/",), cgroups=("/x",)),))
    p = FilePolicy(Config(policy=Policy(files=(
        FileRule(name="w", paths=(f"{ws}/secrets/",), cgroups=(cgroup_path(restricted),)),))))
    p.start(asyncio.new_event_loop(), lambda e: None)
    try:
        assert open_from(restricted, f"{target}/abi.py") == "OK"
        # The workload plants the name (any user who may write the scratch directory).
        os.symlink(target, ws / "secrets")
        p.gate.rescan()
        got = open_from(restricted, f"{target}/abi.py")
        marks = p.status()["marks"]
    finally:
        p.close()
    assert got == "OK" and marks == 0, \
        f"the agent marked {target} through a planted symlink ({marks} marks; open: {got})"


def test_r5f_4_default_rule_leaves_docker_containers_of_the_systemd_driver_free(tmp_path, containers):
    """The default rule ("no workload opens the agent's configuration": its control API's
    TLS key, mesh and Alertmanager credentials) names WORKLOAD_CGROUPS: /kubepods.slice,
    /kubepods, /docker, /machine.slice. Docker's systemd cgroup driver -- its default on
    a cgroup v2 host with systemd (Debian 12, Ubuntu 22.04+, RHEL 9) -- puts every
    container at /system.slice/docker-ID.scope, which no default names: a container run
    with a host mount (-v /etc:/host/etc, -v /:/host) reads the agent's keys. The egress
    default covers those containers by their bridge; the file policy has no such
    fallback, and its config cannot name them (cgroups are subtrees -- /system.slice is
    the host's services -- and containers are exact ids). Expected: the default refuses
    a /system.slice/docker-ID.scope container (e.g. by runtime-scope patterns)."""
    container, _, _ = containers
    secret = tmp_path / "swarm-agent" / "tls.key"
    secret.parent.mkdir()
    secret.write_text("key")
    rule = FileRule(name=AGENT_SECRETS.name, paths=(f"{secret.parent}/",),
                    cgroups=AGENT_SECRETS.cgroups, containers=AGENT_SECRETS.containers)
    p = FilePolicy(Config(policy=Policy(files=(rule,))))
    p.start(asyncio.new_event_loop(), lambda e: None)
    try:
        got = open_from(container, secret)
    finally:
        p.close()
    assert got == "EPERM", f"a Docker container ({cgroup_path(container)}) read the agent's key: {got}"


def test_r5f_5_files_written_in_a_covered_directory_grow_the_kernel_marks_without_bound(tmp_path):
    """MAX_MARKS (README: "up to 20,000 marks in all") bounds only the agent's own
    count, and that count is rebuilt from the last walk at every rescan (5 s), dropping
    the marks added at first open (_mark_fd) although the kernel keeps them. A workload
    allowed to write somewhere under a rule's directory (a rule over /var/lib/kubelet/
    holds the pods' emptyDirs; a rule keeping team A out of team B's /data/b/ is written
    by team B) makes files: each gets a permanent inode mark (at its creating open, then
    at each rescan, newest first), every one pinning its inode in kernel memory charged
    to the agent's memory cgroup -- without bound -- while status shows a handful of
    marks. Expected: the kernel's marks stay within MAX_MARKS."""
    from agent.enforce.fanotify import MAX_MARKS
    scratch = Path("/dev/shm") / f"swa-r5f-{os.getpid()}"
    scratch.mkdir()
    try:
        p = FilePolicy(Config(policy=Policy(files=(
            FileRule(name="data", paths=(f"{scratch}/",), cgroups=("/swa-r5f-nobody.slice",)),))))
        p.start(asyncio.new_event_loop(), lambda e: None)
        try:
            writer = ("import os,sys\nd,a,b=sys.argv[1],int(sys.argv[2]),int(sys.argv[3])\n"
                      "for i in range(a,b): os.close(os.open(f'{d}/f{i}', os.O_CREAT|os.O_WRONLY))\n")
            per = MAX_MARKS * 3 // 4
            for cycle in range(2):     # two rescan periods of the workload writing files
                subprocess.run([sys.executable, "-c", writer, str(scratch), str(cycle * per),
                                str((cycle + 1) * per)], check=True, timeout=120)
                p.gate.rescan()
            with open(f"/proc/self/fdinfo/{p.gate.rules[0].group}") as f:
                held = sum(1 for line in f if line.startswith("fanotify ino:"))
            counted = p.status()["marks"]
        finally:
            p.close()
    finally:
        subprocess.run(["rm", "-rf", str(scratch)], timeout=60)
    assert held <= MAX_MARKS + 1, \
        f"the kernel holds {held} marks of this gate (MAX_MARKS {MAX_MARKS}; status says {counted})"


def test_r5f_6_a_directory_written_without_its_slash_protects_nothing_and_says_loaded(tmp_path, restricted):
    """`paths: [/etc/kubernetes/pki]` -- a directory written the way every other tool
    takes one, without the trailing "/" -- is marked as a file: the directory's own inode,
    no FAN_EVENT_ON_CHILD. Its files are not covered, and load, status ("loaded", no
    reason, nothing uncovered) and check-config all accept it. Expected: refused at load
    ("a directory: write it with a trailing /"), marked as a directory, or degraded."""
    d = tmp_path / "pki"
    d.mkdir()
    (d / "ca.key").write_text("key")
    p = FilePolicy(Config(policy=Policy(files=(
        FileRule(name="pki", paths=(str(d),), cgroups=(cgroup_path(restricted),)),))))
    p.start(asyncio.new_event_loop(), lambda e: None)
    try:
        got = open_from(restricted, d / "ca.key")
        st = p.status()
    finally:
        p.close()
    assert got == "EPERM" or st["state"] != "loaded", \
        f"the workload read {d}/ca.key ({got}) while the policy said {st['state']!r} {st['reason']!r}"


def test_r5f_7_short_jobs_fill_the_scope_table_forever_and_later_violators_go_unnamed():
    """Denials are rate-limited per (rule, opening cgroup) in a table of MAX_SCOPES
    entries that never forgets one: 4096 cheap short jobs (Slurm gives each its own
    cgroup; one denied open each) fill it for the agent's lifetime, and from then on
    every other workload's refusals -- hours later, of a different tenant -- are
    reported as cgroup "(other workloads)", no container, one shared incident: the
    violator is never named. Expected: scopes idle and reported are forgotten (or the
    least recent evicted), so a new violator is reported under its own cgroup."""
    from agent.filepolicy import MAX_SCOPES, REPORT_EVERY_S
    events: list = []
    p = FilePolicy(Config(policy=Policy(files=(
        FileRule(name="s", paths=("/nonexistent-r5f/",), cgroups=("/system.slice/slurmstepd.scope",)),))))
    p._emit = events.append          # as start() sets it; no fanotify needed for this
    t0 = time.monotonic()
    for i in range(MAX_SCOPES):      # the jobs: one refused open each, then they end
        p._on_denied(0, 1000 + i, f"/system.slice/slurmstepd.scope/job_{i}", "/usr/bin/cat", "/x")
    p.flush(t0)
    # An hour later, another tenant's job is refused.
    victim = "/system.slice/slurmstepd.scope/job_99999"
    p._on_denied(0, 99999, victim, "/usr/bin/python3", "/x")
    p.flush(t0 + 3600 + REPORT_EVERY_S)
    last = events[-1].fields
    assert last["cgroup"] == victim, f"reported as {last['cgroup']!r}, entity {events[-1].subject!r}"
