"""The activity probe: what the anomaly models learn a machine's normal from
(probes/activity.bpf.c; CONTRACT11 "Events"). Events (agent.model.Event, source
"activity"); every one carries, where known, the acting process: pid, uid, comm (its own
claim: display only), cgroup_id, cgroup (host view, None when it cannot be named),
container ("" outside one), exe_id ("major:minor:inode", the kernel's), exe (path for
display; None when unknown, exe_claimed when the kernel's walk named a path that on the
host is another file).

- "flow.connect", subject the destination address: an outbound TCP connection's outcome,
  "established", "refused" (a RST answered the SYN) or "failed" (timeout, unreachable,
  closed while connecting); daddr, dport, saddr, sport, family (4|6), proto "tcp", outcome,
  err (sk_err). first_mono_ns: SYN_SENT; mono_ns: the outcome.
- "flow.close", subject the destination: an established outbound connection closed;
  as flow.connect (outcome "closed") + bytes_out (acknowledged), bytes_in, duration_ns.
- "flow.listen", subject "tcp/<port>": a socket entered LISTEN; addr, port, family
  (listen() on a socket never bound gets its port during the call: reported at the
  syscall's exit, with it; where syscalls:sys_exit_listen cannot attach, at once with
  port 0).
- "flow.bytes", subject the destination ("" for unconnected UDP): bytes sent per (cgroup,
  destination, port, protocol) since the last poll, on any TCP or UDP socket of the
  sending task (a server's replies to its clients included: the destination is then the
  client, the port the client's): daddr, dport, proto, family, bytes_out, sends, window_ns. Every poll_s for entries that changed, the largest
  bytes_per_poll of them (the rest counted). Needs sock:sock_send_length (Linux >= 6.3);
  without it status says so and bytes come only with flow.close.
- "activity.exec_new", subject "pid:<pid>": the first exec of a file in a cgroup, as the
  kernel's bounded memory (LRU map seen, shared by every cgroup) knows it: an evicted
  entry is reported again, so novelty is for the model's own memory to judge;
  exe_sha256 (None when not read), exe_sha256_state ("ok", "gone": the process ended
  before it was opened, "changed", "too_large", "unreadable", "skipped": more than
  MAX_HASHING being read). The file is opened at decode and read off the loop.
- "activity.counts", subject "cgroup:<path or id>": per-cgroup counters since the last
  poll: execs, connects (attempts), listens, flows_dropped, exec_new_dropped and
  listens_dropped (events the kernel's per-cgroup caps held back: per 5 s at most 256
  connections, 64 exec_new, 32 listeners, each cap its own), window_ns.

Scope: the processes this agent owns (agent.sources.owners), as the process probe; the
agent's own never.
"""
from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import os
import time
from collections import OrderedDict

from agent.config import Config
from agent.model import Event
from agent.sources import abi, execfacts, ident, libbpf
from agent.sources.abi import ActivityMap, ActivityProg, FlowOutcome
from agent.sources.activitycounts import CounterPolls, address
from agent.sources.capability import TRACEFS
from agent.sources.cgroups import CgroupNames
from agent.sources.gpuproc import container_of
from agent.sources.owners import initial_netns_inode, netns_inode
from agent.sources.probe import BpfProbe
from agent.sources.procscope import REFRESH_OWNERS_S, OwnedScope

SOURCE = "activity"
POLL_S = 5.0
NO_SEND_TP = "this kernel has no tracepoint sock:sock_send_length (it came with Linux 6.3)"
NO_BYTES = "flow.bytes not sent, bytes come only with flow.close"
OUTCOMES = {FlowOutcome.ESTABLISHED: "established", FlowOutcome.REFUSED: "refused",
            FlowOutcome.FAILED: "failed", FlowOutcome.CLOSED: "closed"}
EXE_CACHE = 4096
UNNAMED_TTL_S = 60.0    # an executable with no host path is looked for again after this
HELD = {"flow.bytes": "flow.bytes entries not sent (over bytes_per_poll)",
        "activity.counts": "activity.counts entries not sent (over counts_per_poll)",
        "exe_sha256": "new executables not hashed (over MAX_HASHING at once)",
        "flows_dropped": "connections not sent (the kernel's per-cgroup cap)",
        "exec_new_dropped": "exec_new events not sent (the kernel's per-cgroup cap)",
        "listens_dropped": "listeners not sent (the kernel's per-cgroup cap)"}
MAX_HASHING = 4         # exec_new executables hashed at once, off the loop; more: skipped


def _text(raw) -> str:
    return bytes(raw).split(b"\0", 1)[0].decode(errors="replace")


