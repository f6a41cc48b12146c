"""The process probe: exec and exit, opens of watched paths, kernel module loads, ptrace
attaches and BPF program loads, from probes/proc.bpf.c through one ring buffer.

The tracepoints are host-global; the kernel keeps only the processes this agent owns
(agent.sources.owners) and filters further (see proc.bpf.c); the agent's own process
is never reported. Events (agent.model.Event, source "bpf.proc"); every kind carries the
acting process: pid (tgid, init pid namespace), tid, ppid, uid, euid, comm, parent_comm,
cgroup_id and cgroup (the cgroup v2 path, None when it cannot be resolved):

- "proc.exec", subject "pid:<pid>": filename, argv (list, at most 256 bytes of it), args
  (argv joined by spaces), stdin/stdout/stderr ("closed", "file", "unix", "inet", "inet6",
  "af<N>"), stdio_inet (how many of the three are inet sockets), reason (why the kernel
  sent it: "program", "service_child", "socket_stdio", "all").
- "proc.exit", subject "pid:<pid>" (only of processes whose exec was sent): exit_code
  (the wait status), exit_status, signal.
- "file.open", subject the path: path (as given to open(2)), flags, write (bool),
  syscall ("openat", "openat2", "open", "creat"), pattern (the watch pattern it
  matched), ancestors (comms of parent, grandparent, ... up to pid 1, from /proc).
- "kernel.module_load", subject "module:<name>": name, taints, ancestors.
- "proc.ptrace", subject "pid:<tracer>": request ("attach", "seize"), result, target_pid
  (as the tracer passed it), target_tgid/target_uid/target_euid/target_comm (the global
  tracee, read in the kernel; None when the attach failed), ancestors.
- "bpf.prog_load", subject "pid:<pid>": prog_type, prog_name, insn_cnt, ancestors.
- "proc.stdio_dup", subject "pid:<pid>": an inet socket duplicated onto fd 0-2 (read at
  the exit of dup/dup2/dup3/fcntl F_DUPFD): newfd, syscall, family, remote, dport,
  sport, sock_ino, exe (the executable the kernel held, by inode: a configured one, else
  /proc/PID/exe while still that file, else None).
- "proc.stdio", subject "pid:<pid>": a watched program exec'd with stdin and stdout or
  stderr on pipes/fifos/ptys/unix sockets: stdin/stdout/stderr kinds, stdio (per fd:
  kind, ino, dev, rdev, flags, family, pty), exe. ProcProbe.run correlates these off the
  loop into "proc.stdio_network" (agent/sources/stdio.py).

Socket stdio is read in the kernel at exec (the task's fd table through CO-RE), not from
/proc afterwards: a one-line reverse shell may be gone before user space looks.
"""
from __future__ import annotations

import asyncio
import ctypes
import os

from agent.config import Config, breach_lists, split_pattern
from agent.model import Event
from agent.sources import abi, libbpf, stdio
from agent.sources.abi import ProcMap, ProcProg
from agent.sources.cgroups import CgroupNames, ancestors
from agent.sources.owners import Registry, initial_netns_inode, netns_inode
from agent.sources.probe import BpfProbe

SOURCE = "bpf.proc"
# Programs whose tracepoint only some kernels have (no open/creat on arm64, no
# module:module_load without module support): their absence is expected, not a failure.
OPTIONAL = {ProcProg.OPEN, ProcProg.CREAT, ProcProg.MODULE_LOAD, ProcProg.DUP2_EXIT}
FAMILIES = {0: "closed", abi.STDIO_NOT_SOCKET: "file", 1: "unix", 2: "inet", 10: "inet6"}
REQUESTS = {16: "attach", 0x4206: "seize"}
REFRESH_OWNERS_S = 1.0   # how often the host agent re-reads the other agents' registrations


def _text(raw) -> str:
    return bytes(raw).split(b"\0", 1)[0].decode(errors="replace")


