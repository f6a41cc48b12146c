"""Service isolation of a cgroup delegated to a user, under exactly the unit's capabilities
(CapabilityBoundingSet= from agent.sources.capability.CAPABILITIES, applied with setpriv).

The red-team finding (wip-red1, test_red1_unit_caps.py): such a cgroup's cgroup.freeze
belongs to the user, mode 0644; root without CAP_DAC_OVERRIDE may not write it, so the
freeze failed and isolate_service undid its network cut: no isolation at all. Now the cut
stays, the processes are stopped with SIGSTOP instead (CAP_KILL, pidfd), and the apply
says exactly that (PartiallyApplied). Then the tenant fights back, as the owner of the
cgroup can: it continues its processes and moves one out of the isolated cgroup;
reconcile stops them again, follows the one that left, and says so (Drift.notes).

Real kernel objects: a real cgroup v2 subtree chowned as systemd's Delegate= does, real
processes, a real nftables table in a network namespace of the test's own (unshare -n)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from agent.enforce.cgroup import cgroup2_mount
from agent.sources.capability import CAPABILITIES
from swarmlab.breachlab import remove_cgroup, throwaway_cgroup
from swarmlab.lab import wait_for

pytestmark = pytest.mark.privileged
REPO = Path(__file__).resolve().parents[2]
USER = 65534

# The agent's side, one step per line read from stdin; one JSON line out per step.
AGENT = r"""
import json, subprocess, sys, tempfile, time
from agent.config import Config
from agent.enforce import base
from agent.enforce.base import EnforceError
PartiallyApplied = getattr(base, "PartiallyApplied", ())   # () before it existed
from agent.enforce.cgroup import CgroupEnforcer
from agent.enforce.composite import CompositeEnforcer
from agent.enforce.nft import NftEnforcer
from agent.model import Mitigation, MitigationKind

cfg = Config(state_dir=tempfile.mkdtemp())
agent = "/swa-deleg-not-the-agent"
e = CompositeEnforcer(cfg, nft=NftEnforcer(cfg, agent_cgroup=agent),
                      cgroups=CgroupEnforcer(agent_cgroup=agent))
e.setup([], time.time())
m = Mitigation(MitigationKind.ISOLATE_SERVICE, sys.argv[1], time.time(), None)

def table():
    return subprocess.run(["nft", "list", "table", "inet", "swarm_agent"],
                          capture_output=True, text=True).stdout

for step in sys.stdin:
    step, out = step.strip(), {}
    try:
        if step == "apply":
            try:
                e.apply(m, time.time())
                out["applied"] = "whole"
            except PartiallyApplied as p:
                out.update(applied="partly", in_force=p.in_force, refused=p.refused)
        elif step == "reconcile":
            d = e.reconcile([m], time.time())
            out.update(added=d.elements_added, notes=[t for _, t in d.notes])
        elif step == "lift":
            e.lift(m)
            e.remove()
    except EnforceError as err:
        out["error"] = str(err)
    out["table"] = table()
    print(json.dumps(out), flush=True)
