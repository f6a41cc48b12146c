"""What the probes would have told the agent: turns a node's actions (an exec, a TCP
connection's outcome and close, bytes sent, a socket entering LISTEN, a GPU sample) into
agent.model.Event objects in exactly the shapes of the activity probe, the process probe
and the GPU source (docs/CONTRACT11 "Events"), in time order.

Like the kernel, it aggregates what is high-rate: bytes sent are summed per (cgroup,
destination, port, protocol) and exec counts per cgroup, and handed over at each poll
(every POLL_S); the first exec of a file (exe_id) in a cgroup is an activity.exec_new;
GPU usage is sampled per cgroup every POLL_S. Connections are reported at their outcome
(flow.connect, first_mono_ns = SYN time) and their close (flow.close with bytes).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator

from agent.model import Event

POLL_S = 5.0
GPU_SAMPLE_OFFSET_S = 2.5        # the GPU source samples on its own cadence
NS = 1_000_000_000


@dataclass(frozen=True)
class Exe:
    """An executable file: its path (display), content hash and kernel file id."""

    path: str
    sha256: str | None
    exe_id: str


@dataclass(eq=False)
class Cgroup:
    path: str
    id: int
    container: str = ""        # "" outside a container
    addr: str = "10.0.1.7"     # the address its sockets send from (node or pod IP)


@dataclass(eq=False)
class Proc:
    pid: int
    uid: int
    comm: str
    exe: Exe
    cg: Cgroup
    argv: tuple[str, ...] = ()


@dataclass(eq=False)
class Conn:
    """One outbound TCP connection; `streamed`: its bytes are sent by a stream action,
    so its close does not add them again."""

    proc: Proc
    daddr: str
    dport: int
    syn_t: float
    sport: int = 0
    connected_t: float = 0.0
    streamed: bool = False
    extra: dict = field(default_factory=dict)


def common(p: Proc) -> dict[str, Any]:
    return {"pid": p.pid, "uid": p.uid, "comm": p.comm, "cgroup_id": p.cg.id,
            "cgroup": p.cg.path, "container": p.cg.container, "exe_id": p.exe.exe_id,
            "exe": p.exe.path}


class Kernel:
    """Feed actions (t_s, seq, kind, *args) in time order; get Events back in time order.
    `base_ns` is the CLOCK_MONOTONIC time of t = 0."""

    def __init__(self, base_ns: int):
        self.base_ns = base_ns
        self.next_poll = POLL_S
        self.next_gpu = GPU_SAMPLE_OFFSET_S
        self.sent: dict[tuple, list[int]] = {}       # (cg, daddr, dport, proto) -> [bytes, sends]
        self.streams: list[list] = []                # [cg, daddr, dport, proto, rate, sends/s, t0, t1]
        self.execs: dict[Cgroup, int] = {}
        self.seen: set[tuple[int, str]] = set()       # (cgroup id, exe_id): the kernel's LRU
        self.gpu: dict[Cgroup, tuple[float, int, bool]] = {}
        self.events = 0

    def ns(self, t: float) -> int:
        return self.base_ns + int(t * NS)

    def feed(self, action: tuple) -> Iterator[Event]:
        t = action[0]
        yield from self.until(t)
        kind = action[2]
        yield from getattr(self, "_" + kind)(t, *action[3:])

    def until(self, t: float) -> Iterator[Event]:
        """The polls and GPU samples due up to time t."""
        while True:
            if self.next_gpu <= t and self.next_gpu < self.next_poll:
                yield from self._sample_gpu(self.next_gpu)
                self.next_gpu += POLL_S
            elif self.next_poll <= t:
                yield from self._poll(self.next_poll)
                self.next_poll += POLL_S
            else:
                return

    # -- actions ---------------------------------------------------------------------
    def _exec(self, t: float, p: Proc) -> Iterator[Event]:
        self.execs[p.cg] = self.execs.get(p.cg, 0) + 1
        mono = self.ns(t)
        f = common(p)
        argv = list(p.argv or (p.exe.path,))
        yield Event("proc.exec", f"pid:{p.pid}", mono, mono,
                    {**f, "exe_sha256": p.exe.sha256, "filename": p.exe.path, "argv": argv,
                     "args": " ".join(argv)}, "bpf.proc")
        key = (p.cg.id, p.exe.exe_id)
        if key not in self.seen:
            self.seen.add(key)
            yield Event("activity.exec_new", f"pid:{p.pid}", mono, mono,
                        {**f, "exe_sha256": p.exe.sha256}, "activity")

    def _flow(self, c: Conn, outcome: str) -> dict[str, Any]:
        return {**common(c.proc), "daddr": c.daddr, "dport": c.dport, "saddr": c.proc.cg.addr,
                "sport": c.sport, "family": 6 if ":" in c.daddr else 4, "proto": "tcp",
                "outcome": outcome}

    def _connect(self, t: float, c: Conn, outcome: str) -> Iterator[Event]:
        c.connected_t = t
        yield Event("flow.connect", c.daddr, self.ns(t), self.ns(c.syn_t), self._flow(c, outcome),
                    "activity")

    def _close(self, t: float, c: Conn, bytes_out: int, bytes_in: int) -> Iterator[Event]:
        if not c.streamed and bytes_out:
            self._add(c.proc.cg, c.daddr, c.dport, "tcp", bytes_out, max(1, bytes_out // 1400))
        f = self._flow(c, "closed")
        f.update(bytes_out=bytes_out, bytes_in=bytes_in,
                 duration_ns=self.ns(t) - self.ns(c.connected_t))
        yield Event("flow.close", c.daddr, self.ns(t), self.ns(c.connected_t), f, "activity")

    def _send(self, t: float, cg: Cgroup, daddr: str, dport: int, proto: str, nbytes: int,
              sends: int) -> Iterator[Event]:
        self._add(cg, daddr, dport, proto, nbytes, sends)
        return iter(())

    def _stream(self, t: float, cg: Cgroup, daddr: str, dport: int, proto: str, rate: float,
                sends_per_s: float, t_end: float) -> Iterator[Event]:
        """Bytes sent at an even `rate` (bytes/s) from t to t_end (a persistent connection,
        an upload)."""
        self.streams.append([cg, daddr, dport, proto, rate, sends_per_s, t, t_end])
        return iter(())

    def _listen(self, t: float, p: Proc, port: int, addr: str) -> Iterator[Event]:
        mono = self.ns(t)
        yield Event("flow.listen", f"tcp/{port}", mono, mono,
                    {**common(p), "addr": addr, "port": port, "family": 6 if ":" in addr else 4},
                    "activity")

    def _gpu_proc(self, t: float, p: Proc, gpu_index: int, mem: int) -> Iterator[Event]:
        mono = self.ns(t)
        yield Event("gpu.process", f"pid:{p.pid}", mono, mono, {
            "gpu_index": gpu_index, "gpu_uuid": f"GPU-{gpu_index:08x}-5e1f-4c2a-9d7b-0123456789ab",
            "gpu_name": "NVIDIA H100 80GB HBM3", "process_type": "C", "used_memory_bytes": mem,
            "pid": p.pid, "resolved": True, "cgroup": p.cg.path,
            "container_id": p.cg.container or None,
            "uid": p.uid, "euid": p.uid, "exe": p.exe.path, "comm": p.comm,
            "start_ticks": int(t * 100), "gpu_device_fds": 3, "netns": 4026532000}, "gpu")

    def _gpu_set(self, t: float, cg: Cgroup, util: float, mem: int,
                 authorized: bool) -> Iterator[Event]:
        self.gpu[cg] = (util, mem, authorized)
        return iter(())

    # -- what the kernel hands over periodically -----------------------------------------
    def _add(self, cg: Cgroup, daddr: str, dport: int, proto: str, nbytes: int, sends: int):
        acc = self.sent.setdefault((cg, daddr, dport, proto), [0, 0])
        acc[0] += nbytes
        acc[1] += sends

    def _poll(self, t: float) -> Iterator[Event]:
        lo = t - POLL_S
        live = []
        for s in self.streams:
            cg, daddr, dport, proto, rate, sps, t0, t1 = s
            span = min(t, t1) - max(lo, t0)
            if span > 0:
                jitter = _jitter(f"{daddr}:{dport}:{t}", 0.1)
                self._add(cg, daddr, dport, proto, int(rate * span * jitter),
                          max(1, int(sps * span * jitter)))
            if t1 > t:
                live.append(s)
        self.streams = live
        mono, window = self.ns(t), int(POLL_S * NS)
        for (cg, daddr, dport, proto), (nbytes, sends) in self.sent.items():
            yield Event("flow.bytes", daddr, mono, mono - window, {
                "cgroup_id": cg.id, "cgroup": cg.path, "container": cg.container,
                "daddr": daddr, "dport": dport, "proto": proto, "bytes_out": nbytes,
                "sends": sends, "window_ns": window}, "activity")
        self.sent.clear()
        for cg, n in self.execs.items():
            yield Event("activity.counts", f"cgroup:{cg.path}", mono, mono - window, {
                "cgroup_id": cg.id, "cgroup": cg.path, "container": cg.container,
                "execs": n, "window_ns": window}, "activity")
        self.execs.clear()

    def _sample_gpu(self, t: float) -> Iterator[Event]:
        mono = self.ns(t)
        for cg, (util, mem, authorized) in list(self.gpu.items()):
            u = max(0.0, min(util * _jitter(f"{cg.id}:{t}", 0.03), 800.0)) if util else 0.0
            yield Event("gpu.usage", f"cgroup:{cg.path}", mono, mono - int(POLL_S * NS), {
                "cgroup": cg.path, "container": cg.container, "gpu_util": round(u, 1),
                "gpu_memory_bytes": mem, "authorized": authorized}, "gpu")
            if not util and not mem:
                del self.gpu[cg]     # one zero sample, then silence


def _jitter(key: str, width: float) -> float:
    """A factor in [1 - width, 1 + width] fixed by `key` (no shared generator: what one
    activity sends never shifts another's figures)."""
    return 1.0 + width * ((zlib.crc32(key.encode()) % 2001) / 1000.0 - 1.0)
