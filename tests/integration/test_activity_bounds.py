"""The activity probe's bounds and scope against the real kernel: the per-cgroup caps,
degrading without tracefs, another agent's namespace left to it, the daemon's wiring and
the run path (hashes off the loop, counters every poll). Probes loaded in the host's
namespace with their own probes.process_owners directory; the lab's namespaces and
throwaway cgroups hold what the tests start."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.sources.abi import ActivityProg
from swarmlab.breachlab import throwaway_cgroup
from tests.integration.activitykit import (PY, REPO, Collector, cfg, id_of, in_cgroup,  # noqa: F401
                                          need_bytes, open_probe, probe, require_probe)

pytestmark = pytest.mark.privileged


def test_a_connect_storm_is_capped_per_cgroup_and_hides_no_listener(cfg, lab):
    """Past its cap a cgroup's connections are only counted; a listener it opens after
    the storm is still reported (a cap of its own)."""
    capped = open_probe(cfg, flow_cap=5, poll_s=60.0)
    try:
        seen = Collector(capped)
        storm = ("import socket\nfor _ in range(20):\n try: socket.create_connection"
                 "(('%s', 1), timeout=5)\n except ConnectionRefusedError: pass\n"
                 "s = socket.socket()\ns.bind(('0.0.0.0', 0))\ns.listen()\n"
                 "print(s.getsockname()[1])\n") % lab.addr("victim")
        with throwaway_cgroup("swa-act") as cg:
            capped.poll_counters(time.monotonic_ns())
            port = int(in_cgroup(cg, [PY, "-c", storm], ns=lab.attacker).stdout)
            mine = lambda e: e.fields["cgroup"] == "/" + cg.name
            listen = seen.until(lambda e: e.kind == "flow.listen" and mine(e))
            seen.settle()
            flows = [e for e in seen.events if e.kind == "flow.connect" and mine(e)]
            counts = [e for e in capped.poll_counters(time.monotonic_ns())
                      if e.kind == "activity.counts" and mine(e)]
            status = capped.status()["activity"]
    finally:
        capped.close()
    assert len(flows) == 5 and all(e.fields["outcome"] == "refused" for e in flows)
    f = counts[0].fields
    assert f["connects"] == 20 and f["flows_dropped"] == 15
    assert f["listens"] == 1 and f["listens_dropped"] == 0
    assert [e.fields["port"] for e in listen] == [port]
    assert "15 connections not sent (the kernel's per-cgroup cap)" in status["reason"]


DEGRADED = """
import json, sys
from agent.config import Config, Probes
from agent.sources.activity import ActivityProbe
p = ActivityProbe(Config(probes=Probes(process_owners=sys.argv[1])))
p.open()
print(json.dumps(p.status()))
p.close()
"""


def test_degrades_with_a_reason_without_tracefs(lab, tmp_path):
    """`ip netns exec` gives a fresh /sys without tracefs: every tracepoint is refused,
    the probe says why and does not crash."""
    require_probe()
    out = subprocess.run(["ip", "netns", "exec", lab.victim, sys.executable, "-c", DEGRADED,
                          str(tmp_path / "owners")], capture_output=True, text=True, timeout=60,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout.splitlines()[-1])
    for prog in ActivityProg:
        assert status[prog.value]["state"] == "degraded", status
        assert "tracepoint" in status[prog.value]["reason"], status
    assert status[ActivityProg.SEND.value]["reason"].endswith("flow.bytes not sent, bytes "
                                                              "come only with flow.close")
    assert "Linux < 6.3" not in status[ActivityProg.SEND.value]["reason"]
    assert status["activity"]["state"] == "degraded"


def test_another_agents_namespace_is_left_to_it(cfg, lab):
    """The host agent's probe leaves a namespace whose own live agent registered it."""
    from agent.sources.owners import Registry

    probe = open_probe(cfg)
    seen = Collector(probe)
    ino = os.stat(f"/run/netns/{lab.attacker}").st_ino
    holder = subprocess.Popen(["sleep", "30"])       # the other namespace's "agent"
    try:
        Registry(cfg.probes.process_owners).claim(ino, holder.pid)
        probe.refresh_owners()
        with throwaway_cgroup("swa-act") as cg:
            theirs = in_cgroup(cg, ["sh", "-c", "echo $$; exec /usr/bin/true"], ns=lab.attacker)
            ours = in_cgroup(cg, ["sh", "-c", "echo $$; exec /usr/bin/true"])
            true_id = id_of("/usr/bin/true")
            mine = lambda e: (e.kind == "activity.exec_new" and e.fields["cgroup"] == "/" + cg.name
                              and e.fields["exe_id"] == true_id)
            seen.until(mine)
            seen.settle()
            new = [e for e in seen.events if mine(e)]
    finally:
        holder.kill()
        holder.wait()
        probe.close()
    # the first exec of true in the cgroup that this agent owns: not the other namespace's
    assert [e.fields["pid"] for e in new] == [int(ours.stdout)]
    assert int(theirs.stdout) != int(ours.stdout)