class ProcProbe(BpfProbe):
    """Loads probes/proc.bpf.o: host-global tracepoints, filtered in the kernel.

    open() loads and attaches; programs the kernel refuses, or whose tracepoint this
    kernel lacks, are reported by status() as "degraded" with the reason, the rest runs; a
    missing or broken object raises. run() emits one Event per kernel event until
    cancelled; poll() returns those queued now. losses() counts events the kernel could
    not queue. close() detaches everything and is idempotent.
    """

    NAME = "process"
    PROGS = ProcProg
    TRACEPOINTS = abi.PROC_TRACEPOINTS
    RING_MAP = ProcMap.EVENTS
    LOSS_MAP = ProcMap.LOSSES
    OPTIONAL = frozenset(OPTIONAL)

    def __init__(self, cfg: Config, *, agent_tgid: int | None = None, all_execs: bool = False,
                 ring_bytes: int = 1 << 20, object_path: str | os.PathLike = abi.PROC_OBJECT):
        self.cfg = cfg
        self.agent_tgid = os.getpid() if agent_tgid is None else agent_tgid
        self.all_execs = all_execs
        self.ring_bytes = ring_bytes
        super().__init__(object_path)
        self.patterns = self._patterns()
        self.cgroups = CgroupNames()
        self.owners = Registry(cfg.probes.process_owners)
        self.netns, self.host_scope = 0, False
        lists = breach_lists(cfg)
        self.exes = stdio.ExeIndex((*lists["remote_access"], *lists["service_managers"]))

    def _patterns(self) -> list[tuple[str, str, int]]:
        """(how, text, path_flags) per distinct watch pattern; its index is its rule id."""
        lists = breach_lists(self.cfg)
        reads = {split_pattern(p) for p in lists["read_paths"]}
        out: dict[tuple[str, str], int] = {}
        for p in (*lists["credential_paths"], *lists["agent_paths"], *lists["read_paths"]):
            how, text = split_pattern(p)
            flags = (abi.PATH_EXACT if how == "exact" else 0) | \
                    (abi.PATH_READS if (how, text) in reads else 0)
            out[(how, text)] = out.get((how, text), 0) | flags
        return [(how, text, flags) for (how, text), flags in out.items()]

    # --- loading -------------------------------------------------------------------------

    def open(self) -> None:
        """Loads in, and owns the processes of, the calling thread's network namespace
        (agent.sources.owners); OwnerConflict when another live agent owns them."""
        self.netns, initial = netns_inode(), initial_netns_inode()
        self.host_scope = initial == self.netns
        self.owners.claim(self.netns, os.getpid())
        try:
            super().open()
        except BaseException:
            self.owners.release(self.netns, os.getpid())
            raise
        self._status["process_scope"] = {"state": "loaded", "reason": (
            "processes of this network namespace and of every one without its own agent"
            if self.host_scope else "processes of this network namespace" + (
                "" if initial else " (the host's initial namespace could not be identified)"))}

    def _configure(self, obj: libbpf.Object) -> None:
        obj.map(ProcMap.EVENTS).set_max_entries(self.ring_bytes)
        rodata = abi.proc_config(agent_tgid=self.agent_tgid, all_execs=int(self.all_execs),
                                 netns_ino=self.netns, host_scope=int(self.host_scope))
        obj.map(ProcMap.RODATA).set_initial_value(bytes(rodata))

    def _fill_maps(self) -> None:
        comms: dict[str, int] = {}
        lists = breach_lists(self.cfg)
        for name in lists["shells"]:
            comms[name] = comms.get(name, 0) | abi.COMM_PROGRAM
        for name in lists["service_comms"]:
            comms[name] = comms.get(name, 0) | abi.COMM_SERVICE
        watched = self._map(ProcMap.WATCHED_COMMS)
        for name, flags in comms.items():
            key = abi.comm_key()
            raw = name.encode()[:abi.COMM_LEN - 1]  # the kernel keeps 15 characters
            ctypes.memmove(key.comm, raw, len(raw))
            watched.update(key, ctypes.c_uint32(flags))
        for rule_id, (how, text, flags) in enumerate(self.patterns):
            raw = text.encode()[::-1] if how == "suffix" else text.encode()
            key = abi.path_key(prefixlen=len(raw) * 8)
            ctypes.memmove(key.path, raw, len(raw))
            trie = ProcMap.WATCHED_SUFFIXES if how == "suffix" else ProcMap.WATCHED_PREFIXES
            self._map(trie).update(key, abi.path_rule(flags=flags, len=len(raw), id=rule_id))
        self.refresh_owners()

    def refresh_owners(self) -> None:
        """The host agent: leave the namespaces other live agents registered to them, and
        take back those whose agent is gone (the kernel also does that the moment an
        owner exits). run() calls this every REFRESH_OWNERS_S."""
        if not self.host_scope or self._obj is None:
            return
        live = {ino: o for ino, o in self.owners.live().items() if ino != self.netns}
        by_netns, by_pid = self._map(ProcMap.FOREIGN_NETNS), self._map(ProcMap.FOREIGN_AGENTS)
        u32 = ctypes.c_uint32
        value = lambda x: getattr(x, "value", x)   # batch reads give ints, others c_uint32
        for ino, pid in [(value(k), value(v)) for k, v in by_netns.items(u32, u32)]:
            if ino not in live:
                by_netns.delete(u32(ino))
                by_pid.delete(u32(pid))
        for ino, owner in live.items():
            by_netns.update(u32(ino), u32(owner.pid))
            by_pid.update(u32(owner.pid), u32(ino))
            if not owner.alive():     # exited before its entry was in: the kernel missed it
                by_netns.delete(u32(ino))
                by_pid.delete(u32(owner.pid))

    async def _run_scoped(self, emit) -> None:
        """BpfProbe.run; the host agent also re-reads the other agents' registrations."""
        if not self.host_scope:
            return await super().run(emit)

        async def refresh() -> None:
            scope = dict(self._status["process_scope"])
            while True:
                await asyncio.sleep(REFRESH_OWNERS_S)
                try:
                    self.refresh_owners()
                    self._status["process_scope"] = scope
                except (OSError, RuntimeError) as e:   # keeps the last registrations it read
                    self._status["process_scope"] = {
                        "state": "degraded", "reason": f"cannot read the other agents' registrations: {e}"}

        task = asyncio.create_task(refresh())
        try:
            await super().run(emit)
        finally:
            task.cancel()

    def close(self) -> None:
        super().close()
        if self.netns:
            self.owners.release(self.netns, os.getpid())
            self.netns = 0

    async def run(self, emit) -> None:
        """Emit every event until cancelled; "proc.stdio" events are also correlated off
        the loop into "proc.stdio_network" events (agent.sources.stdio)."""
        self.correlator = stdio.StdioCorrelator(emit, self.exes)

        def both(event: Event) -> None:
            emit(event)
            self.correlator.submit(event)

        try:
            await self._run_scoped(both)
        finally:
            self.correlator.close()

    def status(self) -> dict[str, dict[str, str]]:
        """BpfProbe.status, plus the stdio correlation's counters while run() runs."""
        out = super().status()
        c = getattr(self, "correlator", None)
        if c is not None:
            out["stdio_correlation"] = {
                "state": "degraded" if c.dropped or c.failed else "loaded",
                "reason": f"{c.dropped} shells not examined and {c.cut_short} cut short "
                          f"(over {c.max_pending} pending), {c.failed} failed, "
                          f"{c.partial} /proc snapshots cut short"}
        return out

    # --- decoding ------------------------------------------------------------------------

    def _decode(self, record: bytes) -> Event | None:
        return self.to_event(abi.decode(record))

    def to_event(self, ev: ctypes.Structure | None) -> Event | None:
        if ev is None or not hasattr(ev, "proc"):
            return None
        p = ev.proc
        common = {"pid": p.pid, "tid": p.tid, "ppid": p.ppid, "uid": p.uid, "euid": p.euid,
                  "comm": _text(p.comm), "parent_comm": _text(p.parent_comm),
                  "cgroup_id": p.cgroup_id, "cgroup": self.cgroups.path(p.cgroup_id, p.pid)}
        kind = ev.hdr.kind
        if kind == abi.EventKind.PROC_EXEC:
            name, subject, extra = "proc.exec", f"pid:{p.pid}", _exec_fields(ev)
        elif kind == abi.EventKind.PROC_EXIT:
            code = ev.exit_code
            name, subject = "proc.exit", f"pid:{p.pid}"
            extra = {"exit_code": code, "exit_status": (code >> 8) & 0xFF, "signal": code & 0x7F}
        elif kind == abi.EventKind.FILE_OPEN:
            path = bytes(ev.path[:ev.path_len]).decode(errors="replace")
            how, text, _ = self.patterns[ev.rule_id] if ev.rule_id < len(self.patterns) else ("", "", 0)
            name, subject = "file.open", path
            extra = {"path": path, "flags": ev.flags, "write": bool(ev.flags & 3 or ev.flags & 0o1100),
                     "syscall": abi.OPEN_SYSCALLS.get(ev.syscall, str(ev.syscall)),
                     "pattern": {"suffix": "*" + text, "prefix": text + "*"}.get(how, text),
                     "ancestors": ancestors(p.ppid)}
        elif kind == abi.EventKind.MODULE_LOAD:
            mod = _text(ev.name)
            name, subject = "kernel.module_load", f"module:{mod}"
            extra = {"name": mod, "taints": ev.taints, "ancestors": ancestors(p.ppid)}
        elif kind == abi.EventKind.PTRACE:
            known = ev.target_tgid != 0
            name, subject = "proc.ptrace", f"pid:{p.pid}"
            extra = {"request": REQUESTS.get(ev.request, str(ev.request)), "result": ev.result,
                     "target_pid": ev.target_pid,
                     "target_tgid": ev.target_tgid if known else None,
                     "target_uid": ev.target_uid if known else None,
                     "target_euid": ev.target_euid if known else None,
                     "target_comm": _text(ev.target_comm) if known else None,
                     "ancestors": ancestors(p.ppid)}
        elif kind == abi.EventKind.BPF_PROG_LOAD:
            name, subject = "bpf.prog_load", f"pid:{p.pid}"
            extra = {"prog_type": ev.prog_type, "prog_name": _text(ev.prog_name),
                     "insn_cnt": ev.insn_cnt, "ancestors": ancestors(p.ppid)}
        elif kind == abi.EventKind.STDIO_DUP:
            name, subject = "proc.stdio_dup", f"pid:{p.pid}"
            extra = stdio.dup_fields(ev, self.exes)
        elif kind == abi.EventKind.PROC_STDIO:
            name, subject = "proc.stdio", f"pid:{p.pid}"
            extra = stdio.exec_stdio_fields(ev, self.exes)
        else:
            return None
        return Event(name, subject, ev.hdr.ts_ns, ev.hdr.ts_ns, {**common, **extra}, SOURCE)


def _exec_fields(ev: abi.proc_exec_event) -> dict:
    argv = [a.decode(errors="replace") for a in bytes(ev.args[:ev.args_len]).split(b"\0")]
    if argv and argv[-1] == "":
        argv.pop()
    fams = [FAMILIES.get(f, f"af{f}") for f in ev.stdio_family]
    return {"filename": bytes(ev.filename[:ev.filename_len]).decode(errors="replace"),
            "argv": argv, "args": " ".join(argv),
            "stdin": fams[0], "stdout": fams[1], "stderr": fams[2],
            "stdio_inet": sum(f in ("inet", "inet6") for f in fams),
            "reason": [n for bit, n in abi.EXEC_REASONS.items() if ev.reason & bit]}
