"""The activity probe against the real kernel: activity.bpf.o loaded in the host's
namespace (the test process is the "agent", never reported; its own probes.process_owners
directory), triggered by child processes that run in a throwaway cgroup and in the lab's
namespaces (veth pair): outbound connects, listeners, sends, execs. Its tracepoints are
host-global, so every assertion matches the cgroup or pids this test made."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.config import Config, Probes
from agent.sources import capability
from agent.sources.abi import ACTIVITY_OBJECT, ActivityProg
from agent.sources.activity import ActivityProbe
from swarmlab.breachlab import throwaway_cgroup
from swarmlab.lab import wait_for
from tests.conftest import skip_unsupported

pytestmark = pytest.mark.privileged
REPO = Path(__file__).resolve().parents[2]
PY = os.path.realpath(sys.executable)


def id_of(path: str) -> str:
    st = os.stat(path)
    return f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}:{st.st_ino}"


def require_probe() -> None:
    if shutil.which("clang") is None and not ACTIVITY_OBJECT.exists():
        skip_unsupported("no clang to build probes/activity.bpf.o")
    subprocess.run(["make", "-s", "-C", str(REPO / "probes")], check=True, timeout=300)
    caps = capability.probe()
    for need in ("btf", "tracepoint", "tracefs"):
        if not caps[need][0]:
            skip_unsupported(f"{need}: {caps[need][1]}")


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> Config:
    d = tmp_path_factory.mktemp("activity")
    return Config(state_dir=str(d), probes=Probes(process_owners=str(d / "owners")))


def open_probe(cfg: Config, **kw) -> ActivityProbe:
    require_probe()
    p = ActivityProbe(cfg, **kw)
    p.open()
    bad = {k: v for k, v in p.status().items() if v["state"] != "loaded"}
    if bad:
        p.close()
        skip_unsupported(f"activity probe degraded here: {bad}")
    return p


@pytest.fixture(scope="module")
def probe(cfg):
    p = open_probe(cfg)
    yield p
    p.close()


class Collector:
    """Every event the probe queued, kept across polls (the ring buffer is shared by the
    module's tests)."""

    def __init__(self, probe: ActivityProbe):
        self.probe, self.events = probe, []

    def until(self, pred, timeout_s: float = 5.0) -> list:
        def seen():
            self.events += self.probe.poll()
            return [e for e in self.events if pred(e)]
        return wait_for(seen, timeout_s)

    def settle(self, s: float = 0.3) -> None:
        """Let late events arrive (none expected), and take them."""
        time.sleep(s)
        self.events += self.probe.poll()


def in_cgroup(cg: Path, argv: list[str], ns: str | None = None) -> subprocess.CompletedProcess:
    """Run argv in cgroup `cg` (and in network namespace `ns`: entered after joining the
    cgroup, as `ip netns exec` mounts a /sys of its own), waiting for it."""
    pre = ["ip", "netns", "exec", ns] if ns else []
    script = f'echo $$ > "{cg}/cgroup.procs" && exec "$@"'
    return subprocess.run(["sh", "-c", script, "sh", *pre, *argv], capture_output=True,
                          text=True, timeout=30, check=True)


CLIENT = r"""
import ctypes, json, os, socket, sys
libc = ctypes.CDLL(None)
libc.prctl(15, b"kworker/0:1", 0, 0, 0)        # PR_SET_NAME: the process's own claim
host, port, closed, black = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
s = socket.create_connection((host, port), timeout=5)
mine = s.getsockname()[1]
s.sendall(b"x" * 50000)
s.shutdown(socket.SHUT_WR)
while s.recv(65536):
    pass
s.close()
try:
    socket.create_connection((host, closed), timeout=5)
except ConnectionRefusedError:
    pass
f = socket.socket()
f.setblocking(False)
try:
    f.connect((black, 9))
except BlockingIOError:
    pass
f.close()                       # given up while connecting
print(json.dumps({"pid": os.getpid(), "sport": mine}))
"""

SERVER = r"""
import socket, sys
srv = socket.socket()
srv.bind(("0.0.0.0", 0))
srv.listen()
print(srv.getsockname()[1], flush=True)
c, _ = srv.accept()
n = 0
while (chunk := c.recv(65536)):
    n += len(chunk)
c.close()
print(n, flush=True)
"""


def test_connects_listen_and_close_with_identity_from_the_kernel(probe, lab):
    seen = Collector(probe)
    server = subprocess.Popen(["ip", "netns", "exec", lab.victim, PY, "-c", SERVER],
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        with throwaway_cgroup("swa-act") as cg:
            nobody = lab.addr("victim")[:-1] + "9"       # no host there: never answers
            out = in_cgroup(cg, [PY, "-c", CLIENT, lab.addr("victim"), str(port), "1", nobody],
                            ns=lab.attacker)
            me = json.loads(out.stdout)
            assert int(server.stdout.readline()) == 50000
            mine = lambda e: e.fields.get("pid") == me["pid"]
            got = seen.until(lambda e: mine(e) and e.kind in ("flow.connect", "flow.close")
                             and len([x for x in seen.events if mine(x)]) >= 4)
            listen = seen.until(lambda e: e.kind == "flow.listen" and e.subject == f"tcp/{port}")
    finally:
        server.kill()
        server.wait()
    by = {(e.kind, e.fields["outcome"]): e for e in got}
    est = by[("flow.connect", "established")]
    f = est.fields
    assert est.subject == lab.addr("victim") and f["daddr"] == lab.addr("victim")
    assert f["dport"] == port and f["sport"] == me["sport"] and f["family"] == 4
    assert f["proto"] == "tcp" and f["saddr"] == lab.addr("attacker")
    assert f["cgroup"] == "/" + cg.name and f["container"] == ""
    # identity is the kernel's: the renamed process still runs the interpreter's inode
    assert f["exe_id"] == id_of(PY) and f["comm"] == "kworker/0:1"
    assert f["exe"] == PY and f["uid"] == 0
    assert est.first_mono_ns <= est.mono_ns
    refused = by[("flow.connect", "refused")]
    assert refused.fields["dport"] == 1 and refused.fields["err"] == 111
    assert by[("flow.connect", "failed")].fields["err"] != 111
    close = by[("flow.close", "closed")]
    assert close.fields["bytes_out"] >= 50000 and close.fields["bytes_in"] >= 0
    assert close.first_mono_ns == est.first_mono_ns
    assert close.fields["duration_ns"] == close.mono_ns - close.first_mono_ns > 0
    assert listen[0].fields["port"] == port and listen[0].fields["family"] == 4
    assert listen[0].fields["pid"] == server.pid and listen[0].fields["exe_id"] == id_of(PY)


def test_exec_new_once_per_cgroup_file_and_again_elsewhere(probe, tmp_path):
    seen = Collector(probe)
    exe = tmp_path / "fresh-true"
    shutil.copy("/usr/bin/true", exe)       # an inode never exec'd before
    with throwaway_cgroup("swa-act") as a, throwaway_cgroup("swa-act") as b:
        probe.poll_counters(time.monotonic_ns())
        for _ in range(3):
            in_cgroup(a, [str(exe)])
        in_cgroup(b, [str(exe)])
        new = lambda cg: [e for e in seen.events if e.kind == "activity.exec_new"
                          and e.fields["exe_id"] == id_of(str(exe)) and e.fields["cgroup"] == "/" + cg.name]
        seen.until(lambda e: new(a) and new(b))
        seen.settle()
        assert len(new(a)) == 1 and len(new(b)) == 1
        ev = new(a)[0]
        assert ev.subject == f"pid:{ev.fields['pid']}" and ev.fields["exe"] == str(exe)
        assert ev.fields["exe_sha256_state"] in ("ok", "gone")
        counts = {e.fields["cgroup"]: e for e in probe.poll_counters(time.monotonic_ns())
                  if e.kind == "activity.counts"}
    # sh exec'd before it joined the cgroup: one exec per run
    assert counts["/" + a.name].fields["execs"] == 3 and counts["/" + b.name].fields["execs"] == 1
    assert counts["/" + a.name].subject == f"cgroup:/{a.name}"
    assert counts["/" + a.name].fields["window_ns"] > 0


SENDER = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.create_connection((host, port), timeout=5)
s.sendall(b"x" * 100000)
s.close()
u = socket.socket(fam, socket.SOCK_DGRAM)
u.connect((host, 9999))
for _ in range(7):
    u.send(b"y" * 300)
n = socket.socket(fam, socket.SOCK_DGRAM)
for _ in range(3):
    n.sendto(b"z" * 200, (host, 9998))
"""

SINK = r"""
import socket
udp = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
udp[0].bind(("0.0.0.0", 9999))        # no ICMP port unreachable: the sends all succeed
udp[1].bind(("0.0.0.0", 9998))
srv = socket.socket()
srv.bind(("0.0.0.0", 0))
srv.listen()
print(srv.getsockname()[1], flush=True)
c, _ = srv.accept()
while c.recv(65536):
    pass
import time
time.sleep(30)                        # the UDP sockets stay (killed by the test)
"""


def test_flow_bytes_for_tcp_and_udp(probe, lab):
    sink = subprocess.Popen(["ip", "netns", "exec", lab.victim, PY, "-c", SINK],
                            stdout=subprocess.PIPE, text=True)
    try:
        port = int(sink.stdout.readline())
        with throwaway_cgroup("swa-act") as cg:
            probe.poll_counters(time.monotonic_ns())
            in_cgroup(cg, [PY, "-c", SENDER, lab.addr("victim"), str(port)], ns=lab.attacker)
            got = [e for e in probe.poll_counters(time.monotonic_ns())
                   if e.kind == "flow.bytes" and e.fields["cgroup"] == "/" + cg.name]
    finally:
        sink.kill()
        sink.wait()
    by = {(e.fields["proto"], e.fields["daddr"], e.fields["dport"]): e.fields for e in got}
    victim = lab.addr("victim")
    assert by[("tcp", victim, port)]["bytes_out"] == 100000
    assert by[("udp", victim, 9999)]["bytes_out"] == 2100
    assert by[("udp", victim, 9999)]["sends"] == 7
    # unconnected UDP: the kernel's socket has no destination
    assert by[("udp", "", 0)]["bytes_out"] == 600 and by[("udp", "", 0)]["sends"] == 3
    assert all(e.subject == e.fields["daddr"] and e.fields["window_ns"] > 0 for e in got)


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


def test_ipv6_connect_and_bytes(probe, lab):
    seen = Collector(probe)
    v6 = lab.addr("victim", v6=True)
    sink = subprocess.Popen(["ip", "netns", "exec", lab.victim, PY, "-c",
                             SINK.replace('"0.0.0.0"', '"::"').replace("socket.socket()",
                                                                       "socket.socket(socket.AF_INET6)")
                             .replace("socket.AF_INET, socket.SOCK_DGRAM", "socket.AF_INET6, socket.SOCK_DGRAM")],
                            stdout=subprocess.PIPE, text=True)
    try:
        port = int(sink.stdout.readline())
        with throwaway_cgroup("swa-act") as cg:
            probe.poll_counters(time.monotonic_ns())
            in_cgroup(cg, [PY, "-c", SENDER, v6, str(port)], ns=lab.attacker)
            conn = seen.until(lambda e: e.kind == "flow.connect" and e.fields["cgroup"] == "/" + cg.name)
            got = {(e.fields["proto"], e.fields["daddr"]): e.fields for e in probe.poll_counters(
                time.monotonic_ns()) if e.kind == "flow.bytes" and e.fields["cgroup"] == "/" + cg.name}
    finally:
        sink.kill()
        sink.wait()
    f = conn[0].fields
    assert conn[0].subject == v6 and f["family"] == 6 and f["outcome"] == "established"
    assert f["saddr"] == lab.addr("attacker", v6=True)
    assert got[("tcp", v6)]["bytes_out"] == 100000 and got[("tcp", v6)]["family"] == 6
    assert got[("udp", v6)]["bytes_out"] == 2100


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
        assert probes["activity"]["state"] == "loaded", probes["activity"]
        assert probes[ActivityProg.SEND.value]["state"] == "loaded"
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