"""


def is_cut(table: str, cg: Path) -> bool:
    """Whether both isolation chains drop the sockets of `cg` (nft lists the cgroup by
    inode, or by path where it resolves one: "unified/..." on a hybrid host)."""
    rel = str(cg.relative_to(cgroup2_mount()))
    rule = re.compile(rf'socket cgroupv2 level {rel.count("/") + 1} '
                      rf'({cg.stat().st_ino}|"([^"]*/)?{re.escape(rel)}") counter .* drop')
    chains = re.findall(r"chain (isolate_in|isolate_out) \{([^}]*)\}", table)
    return len(chains) == 2 and all(rule.search(body) for _, body in chains)


def state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def stopped(pid: int) -> bool:
    return state(pid) in "Tt"


@contextlib.contextmanager
def delegated() -> Iterator[tuple[Path, Path, Path]]:
    """A cgroup owned by USER as Delegate= leaves it, with two children of its own: the
    isolated one ("work") and a sibling the tenant may move processes to ("spare")."""
    with throwaway_cgroup("swa-deleg") as top:
        work, spare = top / "work", top / "spare"
        try:
            for d in (work, spare):
                d.mkdir()
            for d in (top, work, spare):
                for f in ("", "cgroup.freeze", "cgroup.procs", "cgroup.subtree_control"):
                    os.chown(d / f if f else d, USER, USER)
            yield top, work, spare
        finally:
            for d in (work, spare):
                remove_cgroup(d)


class Agent:
    """The agent's enforcer in a child under the unit's bounding set, in a network
    namespace of its own."""

    def __init__(self, target: str):
        caps = ",".join("+" + c.removeprefix("CAP_").lower() for c in CAPABILITIES)
        self.proc = subprocess.Popen(
            ["unshare", "--net", "setpriv", f"--bounding-set=-all,{caps}", "--inh-caps=-all",
             sys.executable, "-c", AGENT, target],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)

    def step(self, what: str) -> dict:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, self.proc.stderr.read()[-2000:] if self.proc.stderr else "no output"
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


def sleepers(cg: Path, n: int) -> list[subprocess.Popen]:
    """`n` processes of the tenant (uid USER) in cgroup `cg`."""
    out = [subprocess.Popen(["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups",
                             "sleep", "60"]) for _ in range(n)]
    for p in out:
        (cg / "cgroup.procs").write_text(str(p.pid))
    return out


def test_isolating_a_delegated_cgroup_degrades_instead_of_vanishing():
    with delegated() as (_top, work, spare):
        path = "/" + str(work.relative_to(cgroup2_mount()))
        procs = sleepers(work, 2)
        agent = Agent(path)
        try:
            got = agent.step("apply")
            # The old behaviour: the freeze failed, the cut was undone, an error raised.
            assert "error" not in got, got["error"]
            assert got["applied"] == "partly"
            assert is_cut(got["table"], work), got["table"]
            assert any(s.startswith("network cut") for s in got["in_force"]), got
            assert any("2 processes stopped with SIGSTOP" in s for s in got["in_force"]), got
            assert any(f"uid {USER}" in s and "Permission denied" in s
                       for s in got["refused"]), got
            assert (work / "cgroup.freeze").read_text().strip() == "0"
            assert all(stopped(p.pid) for p in procs)

            # The tenant (owner of the cgroup) resumes one and moves the other out.
            os.kill(procs[0].pid, signal.SIGCONT)
            wait_for(lambda: not stopped(procs[0].pid), 5.0)
            (spare / "cgroup.procs").write_text(str(procs[1].pid))
            os.kill(procs[1].pid, signal.SIGCONT)
            wait_for(lambda: not stopped(procs[1].pid), 5.0)

            got = agent.step("reconcile")
            assert "error" not in got, got
            assert stopped(procs[0].pid) and stopped(procs[1].pid)
            notes = "\n".join(got["notes"])
            assert f"processes [{procs[0].pid}] of {path} were running again" in notes
            assert f"process {procs[1].pid} left {path} for {path.rsplit('/', 1)[0]}/spare" \
                in notes
            assert is_cut(got["table"], work)

            # Nothing new: a quiet reconcile says nothing.
            assert agent.step("reconcile")["notes"] == []

            got = agent.step("lift")
            assert "error" not in got, got
            wait_for(lambda: not stopped(procs[0].pid) and not stopped(procs[1].pid), 5.0)
        finally:
            agent.close()
            for p in procs:
                p.kill()
                p.wait()


def test_a_cgroup_the_agent_may_freeze_is_frozen_not_stopped():
    """The substitute only where the freezer is refused: a root-owned cgroup is frozen."""
    with throwaway_cgroup("swa-deleg-root") as cg:
        path = "/" + str(cg.relative_to(cgroup2_mount()))
        proc = subprocess.Popen(["sleep", "60"])
        (cg / "cgroup.procs").write_text(str(proc.pid))
        agent = Agent(path)
        try:
            got = agent.step("apply")
            assert got.get("applied") == "whole", got
            assert (cg / "cgroup.freeze").read_text().strip() == "1"
            wait_for(lambda: "frozen 1" in (cg / "cgroup.events").read_text(), 5.0)
            assert state(proc.pid) not in "Tt"     # frozen by the freezer, not signalled
            agent.step("lift")
            assert (cg / "cgroup.freeze").read_text().strip() == "0"
        finally:
            agent.close()
            proc.kill()
            proc.wait()


def test_a_forking_tenant_is_stopped_whole():
    """Pid hopping (fork, exit, fork...) races a pid-by-pid stop; the sweeps end only when
    no new process appears, and a stopped process forks no more."""
    with delegated() as (_top, work, _spare):
        path = "/" + str(work.relative_to(cgroup2_mount()))
        storm = subprocess.Popen(["setpriv", f"--reuid={USER}", f"--regid={USER}",
                                  "--clear-groups", "sh", "-c",
                                  "while :; do /bin/true; sh -c 'sleep 30' & done"],
                                 preexec_fn=lambda: (work / "cgroup.procs").write_text(
                                     str(os.getpid())))
        agent = Agent(path)
        try:
            time.sleep(0.3)
            got = agent.step("apply")
            assert got.get("applied") == "partly", got
            assert not any("did not stop" in s for s in got["refused"]), got
            pids = [int(p) for p in (work / "cgroup.procs").read_text().split()]
            assert len(pids) > 1 and all(stopped(p) or state(p) == "Z" for p in pids)
            time.sleep(0.2)
            assert [int(p) for p in (work / "cgroup.procs").read_text().split()] == pids
        finally:
            agent.close()
            (work / "cgroup.kill").write_text("1")
            storm.wait(timeout=10)
