"""The per-source windows of probes/net.bpf.c under CPUs counting the same source at once.
The real XDP program is run by BPF_PROG_TEST_RUN (no traffic at all: the kernel runs the
program on a packet buffer) from one thread pinned to each of two CPUs, started together,
so both count into one entry as it is created and as its windows end."""
from __future__ import annotations

import collections
import ctypes
import os
import socket
import struct
import threading

import pytest

from agent.config import Probes
from agent.sources import abi
from agent.sources.net import NetProbe
from tests.conftest import skip_unsupported
from tests.integration.test_net_probe import built  # noqa: F401  (builds net.bpf.o)

pytestmark = pytest.mark.privileged


class Unattached(NetProbe):
    """The network probe loaded, attached nowhere: only BPF_PROG_TEST_RUN runs it."""

    def _attach(self, progs) -> None:
        pass


class RunOpts(ctypes.Structure):      # struct bpf_test_run_opts (libbpf 1.x)
    _fields_ = [("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p),
                ("data_out", ctypes.c_void_p), ("data_size_in", ctypes.c_uint32),
                ("data_size_out", ctypes.c_uint32), ("ctx_in", ctypes.c_void_p),
                ("ctx_out", ctypes.c_void_p), ("ctx_size_in", ctypes.c_uint32),
                ("ctx_size_out", ctypes.c_uint32), ("retval", ctypes.c_uint32),
                ("repeat", ctypes.c_int), ("duration", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32),
                ("batch_size", ctypes.c_uint32)]


_lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
_lib.bpf_prog_test_run_opts.argtypes = [ctypes.c_int, ctypes.POINTER(RunOpts)]


def _checksum(b: bytes) -> int:
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF


def udp_frame(src: str) -> bytes:
    """An Ethernet/IPv4/UDP frame from `src` to 127.0.0.1 port 9 (no socket: unsolicited)."""
    udp = struct.pack("!HHHH", 40000, 9, 26, 0) + b"x" * 18
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton("127.0.0.1"))
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return b"\x00" * 6 + b"\x02" * 6 + b"\x08\x00" + ip + udp


def run_together(fd: int, frame: bytes, repeat: int, cpus: list[int]) -> None:
    """Runs the program `repeat` times on `frame` from each of `cpus` at once."""
    barrier, errors = threading.Barrier(len(cpus)), []

    def one(cpu: int) -> None:
        os.sched_setaffinity(0, {cpu})
        buf = ctypes.create_string_buffer(frame, len(frame))
        opts = RunOpts(sz=ctypes.sizeof(RunOpts), repeat=repeat,
                           data_in=ctypes.cast(buf, ctypes.c_void_p), data_size_in=len(frame))
        barrier.wait()
        if _lib.bpf_prog_test_run_opts(fd, ctypes.byref(opts)) != 0:
            errors.append(os.strerror(ctypes.get_errno()))

    threads = [threading.Thread(target=one, args=(c,)) for c in cpus]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.fixture
def cpus() -> list[int]:
    cpus = sorted(os.sched_getaffinity(0))[:2]
    if len(cpus) < 2:
        skip_unsupported("one CPU: nothing runs at once")
    return cpus


def open_unattached(window_ms: int, thresholds: dict[str, int]) -> Unattached:
    p = Unattached(Probes(window_ms=window_ms), [], thresholds)
    p.open()
    if abi.NetProg.XDP in p.status():        # refused by this kernel (classify)
        p.close()
        skip_unsupported(f"XDP: {p.status()[abi.NetProg.XDP]}")
    return p


def test_two_cpus_creating_a_source_lose_no_count(cpus):
    """Both CPUs count a new source from its first packet: every packet is in its entry
    (the old window_entry() let the second CPU replace the value the first had created,
    or saw the first's start as 584 years past, and threw counts away)."""
    probe = open_unattached(10_000, {"packets": 10 ** 9})
    try:
        fd, repeat, short = probe._obj.program(abi.NetProg.XDP).fd, 5000, []
        for i in range(300):
            src = f"198.51.{100 + i // 250}.{1 + i % 250}"      # TEST-NET-2
            run_together(fd, udp_frame(src), repeat, cpus)
            counted = {s.address: s.packets for s in probe.read_sources()}.get(src)
            if counted != repeat * len(cpus):
                short.append((src, counted))
        assert short == [], f"{len(short)} of 300 sources lost counts: {short[:5]}"
    finally:
        probe.close()


def test_windows_ending_under_two_cpus_alert_once_each(cpus):
    """10 ms windows ending again and again under both CPUs: at most one alert per reason
    per window, every alert labelled with a real window start, and the entry left whole."""
    probe = open_unattached(10, {"packets": 20_000})      # 200 packets per 10 ms window
    try:
        fd = probe._obj.program(abi.NetProg.XDP).fd
        src = "198.51.100.7"
        for _ in range(5):
            run_together(fd, udp_frame(src), 200_000, cpus)
        alerts = [e for e in probe.poll() if e.subject == src]
        assert len(alerts) > 5, alerts                      # windows did end and alert
        starts = collections.Counter((e.fields["reason"], e.first_mono_ns)
                                     for e in alerts)
        assert max(starts.values()) == 1, starts.most_common(3)
        assert all(0 < s < abi.WINDOW_RESETTING for _, s in starts)
        [entry] = [s for s in probe.read_sources() if s.address == src]
        assert 0 < entry.packets <= 2 * 200_000
        assert probe.losses() == 0
    finally:
        probe.close()
