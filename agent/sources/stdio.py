"""Reverse shells wired through pipes, fifos, ptys and unix sockets: who is at the other
end of an exec'd shell's standard streams, and does it hold a network connection?

The kernel reports a watched program (shell/interpreter) exec'd with its stdin and its
stdout or stderr on such channels ("proc.stdio", probes/proc.bpf.c); it cannot see the
other end of a pipe. This module looks, from /proc, off the event loop (one worker
thread at a time, a bounded number of pending shells, drops counted), a few times over
~2 s because a pipeline's members start together and `nc` may connect after `sh` execs:

- a pipe (pipe:[ino]) or fifo (same dev+inode): the processes holding its other end —
  the writers of the shell's stdin, the readers of its stdout/stderr (the open mode in
  /proc/PID/fdinfo), never the shell itself or its children, which share its ends;
- a pty slave /dev/pts/N: the holders of the master (/dev/ptmx with `tty-index: N`);
- a unix socket: the holder of its peer (the kernel sends the peer's inode);
- further, through up to MAX_HOPS processes that only relay (`cat` reading the fifo
  that `nc` writes, `... | cat | cat | sh`): the other ends of a relay's own pipes and
  fifos, in the same direction, and the local ends of its loopback TCP connections.

A process "holds the network" when one of its sockets (socket:[ino]) is a TCP/UDP
socket of its network namespace (/proc/PID/net/{tcp,tcp6,udp,udp6}) connected to a
remote address that is not loopback (a loopback connection is followed as a relay, to
what holds its other end: ssh port forwards, local proxies).

Derived event "proc.stdio_network" (source "bpf.proc.stdio"), emitted when the shell's
input comes from the network; fields (besides the shell's pid, tid, ppid, uid, euid,
comm, parent_comm, cgroup_id, cgroup):

  exe                   the shell's executable path, verified: the kernel's (dev, inode)
                        of its executable equals the path's; None when it cannot be
  stdin/stdout/stderr   "pipe", "fifo", "pty", "unix", ... (agent.sources.abi.StdioKind)
  input_network         stdin leads to a network-holding process
  output_network        stdout or stderr leads to one
  streams               which of stdin/stdout/stderr lead to one
  input_peer_pid/_comm/_exe/_hops, output_peer_pid/_comm/_exe/_hops
                        the network-holding process of each direction (exe: the listed
                        path of its inode, or its own path verified by inode, or None;
                        hops: relays between)
  remote, inbound       the input side's connection ("addr:port"), and whether it was
                        accepted on a listening port (a bind shell, a web terminal)
  checks                how many looks it took
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass
from typing import Callable

from agent.model import Event
from agent.sources.abi import DUP_SYSCALLS, StdioKind
from agent.sources.ident import ListedExes
from agent.sources.procfd import (Conn, Snapshot, access, comm, fifo_id,
                                  fifo_kernel_id, tty_index, verified_exe)

log = logging.getLogger("swarm_agent")
SOURCE = "bpf.proc.stdio"
STREAMS = ("stdin", "stdout", "stderr")
CHECK_AT_S = (0.05, 0.3, 0.8, 1.5, 2.5)   # after the exec: a pipeline's members start together
MAX_PENDING = 256         # shells being correlated at once (see StdioCorrelator)
SNAPSHOT_TTL_S = 0.1      # one /proc pass serves every shell examined within this time
MAX_HOPS = 3              # relays followed between the shell and a network holder
MAX_VISITED = 64          # processes looked at per direction


@dataclass
class Lead:
    """Where one direction of the shell's streams leads."""

    pid: int
    conns: list[Conn]
    hops: int
    comm: str | None = None
    exe: str | None = None      # verified by inode (procfd.verified_exe)
    exempt: bool = False        # its executable is one of breach.remote_access (by inode)


