"""The activity probe's decoder (agent.sources.activity) on hand-built kernel records:
the event shapes CONTRACT11 names, address forms, and what it refuses. No BPF loaded."""
from __future__ import annotations

import ctypes
import os
import socket
import sys

import pytest

from agent.config import Config
from agent.detect import triage
from agent.sources import abi
from agent.sources.activity import ActivityProbe
from agent.sources.activitycounts import address


@pytest.fixture()
def probe(tmp_path) -> ActivityProbe:
    from agent.config import Probes
    return ActivityProbe(Config(probes=Probes(process_owners=str(tmp_path))))


def _flow(kind: int, outcome: abi.FlowOutcome, family: int = 2, daddr: bytes = b"\xcb\x00\x71\x07",
          pid: int = 0) -> bytes:
    ev = abi.flow_event(start_ns=1_000, established_ns=2_000, bytes_acked=5001,
                        bytes_received=77, sport=40000, dport=443, family=family,
                        outcome=outcome, err=0)
    ev.hdr.kind, ev.hdr.size, ev.hdr.ts_ns = kind, ctypes.sizeof(ev), 9_000
    ev.proc.cgroup_id, ev.proc.pid, ev.proc.uid = 4242, pid, 1000
    ev.proc.exe.dev, ev.proc.exe.ino = (254 << 20) | 1, 99
    ev.proc.comm[:4] = b"curl"
    ctypes.memmove(ev.daddr, daddr, len(daddr))
    ctypes.memmove(ev.saddr, b"\x0a\x00\x00\x01", 4)
    return bytes(ev)


def test_connect_established(probe):
    e = probe._decode(_flow(abi.EventKind.FLOW_CONNECT, abi.FlowOutcome.ESTABLISHED))
    assert (e.kind, e.subject, e.source) == ("flow.connect", "203.0.113.7", "activity")
    assert (e.first_mono_ns, e.mono_ns) == (1_000, 9_000)
    f = e.fields
    assert f["daddr"] == "203.0.113.7" and f["dport"] == 443 and f["saddr"] == "10.0.0.1"
    assert f["sport"] == 40000 and f["family"] == 4 and f["proto"] == "tcp"
    assert f["outcome"] == "established" and f["comm"] == "curl" and f["uid"] == 1000
    assert f["exe_id"] == "254:1:99" and f["cgroup_id"] == 4242 and f["container"] == ""
    assert "bytes_out" not in f


@pytest.mark.parametrize("outcome,name", [(abi.FlowOutcome.REFUSED, "refused"),
                                          (abi.FlowOutcome.FAILED, "failed")])
def test_connect_outcomes(probe, outcome, name):
    assert probe._decode(_flow(abi.EventKind.FLOW_CONNECT, outcome)).fields["outcome"] == name


def test_close_carries_bytes_and_duration_from_the_connect(probe):
    e = probe._decode(_flow(abi.EventKind.FLOW_CLOSE, abi.FlowOutcome.CLOSED))
    assert e.kind == "flow.close" and e.first_mono_ns == 1_000
    assert e.fields["bytes_out"] == 5001 and e.fields["bytes_in"] == 77
    assert e.fields["duration_ns"] == 8_000 and e.fields["outcome"] == "closed"


def test_listen_subject_is_the_port(probe):
    e = probe._decode(_flow(abi.EventKind.FLOW_LISTEN, abi.FlowOutcome.LISTENING))
    assert e.kind == "flow.listen" and e.subject == "tcp/40000"
    assert e.fields["port"] == 40000 and e.fields["addr"] == "10.0.0.1" and e.fields["family"] == 4


def test_ipv6_and_v4_mapped_destinations(probe):
    v6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    e = probe._decode(_flow(abi.EventKind.FLOW_CONNECT, abi.FlowOutcome.ESTABLISHED, 10, v6))
    assert e.subject == "2001:db8::1" and e.fields["family"] == 6
    mapped = socket.inet_pton(socket.AF_INET6, "::ffff:203.0.113.7")
    e = probe._decode(_flow(abi.EventKind.FLOW_CONNECT, abi.FlowOutcome.ESTABLISHED, 10, mapped))
    assert e.subject == "203.0.113.7" and e.fields["family"] == 4     # one name per peer
    assert address(bytes(16), 10) == ("::", 6)


def test_a_live_process_names_its_executable(probe):
    """exe comes from /proc/PID/exe only while that is the kernel's inode."""
    st = os.stat(f"/proc/{os.getpid()}/exe")
    dev = (os.major(st.st_dev) << 20) | os.minor(st.st_dev)
    ev = abi.flow_event.from_buffer_copy(_flow(abi.EventKind.FLOW_CONNECT,
                                               abi.FlowOutcome.ESTABLISHED, pid=os.getpid()))
    ev.proc.exe.dev, ev.proc.exe.ino = dev, st.st_ino
    assert probe.to_event(ev).fields["exe"] == os.path.realpath(sys.executable)
    ev.proc.exe.ino = st.st_ino + 1                     # another file: never named
    assert probe.to_event(ev).fields["exe"] is None


def test_exec_new_path_that_is_another_file_on_the_host_is_only_claimed(probe):
    ev = abi.exec_new_event()
    ev.hdr.kind, ev.hdr.size, ev.hdr.ts_ns = abi.EventKind.EXEC_NEW, ctypes.sizeof(ev), 5
    ev.proc.pid, ev.proc.cgroup_id = 2**31, 7         # no such process
    ev.proc.exe.dev, ev.proc.exe.ino = 1, 12345
    walked = b"sh\0bin\0usr\0"
    ctypes.memmove(ev.exe_path, walked, len(walked))
    ev.exe_path_len, ev.exe_path_flags = len(walked), abi.WALK_COMPLETE
    e = probe._decode(bytes(ev))
    assert e.kind == "activity.exec_new" and e.subject == f"pid:{2**31}"
    assert e.fields["exe"] is None and e.fields["exe_claimed"] == "/usr/bin/sh"
    assert e.fields["exe_sha256"] is None and e.fields["exe_sha256_state"] == "gone"


def test_bad_records_do_not_decode(probe):
    good = _flow(abi.EventKind.FLOW_CONNECT, abi.FlowOutcome.ESTABLISHED)
    assert probe._decode(good[:100]) is None
    assert probe._decode(b"\x63" + good[1:]) is None          # unknown kind
    other = abi.tcp_remote_event()
    other.hdr.kind, other.hdr.size = abi.EventKind.TCP_RESET, ctypes.sizeof(other)
    assert probe._decode(bytes(other)) is None                # not this probe's kind


def test_a_cgroups_flow_events_are_its_own_in_the_queue(probe):
    """A connect storm competes with its own cgroup's events only (triage.owner)."""
    e = probe._decode(_flow(abi.EventKind.FLOW_CONNECT, abi.FlowOutcome.REFUSED))
    assert triage.owner(e) == ("cgroup", 4242)