def test_run_hashes_new_executables_off_the_loop_and_polls_counters(cfg, tmp_path):
    """As the daemon runs it: the ring buffer's events on the loop, the executable's
    SHA-256 read on a thread, the counters every poll_s."""
    import asyncio
    import hashlib

    exe = tmp_path / "fresh-sleep"
    shutil.copy("/usr/bin/sleep", exe)
    want = hashlib.sha256(exe.read_bytes()).hexdigest()
    probe = open_probe(cfg, poll_s=0.5)
    got: list = []

    async def scenario(cg: Path) -> None:
        task = asyncio.create_task(probe.run(got.append))
        await asyncio.sleep(0.2)
        script = f'echo $$ > "{cg}/cgroup.procs" && exec "{exe}" 1.5'
        child = await asyncio.create_subprocess_exec("sh", "-c", script)
        deadline = time.monotonic() + 5
        mine = lambda e: e.fields.get("cgroup") == "/" + cg.name
        while time.monotonic() < deadline and not (
                any(mine(e) and e.kind == "activity.exec_new" for e in got)
                and any(mine(e) and e.kind == "activity.counts" for e in got)):
            await asyncio.sleep(0.05)
        await child.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    import contextlib
    try:
        with throwaway_cgroup("swa-act") as cg:
            asyncio.run(scenario(cg))
    finally:
        probe.close()
    new = [e for e in got if e.kind == "activity.exec_new" and e.fields["cgroup"] == "/" + cg.name]
    assert len(new) == 1 and new[0].fields["exe_sha256"] == want
    assert new[0].fields["exe_sha256_state"] == "ok" and new[0].fields["exe"] == str(exe)
    counts = [e for e in got if e.kind == "activity.counts" and e.fields["cgroup"] == "/" + cg.name]
    assert counts and counts[0].fields["execs"] == 1


def test_the_agent_opens_it_and_status_shows_its_line(cfg, tmp_path):
    """The daemon's wiring: probes.activity opens the probe, status lists it and its
    programs; false leaves it out, said so."""
    from dataclasses import replace

    from agent.config import Metrics
    from agent.daemon import Agent

    require_probe()
    base = replace(cfg, state_dir=str(tmp_path / "state"), run_dir=str(tmp_path / "run"),
                   metrics=Metrics(listen=None))
    agent = Agent(base)
    agent._open_activity_probe()
    try:
        probes = agent.status()["probes"]
        send = probes[ActivityProg.SEND.value]["state"]       # degraded before Linux 6.3
        assert probes["activity"]["state"] == ("loaded" if send == "loaded" else "degraded")
        assert probes[ActivityProg.SOCK_STATE.value]["state"] == "loaded"
        assert agent.losses() == 0
    finally:
        agent.close()
    assert agent.activity_probe._obj is None            # closed with the agent
    off = Agent(replace(base, probes=replace(base.probes, activity=False)))
    off._open_activity_probe()
    assert off.activity_probe is None
    assert off.status()["probes"]["activity"] == {"state": "disabled",
                                                  "reason": "probes.activity is false"}
    off.close()


UDP_SINK = """
import socket, time
socks = []
for port in range(40000, 40012):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    socks.append(s)
print("ready", flush=True)
time.sleep(30)
"""