class ActivityProbe(CounterPolls, OwnedScope, BpfProbe):
    """Loads probes/activity.bpf.o. open() loads and attaches (programs the kernel refuses
    are reported degraded by status(), the rest runs); run() emits the ring buffer's
    events and, every poll_s, the counters' deltas (poll_counters) until cancelled.
    Scope as the process probe's: it shares that probe's registration in
    probes.process_owners, or makes its own when there is none (OwnerConflict when
    another live agent owns this namespace)."""

    NAME = "activity"
    PROGS = ActivityProg
    TRACEPOINTS = abi.ACTIVITY_TRACEPOINTS
    RING_MAP = ActivityMap.EVENTS
    LOSS_MAP = ActivityMap.LOSSES
    OPTIONAL = frozenset({ActivityProg.SEND, ActivityProg.LISTEN_EXIT})

    def __init__(self, cfg: Config, *, agent_tgid: int | None = None, ring_bytes: int = 1 << 18,
                 flows: int = 16384, bytes_entries: int = 8192, cgroup_entries: int = 4096,
                 seen_entries: int = 16384, flow_cap: int = 256, exec_new_cap: int = 64,
                 listen_cap: int = 32,
                 poll_s: float = POLL_S, bytes_per_poll: int = 512, counts_per_poll: int = 512,
                 object_path: str | os.PathLike = abi.ACTIVITY_OBJECT):
        self.cfg = cfg
        self.agent_tgid = os.getpid() if agent_tgid is None else agent_tgid
        self.sizes = {ActivityMap.EVENTS: ring_bytes, ActivityMap.FLOWS: flows,
                      ActivityMap.FLOW_BYTES: bytes_entries, ActivityMap.CGROUPS: cgroup_entries,
                      ActivityMap.SEEN: seen_entries}
        self.flow_cap, self.exec_new_cap, self.listen_cap = flow_cap, exec_new_cap, listen_cap
        self.poll_s, self.bytes_per_poll, self.counts_per_poll = poll_s, bytes_per_poll, counts_per_poll
        super().__init__(object_path)
        self.init_scope(cfg)
        self._claimed = False
        self.cgroups = CgroupNames()
        self.hasher = execfacts.ExeHasher(cfg.policy.exec_hash_max_bytes)
        self._exes: OrderedDict[ident.FileId, str] = OrderedDict()
        self._unnamed: OrderedDict[ident.FileId, float] = OrderedDict()   # -> retry after
        self._bytes_seen: dict[bytes, tuple[int, int]] = {}     # key -> (bytes, sends)
        self._counts_seen: dict[int, tuple[int, ...]] = {}      # cgroup id -> counters
        self._polled_ns: int | None = None
        # over the per-poll caps; exec_new hashes not read (over MAX_HASHING at once)
        self.dropped = dict.fromkeys(HELD, 0)
        self._opened: dict[tuple[int, int], tuple[int, int, os.stat_result]] = {}
        self._hash_off_loop = False
        self._hashing = 0
        self.full_polls: dict[str, int] = {}     # map -> polls that found it nearly full
        self.full_now: dict[str, bool] = {}      # map -> whether the last poll did
        self.polls = 0

    # --- loading -------------------------------------------------------------------------

    def open(self) -> None:
        """Loads in the calling thread's network namespace, for the processes of it (and,
        in the host's, of every namespace without its own agent)."""
        self.netns, initial = netns_inode(), initial_netns_inode()
        self.host_scope = initial == self.netns
        owner = self.owners.live().get(self.netns)
        if owner is None or owner.pid != os.getpid():
            self.owners.claim(self.netns, os.getpid())
            self._claimed = True
        try:
            BpfProbe.open(self)
        except BaseException:
            self.close()
            raise
        self._polled_ns = time.monotonic_ns()       # the maps start empty now
        if self._status.get(ActivityProg.LISTEN_EXIT.value, {}).get("state") == "loaded":
            self._map(ActivityMap.LISTEN_EXIT_ON).update(ctypes.c_uint32(0), ctypes.c_uint32(1))
        else:
            self._status.setdefault(ActivityProg.LISTEN_EXIT.value, {"state": "degraded",
                                                                       "reason": "not loaded"})
            self._status[ActivityProg.LISTEN_EXIT.value]["reason"] += (
                ": a listen() on a socket never bound is reported with port 0")
        send = self._status.get(ActivityProg.SEND.value)
        if send and send["state"] != "loaded":
            events = TRACEFS / "events"
            category, name = self.TRACEPOINTS[ActivityProg.SEND]
            if events.is_dir() and not (events / category / name).exists():
                send["reason"] = NO_SEND_TP
            send["reason"] += ": " + NO_BYTES
        self._status["activity_scope"] = {"state": "loaded", "reason": (
            "processes of this network namespace and of every one without its own agent"
            if self.host_scope else "processes of this network namespace")}

    def _configure(self, obj: libbpf.Object) -> None:
        for name, size in self.sizes.items():
            obj.map(name).set_max_entries(size)
        rodata = abi.activity_config(
            window_ns=int(self.poll_s * 1e9), agent_tgid=self.agent_tgid, netns_ino=self.netns,
            host_scope=int(self.host_scope), flow_cap=self.flow_cap,
            exec_new_cap=self.exec_new_cap, listen_cap=self.listen_cap)
        obj.map(ActivityMap.RODATA).set_initial_value(bytes(rodata))

    def _fill_maps(self) -> None:
        self.refresh_owners()

    def close(self) -> None:
        BpfProbe.close(self)
        for fd, _, _ in self._opened.values():
            os.close(fd)
        self._opened.clear()
        if self._claimed:
            self.owners.release(self.netns, os.getpid())
            self._claimed = False

    # --- reading -------------------------------------------------------------------------

    def status(self) -> dict[str, dict[str, str]]:
        """BpfProbe.status, plus one "activity" line: what the probe sends, and what its
        bounds held back."""
        out = super().status()
        progs = [out.get(p.value, {}).get("state") for p in ActivityProg]
        full = [f"map {m} nearly full at {n} polls" + (" (the last too)" if self.full_now.get(m)
                                                       else "") + ": counts of evicted entries lost"
                for m, n in self.full_polls.items()]
        held = "; ".join([f"{n} {HELD[kind]}" for kind, n in self.dropped.items() if n] + full)
        if self._obj is None:
            line = {"state": "failed", "reason": "not loaded"}
        elif all(s == "loaded" for s in progs) and not any(self.full_now.values()):
            line = {"state": "loaded", "reason": "connections, listeners, bytes, execs" +
                    (f"; {held}" if held else "")}
        else:
            line = {"state": "degraded", "reason": "; ".join(
                [f"{p.value}: {out[p.value]['reason']}" for p in ActivityProg
                 if out.get(p.value, {}).get("state") != "loaded"] + ([held] if held else []))}
        out["activity"] = line
        return out

    async def run(self, emit) -> None:
        """Emit every event until cancelled: the ring buffer's as they come, the counters'
        every poll_s (read off the loop), and the other agents' registrations re-read
        every REFRESH_OWNERS_S."""
        async def poller() -> None:
            due = time.monotonic() + self.poll_s
            while True:
                await asyncio.sleep(min(REFRESH_OWNERS_S, self.poll_s))
                try:
                    self.refresh_owners()
                except (OSError, RuntimeError):
                    pass        # the last registrations read stay in force
                if time.monotonic() >= due:
                    due += self.poll_s
                    for event in await asyncio.to_thread(self.poll_counters, time.monotonic_ns()):
                        emit(event)

        async def hashed(event: Event) -> None:
            try:
                emit(await asyncio.to_thread(self.finish_hash, event))
            finally:
                self._hashing -= 1

        hashing: set[asyncio.Task] = set()

        def deliver(event: Event) -> None:
            if event.fields.get("exe_sha256_state") != "pending":
                emit(event)
            elif self._hashing >= MAX_HASHING:
                emit(self._skip_hash(event))
            else:
                self._hashing += 1
                t = asyncio.create_task(hashed(event))
                hashing.add(t)
                t.add_done_callback(hashing.discard)

        self._hash_off_loop = True
        task = asyncio.create_task(poller()) if self._ring is not None else None
        try:
            await BpfProbe.run(self, deliver)
        finally:
            self._hash_off_loop = False
            if task:
                task.cancel()
            for t in hashing:
                t.cancel()

    # --- decoding ------------------------------------------------------------------------

    def _decode(self, record: bytes) -> Event | None:
        return self.to_event(abi.decode(record))

    def to_event(self, ev) -> Event | None:
        if isinstance(ev, abi.exec_new_event):
            return self._exec_new(ev)
        if not isinstance(ev, abi.flow_event):
            return None
        common = self._common(ev.proc)
        if ev.hdr.kind == abi.EventKind.FLOW_LISTEN:
            addr, fam = address(ev.saddr, ev.family)
            return Event("flow.listen", f"tcp/{ev.sport}", ev.hdr.ts_ns, ev.hdr.ts_ns,
                         {**common, "addr": addr, "port": ev.sport, "family": fam}, SOURCE)
        daddr, fam = address(ev.daddr, ev.family)
        saddr, _ = address(ev.saddr, ev.family)
        fields = {**common, "daddr": daddr, "dport": ev.dport, "saddr": saddr,
                  "sport": ev.sport, "family": fam, "proto": "tcp",
                  "outcome": OUTCOMES.get(ev.outcome, str(ev.outcome)), "err": ev.err}
        if ev.hdr.kind == abi.EventKind.FLOW_CLOSE:
            fields.update(bytes_out=ev.bytes_acked, bytes_in=ev.bytes_received,
                          duration_ns=ev.hdr.ts_ns - ev.start_ns)
            return Event("flow.close", daddr, ev.hdr.ts_ns, ev.start_ns, fields, SOURCE)
        return Event("flow.connect", daddr, ev.hdr.ts_ns, ev.start_ns, fields, SOURCE)

    def _exec_new(self, ev: abi.exec_new_event) -> Event:
        p, fid = ev.proc, (ev.proc.exe.dev, ev.proc.exe.ino)
        walked = ident.walked_path(ev.exe_path, ev.exe_path_len, ev.exe_path_flags,
                                   abi.WALK_COMPLETE)
        claimed = None
        if walked is not None and self._exe_at(walked, fid):
            self._remember(fid, walked)
        elif walked is not None:
            claimed = walked
        fields = self._common(p)
        if claimed is not None:
            fields["exe_claimed"] = claimed
        fields["exe_sha256"], fields["exe_sha256_state"] = None, self._open_exe(p.pid, fid, ev.hdr.ts_ns)
        return Event("activity.exec_new", f"pid:{p.pid}", ev.hdr.ts_ns, ev.hdr.ts_ns, fields, SOURCE)

    def _open_exe(self, pid: int, fid: ident.FileId, ts_ns: int) -> str:
        """Open what `pid` runs now, while it still runs (the hash is read later, off the
        loop: finish_hash); "pending", or why it cannot be read ("gone", "changed")."""
        try:
            fd = os.open(f"/proc/{pid}/exe", os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError):
            return "gone"
        except OSError:
            return "unreadable"
        st = os.fstat(fd)
        if st.st_ino != fid[1]:
            os.close(fd)
            return "changed"            # it exec'd something else since
        self._opened[(pid, ts_ns)] = (fd, fid[0], st)
        return "pending"

    def finish_hash(self, event: Event) -> Event:
        """The exec_new `event` with exe_sha256 read from the file opened at decode
        (blocking: up to policy.exec_hash_max_bytes are read)."""
        opened = self._opened.pop((event.fields["pid"], event.mono_ns), None)
        if opened is None:
            return event
        fd, dev, st = opened
        try:
            digest, state = self.hasher.digest_fd(fd, dev, st)
        except OSError:
            digest, state = None, "unreadable"
        finally:
            os.close(fd)
        return dataclasses.replace(event, fields={**event.fields, "exe_sha256": digest,
                                                  "exe_sha256_state": state})

    def _skip_hash(self, event: Event) -> Event:
        opened = self._opened.pop((event.fields["pid"], event.mono_ns), None)
        if opened is not None:
            os.close(opened[0])
        self.dropped["exe_sha256"] += 1
        return dataclasses.replace(event, fields={**event.fields, "exe_sha256_state": "skipped"})

    def poll(self) -> list[Event]:
        """BpfProbe.poll; without run() (tests, tools) exec_new hashes are read here."""
        events = super().poll()
        if self._hash_off_loop:
            return events
        return [self.finish_hash(e) if e.kind == "activity.exec_new" else e for e in events]

    def _common(self, p: abi.act_proc) -> dict:
        fid = (p.exe.dev, p.exe.ino)
        cgroup = self.cgroups.path(p.cgroup_id, p.pid)
        return {"pid": p.pid, "uid": p.uid, "comm": _text(p.comm), "cgroup_id": p.cgroup_id,
                "cgroup": cgroup, "container": container_of(cgroup) or "",
                "exe_id": ident.id_text(fid) if p.exe.ino else None,
                "exe": self._exe_of(p.pid, fid)}

    def _exe_of(self, pid: int, fid: ident.FileId) -> str | None:
        """The executable's host path: remembered from an exec_new, else /proc/PID/exe
        while the process still runs that very file."""
        hit = self._exes.get(fid)
        if hit is not None or not fid[1]:
            return hit
        now = time.monotonic()
        if self._unnamed.get(fid, 0.0) > now:
            return None         # looked at lately: a container's or a deleted file
        try:
            path = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            return None         # gone: another process of it may still tell
        if path.endswith(" (deleted)") or not self._exe_at(path, fid):
            self._unnamed[fid] = now + UNNAMED_TTL_S
            self._unnamed.move_to_end(fid)
            while len(self._unnamed) > EXE_CACHE:
                self._unnamed.popitem(last=False)
            return None
        self._remember(fid, path)
        return path

    def _exe_at(self, path: str, fid: ident.FileId) -> bool:
        host = ident.on_host(self.cfg.breach.host_root, path)
        try:
            return ident.file_id(os.stat(host), host) == fid
        except (OSError, ValueError):
            return False

    def _remember(self, fid: ident.FileId, path: str) -> None:
        self._exes[fid] = path
        self._exes.move_to_end(fid)
        while len(self._exes) > EXE_CACHE:
            self._exes.popitem(last=False)
