"""The activity probe against the real kernel: activity.bpf.o loaded in the host's
namespace (the test process is the "agent", never reported; its own probes.process_owners
directory), triggered by child processes that run in a throwaway cgroup and in the lab's
namespaces (veth pair): outbound connects, listeners, sends, execs. Its tracepoints are
host-global, so every assertion matches the cgroup or pids this test made."""
from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest

from swarmlab.breachlab import throwaway_cgroup
from tests.integration.activitykit import (PY, Collector, cfg, id_of, in_cgroup,  # noqa: F401
                                          need_bytes, probe)

pytestmark = pytest.mark.privileged

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
            flows = lambda: [e for e in seen.events if e.fields.get("pid") == me["pid"]
                             and e.kind in ("flow.connect", "flow.close")]
            seen.until(lambda e: len(flows()) >= 4)      # established, refused, failed, close
            seen.settle()
            got = flows()
            listen = seen.until(lambda e: e.kind == "flow.listen" and e.subject == f"tcp/{port}")
    finally:
        server.kill()
        server.wait()
    by = {(e.kind, e.fields["outcome"]): e for e in got}
    assert len(got) == len(by) == 4, got             # each once
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
    need_bytes(probe)
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


def test_ipv6_connect_and_bytes(probe, lab):
    need_bytes(probe)
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




def test_a_listener_never_bound_is_reported_with_the_port_it_got(probe):
    """listen() without bind(): the kernel picks the port inside the call, after the
    state change; the event comes at the syscall's exit, with that port."""
    seen = Collector(probe)
    code = ("import socket, time\ns = socket.socket()\ns.listen()\n"
            "print(s.getsockname()[1], flush=True)\ntime.sleep(0.5)\n")
    with throwaway_cgroup("swa-act") as cg:
        port = int(in_cgroup(cg, [PY, "-c", code]).stdout)
        got = seen.until(lambda e: e.kind == "flow.listen" and e.fields["cgroup"] == "/" + cg.name)
    assert port and [(e.subject, e.fields["port"], e.fields["addr"]) for e in got] == \
        [(f"tcp/{port}", port, "0.0.0.0")]