def test_flow_bytes_past_the_per_poll_cap_and_a_full_map_are_counted(cfg, lab):
    """One flow.bytes per poll (the largest), the rest counted; a bytes map that fills
    up is reported (its evicted entries' bytes are lost, and status says so)."""
    small = open_probe(cfg, bytes_per_poll=1, bytes_entries=8, poll_s=60.0)
    try:
        need_bytes(small)
    except BaseException:
        small.close()
        raise
    sink = subprocess.Popen(["ip", "netns", "exec", lab.victim, PY, "-c", UDP_SINK],
                            stdout=subprocess.PIPE, text=True)
    sends = ("import socket\nfor port in range(40000, 40012):\n"
             " u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
             " u.connect(('%s', port))\n"
             " for _ in range(50 if port == 40011 else 1): u.send(b'x' * 1000)\n"
             % lab.addr("victim"))
    try:
        assert sink.stdout.readline().strip() == "ready"
        with throwaway_cgroup("swa-act") as cg:
            small.poll_counters(time.monotonic_ns())
            before = small.dropped["flow.bytes"]
            in_cgroup(cg, [PY, "-c", sends], ns=lab.attacker)
            got = [e for e in small.poll_counters(time.monotonic_ns())
                   if e.kind == "flow.bytes"]
            status = small.status()["activity"]
    finally:
        small.close()
        sink.kill()
        sink.wait()
    # one destination port per map entry: 12 of them in an 8-entry map
    assert len(got) == 1 and small.dropped["flow.bytes"] - before >= 6
    mine = [e for e in got if e.fields["cgroup"] == "/" + cg.name]
    assert not mine or (mine[0].fields["dport"] == 40011 and mine[0].fields["bytes_out"] == 50000)
    assert small.full_polls.get("flow_bytes", 0) >= 1
    assert status["state"] == "degraded" and "map flow_bytes nearly full" in status["reason"]
    assert "flow.bytes entries not sent (over bytes_per_poll)" in status["reason"]


def test_without_the_send_tracepoint_the_rest_runs_and_status_says_why(cfg, lab):
    """A kernel without sock:sock_send_length (before 6.3), played by a tracepoint name
    this kernel does not have: that program is degraded with the reason, flow.bytes is
    said to be missing, and connections are still reported."""
    from agent.sources.abi import ACTIVITY_TRACEPOINTS
    from agent.sources.activity import ActivityProbe

    class OldKernel(ActivityProbe):
        TRACEPOINTS = {**ACTIVITY_TRACEPOINTS, ActivityProg.SEND: ("sock", "swa_no_such_tp")}

    require_probe()
    old = OldKernel(cfg)
    old.open()
    try:
        seen = Collector(old)
        status = old.status()
        with throwaway_cgroup("swa-act") as cg:
            in_cgroup(cg, [PY, "-c", "import socket\ntry: socket.create_connection(('%s', 1), "
                           "timeout=5)\nexcept ConnectionRefusedError: pass\n" % lab.addr("victim")],
                      ns=lab.attacker)
            got = seen.until(lambda e: e.kind == "flow.connect" and e.fields["cgroup"] == "/" + cg.name)
    finally:
        old.close()
    send = status[ActivityProg.SEND.value]
    assert send["state"] == "degraded"
    assert send["reason"] == ("this kernel has no tracepoint sock:sock_send_length (it came "
                              "with Linux 6.3): flow.bytes not sent, bytes come only with flow.close")
    assert status["activity"]["state"] == "degraded" and "flow.bytes not sent" in status["activity"]["reason"]
    assert status[ActivityProg.SOCK_STATE.value]["state"] == "loaded"
    assert got[0].fields["outcome"] == "refused"


def test_a_cgroup_is_named_by_its_id_once_its_processes_are_gone():
    """cgroup ids from the kernel -> host paths: by file handle, exact and immediate
    (no walk of the tree, which runs at most once a second)."""
    from agent.sources.cgroups import CgroupNames

    names = CgroupNames()
    names._scanned_at = time.monotonic() + 3600          # no walk during this test
    with throwaway_cgroup("swa-act") as cg:
        (cg / "sub").mkdir()
        assert names.path(os.stat(cg / "sub").st_ino) == f"/{cg.name}/sub"
    assert names.path(2**40 + 12345) is None              # no such cgroup