class Examiner:
    """One look at one shell's streams (blocking: run it in a worker thread)."""

    def __init__(self, snap: Snapshot, shell_pid: int, streams: list[dict],
                 exes: ListedExes | None = None):
        self.snap = snap
        self.shell = shell_pid
        self.streams = streams
        self.exes = exes

    def direction(self, fds: tuple[int, ...], want: int) -> tuple[Lead | None, list[str]]:
        """The network-holding process the shell's `fds` lead to (want: 1 the writers
        into them, 0 the readers of them), and which of those streams lead there."""
        found: Lead | None = None
        names = []
        done: dict[tuple, Lead | None] = {}
        for fd in fds:
            stream = self.streams[fd]
            key = (stream["kind"], stream["ino"], stream["dev"], stream["pty"])
            if key not in done:       # stdout and stderr are often the same pipe
                done[key] = self._follow(self._peers(fd, stream, want), want)
            if done[key]:
                names.append(STREAMS[fd])
                found = found or done[key]
        return found, names

    def _peers(self, fd: int, stream: dict, want: int) -> set[int]:
        kind = stream["kind"]
        if kind == "pty":
            return {p for link in ("/dev/ptmx", "/dev/pts/ptmx")
                    for p, f in self.snap.holders.get(link, ())
                    if p != self.shell and tty_index(p, f) == stream["pty"]}
        if kind == "unix":
            if not stream["ino"]:
                return set()
            return {p for p, _ in self.snap.holders.get(f"socket:[{stream['ino']}]", ())
                    if p != self.shell}
        if kind not in ("pipe", "fifo"):
            return set()
        if kind == "fifo" and fifo_kernel_id(self.shell, fd) != (stream["dev"], stream["ino"]):
            return set()           # not the fifo the kernel saw any more
        return self._ends(self.shell, fd, want)

    def _ends(self, pid: int, fd: int, want: int) -> set[int]:
        """Processes other than the shell and `pid` holding the same pipe or fifo as
        `pid`'s fd open for reading (want 0) or writing (want 1)."""
        link = next((lk for f, lk in self.snap.fds.get(pid, ()) if f == fd), None)
        if link is None:
            return set()
        fifo = None
        if not link.startswith("pipe:["):
            fifo = fifo_id(pid, fd)
            if fifo is None:
                return set()       # a regular file, a terminal, /dev/null: no relay
        out = set()
        for p, f in self.snap.holders.get(link, ()):
            if p in (self.shell, pid) or (fifo is not None and fifo_id(p, f) != fifo):
                continue
            mode = access(p, f)
            if mode == 2 or mode == want:
                out.add(p)
        return out

    def _follow(self, peers: set[int], want: int) -> Lead | None:
        """Breadth first from the shell's direct peers, up to MAX_HOPS relays: the
        relay's own pipes and fifos (those it reads from on the input side, want 1;
        those it writes to on the output side, want 0) and its loopback TCP peers."""
        frontier, seen = sorted(peers), {self.shell, *peers}
        for hops in range(MAX_HOPS + 1):
            for p in frontier:
                conns = self.snap.connections(p)
                if conns:
                    listed = self.exes.of_process(p) if self.exes else None
                    return Lead(p, conns, hops, comm(p), listed or verified_exe(p),
                                listed is not None)
            if hops == MAX_HOPS or len(seen) > MAX_VISITED:
                return None
            nxt: set[int] = set()
            for p in frontier:
                nxt |= self.snap.loopback_peers(p)
                for pfd, link in self.snap.fds.get(p, ()):
                    if not (link.startswith("pipe:[") or link.startswith("/")):
                        continue
                    mode = access(p, pfd)
                    if mode is None or (mode != 2 and mode == want):
                        continue
                    nxt |= self._ends(p, pfd, want)
            frontier = sorted(nxt - seen)
            seen |= nxt
        return None


def examine(event: Event, snap: Snapshot, exes: ListedExes | None = None) -> dict | None:
    """One look; None when the shell is gone, else the derived fields (maybe empty)."""
    f = event.fields
    pid = f["pid"]
    if pid not in snap.fds:      # gone, unless the snapshot stopped short of it
        return {"input": None, "output": None, "streams": []} if snap.partial else None
    ex = Examiner(snap, pid, f["stdio"], exes)
    inp, in_streams = ex.direction((0,), 1)
    out, out_streams = ex.direction((1, 2), 0)
    return {"input": inp, "output": out, "streams": in_streams + out_streams}


def derived_event(event: Event, look: dict, checks: int) -> Event:
    f = event.fields
    # the acting process as the kernel identified it (exe, exe_is, loginuid, ...), not
    # the per-fd detail
    fields = {k: v for k, v in f.items() if k != "stdio"}
    fields.update(input_network=look["input"] is not None,
                  output_network=look["output"] is not None, streams=look["streams"],
                  checks=checks)
    for side in ("input", "output"):
        lead: Lead | None = look[side]
        fields[f"{side}_peer_pid"] = lead.pid if lead else None
        fields[f"{side}_peer_comm"] = lead.comm if lead else None
        fields[f"{side}_peer_exe"] = lead.exe if lead else None
        fields[f"{side}_peer_is"] = ["remote_access"] if lead and lead.exempt else []
        fields[f"{side}_hops"] = lead.hops if lead else None
    conn = look["input"].conns[0] if look["input"] else None
    fields["remote"] = (f"[{conn.remote}]:{conn.port}" if ":" in conn.remote
                        else f"{conn.remote}:{conn.port}") if conn else None
    fields["inbound"] = conn.inbound if conn else None
    return Event("proc.stdio_network", event.subject, event.mono_ns, event.first_mono_ns,
                 fields, SOURCE)


class StdioCorrelator:
    """Correlates "proc.stdio" events off the loop; emits "proc.stdio_network".

    submit() is called on the loop for each event; at most MAX_PENDING shells are being
    looked at. When that many are, a new shell takes the place of the oldest one that
    was already looked at twice (`cut_short`), so a flood of shells cannot hide the next
    one; only when none has been, the new one is dropped (`dropped`). A look that fails
    is logged and counted in `failed`. Looks run one at a time in a worker thread and
    share /proc snapshots (see _snapshot).
    """

    def __init__(self, emit: Callable[[Event], None], exes: ListedExes | None = None,
                 check_at_s: tuple[float, ...] = CHECK_AT_S, max_pending: int = MAX_PENDING):
        self.emit = emit
        self.exes = exes
        self.check_at_s = check_at_s
        self.max_pending = max_pending
        self.dropped = 0
        self.cut_short = 0
        self.failed = 0
        self.partial = 0       # snapshots cut short at MAX_LINKS
        self._tasks: dict[asyncio.Task, int] = {}    # pending shells, oldest first: looks
        self._lock = asyncio.Lock()
        self._snap: tuple[float, Snapshot] | None = None
        self._took_s = 0.0

    def submit(self, event: Event) -> None:
        if event.kind != "proc.stdio":
            return
        if len(self._tasks) >= self.max_pending:
            old = next((t for t, looks in self._tasks.items() if looks >= 2), None)
            if old is None:
                self.dropped += 1
                return
            self.cut_short += 1
            old.cancel()
            del self._tasks[old]
        task = asyncio.get_running_loop().create_task(self._correlate(event))
        self._tasks[task] = 0
        task.add_done_callback(lambda t: self._tasks.pop(t, None))

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def _snapshot(self, since_s: float) -> Snapshot:
        """A /proc snapshot taken after `since_s` (monotonic), reused for SNAPSHOT_TTL_S
        or 4x as long as the last one took: scanning /proc costs at most ~20% of one CPU
        however many shells wait."""
        now = time.monotonic()
        if self._snap is None or self._snap[0] < since_s or \
                now - self._snap[0] > max(SNAPSHOT_TTL_S, 4 * self._took_s):
            snap = Snapshot.take()
            self.partial += snap.partial
            self._took_s = time.monotonic() - now
            self._snap = (now, snap)
        return self._snap[1]

    def look(self, event: Event) -> dict | None:
        return examine(event, self._snapshot(event.mono_ns / 1e9), self.exes)

    async def _correlate(self, event: Event) -> None:
        try:
            result = await correlate_async(event, self.check_at_s, self._look_async)
        except Exception as e:          # one shell's failure never stops the others
            self.failed += 1
            log.error("stdio correlation failed", extra={"subject": event.subject,
                                                         "error": repr(e)})
            return
        if result is not None:
            self.emit(result)

    async def _look_async(self, event: Event) -> dict | None:
        async with self._lock:
            result = await asyncio.to_thread(self.look, event)
        task = asyncio.current_task()
        if task in self._tasks:
            self._tasks[task] += 1
        return result


async def correlate_async(event: Event, check_at_s: tuple[float, ...], look) -> Event | None:
    """Look at each of check_at_s after the exec until both directions lead to the
    network or the shell is gone; the derived event when its input does."""
    best, checks = None, 0
    for at_s in check_at_s:
        delay = event.mono_ns / 1e9 + at_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        result = await look(event)
        checks += 1
        if result is None:
            break
        best = result
        if result["input"] and result["output"]:
            break
    if best is None or best["input"] is None:
        return None
    return derived_event(event, best, checks)


def correlate(event: Event, check_at_s: tuple[float, ...] = CHECK_AT_S,
              exes: ListedExes | None = None) -> Event | None:
    """correlate_async, blocking, with a fresh snapshot per look (tests, tools)."""
    async def look(ev: Event) -> dict | None:
        return examine(ev, Snapshot.take(), exes)
    return asyncio.run(correlate_async(event, check_at_s, look))


def kind_name(kind: int) -> str:
    try:
        return StdioKind(kind).name.lower()
    except ValueError:
        return f"kind{kind}"



# --- decoding the kernel's events (agent/sources/proc.py) ---------------------------------

def exec_stdio_fields(ev) -> dict:
    """Fields of "proc.stdio": stdin/stdout/stderr kinds, and
    `stdio`: per fd {kind, ino, dev (kernel dev_t), rdev, flags, pty (index or None)}."""
    streams = []
    for fd in ev.fd:
        major, minor = fd.rdev >> 20, fd.rdev & 0xFFFFF
        streams.append({"kind": kind_name(fd.kind), "ino": fd.ino, "dev": fd.dev,
                        "rdev": fd.rdev, "flags": fd.flags, "family": fd.family,
                        "pty": (major - 136) * 256 + minor if fd.kind == StdioKind.PTY else None})
    return {"stdin": streams[0]["kind"], "stdout": streams[1]["kind"],
            "stderr": streams[2]["kind"], "stdio": streams}


def dup_fields(ev) -> dict:
    """Fields of "proc.stdio_dup": newfd, syscall, family, remote ("addr:port"), dport,
    sport, sock_ino (the process's executable is in the common fields: exe, exe_is)."""
    v6 = ev.family == socket.AF_INET6
    raw = bytes(ev.daddr[:16] if v6 else ev.daddr[:4])
    addr = ipaddress.ip_address(raw)
    mapped = getattr(addr, "ipv4_mapped", None) or addr
    remote = f"[{mapped}]:{ev.dport}" if mapped.version == 6 else f"{mapped}:{ev.dport}"
    return {"newfd": ev.newfd, "syscall": DUP_SYSCALLS.get(ev.syscall, str(ev.syscall)),
            "family": "inet6" if v6 else "inet", "remote": remote, "dport": ev.dport,
            "sport": ev.sport, "sock_ino": ev.sock_ino}
