"""The process probe: exec and exit, opens of watched files, kernel module loads, ptrace
attaches and BPF program loads, from probes/proc.bpf.c through one ring buffer.

The tracepoints are host-global; the kernel keeps only the processes this agent owns
(agent.sources.owners) and filters further (see proc.bpf.c); the agent's own process is
never reported. Identities come from the kernel, never from the process: comm is for
display only. Events (agent.model.Event, source "bpf.proc"); every kind carries the
acting process:

- pid (tgid, init pid namespace), tid, ppid, uid, euid, comm, parent_comm (display),
  cgroup_id and cgroup (the cgroup v2 path, None when it cannot be resolved),
  loginuid and sessionid (audit; None when the process is not from a login),
  service_cgroup (bool: the kernel holds its cgroup for a service's),
- exe (the executable's path as the kernel resolved it, walking mm->exe_file's dentries;
  None when the walk was truncated, or when that path on the host is not this
  executable: the walk ends at the root of the process's own mount namespace, where an
  unprivileged user namespace may bind its own file over /usr/bin/x; then exe_claimed
  holds the walked path, for display), exe_id ("major:minor:inode"), exe_is (sorted names of the
  config's executable lists, config.EXE_LISTS, whose files on this host ARE this
  executable by (dev, ino): ["shells"], ["admin_tools"], ...),
- ancestor_exes (paths, or "major:minor:inode" when unknown, of real_parent's
  executable, its parent's, ... up to 8 levels, read in the kernel), ancestors_are
  (sorted union of the lists those belong to), parent_is (the lists of real_parent's).

Per kind:
- "proc.exec", subject "pid:<pid>": filename (as the caller spelled it), argv (list,
  at most 256 bytes of it), args (argv joined by spaces), stdin/stdout/stderr ("closed",
  "file", "unix", "inet", "inet6", "af<N>"), stdio_inet (how many of the three are inet
  sockets), reason (why the kernel sent it: "program", "service_child", "socket_stdio",
  "all", "service_cgroup", "package_manager": its exit brings a refresh; "policy": the
  exec policy's map is on), and the exec policy's facts (agent/sources/execfacts.py):
  exe_path, exe_location, exe_fs, exe_nlink, exe_memfd, exe_unlinked, exe_known,
  start_ticks, container, and exe_sha256/exe_sha256_state while a rule reads them.
- "proc.exit", subject "pid:<pid>" (only of processes whose exec was sent): exit_code
  (the wait status), exit_status, signal.
- "file.open", subject the path: path (resolved by the kernel from the opened file;
  None when truncated), file_id, dir_id, flags (f_flags), write (opened for writing or
  created), created, syscall ("openat", "openat2", "open", "creat",
  "open_by_handle_at", "io_uring"), match ("file",
  "dir", "name": how the kernel matched it), pattern (the watch pattern), ancestors
  (comms of parent, grandparent, ... from /proc, display only).
- "kernel.module_load", subject "module:<name>": name, taints, ancestors.
- "proc.ptrace", subject "pid:<tracer>": request ("attach", "seize"), result, target_pid
  (as the tracer passed it), target_tgid/target_uid/target_euid/target_comm (the global
  tracee, read in the kernel; None when the attach failed), ancestors.
- "bpf.prog_load", subject "pid:<pid>": prog_type, prog_name, insn_cnt, ancestors.
- "proc.stdio_dup", subject "pid:<pid>": an inet socket duplicated onto fd 0-2 (read at
  the exit of dup/dup2/dup3/fcntl F_DUPFD): newfd, syscall, family, remote, dport,
  sport, sock_ino, exe (the executable the kernel held, by inode: a configured one, else
  /proc/PID/exe while still that file, else None).
- "proc.stdio", subject "pid:<pid>": a watched program, or an executable below no
  directory of breach.system_exec_dirs (kernel map system_dirs), exec'd with stdin and stdout or
  stderr on pipes/fifos/ptys/unix sockets: stdin/stdout/stderr kinds, stdio (per fd:
  kind, ino, dev, rdev, flags, family, pty), exe. ProcProbe.run correlates these off the
  loop into "proc.stdio_network" (agent/sources/stdio.py).

Socket stdio is read in the kernel at exec (the task's fd table through CO-RE), not from
/proc afterwards: a one-line reverse shell may be gone before user space looks.
"""
from __future__ import annotations

import asyncio
import ctypes
import fnmatch
import os
import time
from collections import OrderedDict
from typing import Callable

from agent.config import REFRESH_S, Config
from agent.model import Event
from agent.sources import abi, execfacts, exectarget, ident, libbpf, stdio
from agent.sources.abi import ProcMap, ProcProg
from agent.sources.cgroups import CgroupNames, ancestors
from agent.sources.procscope import OwnedScope
from agent.sources.probe import BpfProbe

SOURCE = "bpf.proc"
# Programs whose tracepoint only some kernels have (no open/creat on arm64, no
# module:module_load without module support): their absence is expected, not a failure.
OPTIONAL = {ProcProg.OPEN, ProcProg.CREAT, ProcProg.MODULE_LOAD, ProcProg.DUP2_EXIT}
FAMILIES = {0: "closed", abi.STDIO_NOT_SOCKET: "file", 1: "unix", 2: "inet", 10: "inet6"}
REQUESTS = {16: "attach", 0x4206: "seize"}
EXE_FLAGS = {"shells": abi.EXE_PROGRAM, "loaders": abi.EXE_PROGRAM, "services": abi.EXE_SERVICE,
             "service_managers": abi.EXE_MANAGER, "package_managers": abi.EXE_PACKAGER}
PATH_CACHE = 4096       # executables' paths remembered from events, by (dev, ino)
CREATED_KEPT = 1024     # files seen created, for attributing a rename over a watched file
CREATED_TTL_NS = 60 * 10**9   # ... and for how long (inode numbers are reused)
SOON_S = 0.5            # refresh this soon after a file is created beside watched ones
TICK_S = 0.25
IA32_SYSCTL = "/proc/sys/abi/vsyscall32"   # exists where x86-64 runs 32-bit syscalls
COMPAT_OFF = "not loaded: probes.compat_syscalls is false"


def _text(raw) -> str:
    return bytes(raw).split(b"\0", 1)[0].decode(errors="replace")


def _fid(f: abi.file_id) -> ident.FileId:
    return f.dev, f.ino


class ProcProbe(OwnedScope, BpfProbe):
    """Loads probes/proc.bpf.o: host-global tracepoints, filtered in the kernel.

    open() loads and attaches; programs the kernel refuses, or whose tracepoint this
    kernel lacks, are reported by status() as "degraded" with the reason, the rest runs; a
    missing or broken object raises. run() emits one Event per kernel event until
    cancelled and re-resolves the watched executables and files every refresh_s;
    refresh() does it now; poll() returns those queued now. losses() counts events the
    kernel could not queue. close() detaches everything and is idempotent. Which
    processes it reports: agent.sources.procscope.
    """

    NAME = "process"
    PROGS = ProcProg
    TRACEPOINTS = abi.PROC_TRACEPOINTS
    RING_MAP = ProcMap.EVENTS
    LOSS_MAP = ProcMap.LOSSES
    OPTIONAL = frozenset(OPTIONAL)
    RAW = abi.PROC_RAW

    def __init__(self, cfg: Config, *, agent_tgid: int | None = None, all_execs: bool = False,
                 ring_bytes: int = 1 << 20, object_path: str | os.PathLike = abi.PROC_OBJECT,
                 refresh_s: float = REFRESH_S):
        self.cfg = cfg
        self.agent_tgid = os.getpid() if agent_tgid is None else agent_tgid
        self.all_execs = all_execs
        self.ring_bytes = ring_bytes
        self.refresh_s = refresh_s
        super().__init__(object_path)
        self.patterns = ident.patterns(cfg)
        self._watch_lists = ident.watch_lists(cfg, self.patterns)
        self.cgroups = CgroupNames()
        self.init_scope(cfg)
        # the stdio correlator's peers (found in /proc, not in an event) by inode
        self.exes = ident.ListedExes(lambda: self.resolved.exes, "remote_access")

        self.resolved = ident.Resolved()
        self._paths: OrderedDict[ident.FileId, str] = OrderedDict()
        # files seen created: (dev, ino) -> (event, created under a watched name)
        self._created: OrderedDict[ident.FileId, tuple[Event, bool]] = OrderedDict()
        self._refresh_due = 0.0
        self.hasher: execfacts.ExeHasher | None = None      # set_exec_policy
        self._tmp_devs = execfacts.own_mount_devs(execfacts.TMP_DIRS, cfg.breach.host_root or "/")
        self._shm_devs = execfacts.own_mount_devs(execfacts.SHM_DIRS, cfg.breach.host_root or "/")

    def set_exec_policy(self, needs) -> None:
        """Switch the kernel's exec policy map (every exec emitted, reason "policy") and
        the hashing of executables, as the loaded rules need (an
        agent.detect.execpolicy.ExecNeeds); OSError: nothing changed."""
        mode = (abi.EXEC_POLICY_OFF if not needs.every_exec else
                abi.EXEC_POLICY_WRITABLE if needs.writable_only else abi.EXEC_POLICY_ALL)
        for dev in self._tmp_devs | self._shm_devs:
            self._map(ProcMap.WRITABLE_DEVS).update(ctypes.c_uint32(dev), ctypes.c_uint8(1))
        for dev, ino in execfacts.dir_ids(execfacts.TMP_DIRS + execfacts.SHM_DIRS,
                                          self.cfg.breach.host_root or "/"):
            self._map(ProcMap.WRITABLE_DIRS).update(abi.file_id(ino=ino, dev=dev),
                                                     ctypes.c_uint8(1))
        self._map(ProcMap.EXEC_POLICY).update(ctypes.c_uint32(0), ctypes.c_uint32(mode))
        self.exec_needs = needs
        if not needs.hash_exes:
            self.hasher = None
        elif self.hasher is None:
            self.hasher = execfacts.ExeHasher(self.cfg.policy.exec_hash_max_bytes)

    # --- loading -------------------------------------------------------------------------

    def _configure(self, obj: libbpf.Object) -> None:
        obj.map(ProcMap.EVENTS).set_max_entries(self.ring_bytes)
        rodata = abi.proc_config(agent_tgid=self.agent_tgid, all_execs=int(self.all_execs),
                                 netns_ino=self.netns, host_scope=int(self.host_scope),
                                 gpu_major=self.cfg.gpu.device_major)
        obj.map(ProcMap.RODATA).set_initial_value(bytes(rodata))

    def _classify(self) -> dict:
        refused = super()._classify()
        if not self.cfg.probes.compat_syscalls:
            refused[ProcProg.COMPAT_EXIT] = ("degraded", COMPAT_OFF)
        return refused

    def open(self) -> None:
        super().open()
        if not self.cfg.probes.compat_syscalls:
            self._set(ProcProg.COMPAT_EXIT, "degraded", COMPAT_OFF)

    def _fill_maps(self) -> None:
        self.refresh()
        self.refresh_owners()

    def refresh(self) -> list[Event]:
        """Re-resolve executables, watched files and service cgroups on the host and bring
        the kernel maps to that: new entries added, stale ones (a replaced binary or
        /etc/shadow renamed over: their old inode may be reused) removed. Returns a
        "file.open" event (match "rename", replaced true) for every watched file that was
        replaced, or appeared in a watched directory, by a file not judged when it was
        opened: with its creator's fields when the kernel saw it created beside watched
        files (sed -i), with none when it never saw it created (moved or linked in from
        elsewhere: the rules treat an unknown writer of a credential file as a breach)."""
        self._refresh_due = time.monotonic() + self.refresh_s
        new = ident.resolve(self.cfg, self.patterns, self.resolved)
        old, self.resolved = self.resolved, new
        replaced = self._replacements(old, new)
        exes = {k: sum(EXE_FLAGS.get(n, 0) for n in lists) for k, (_, lists) in new.exes.items()}
        old_exes = {k for k, (_, lists) in old.exes.items()
                    if any(n in EXE_FLAGS for n in lists)}
        self._sync(ProcMap.WATCHED_EXES, [(_file_key(k), ctypes.c_uint32(v))
                                          for k, v in exes.items() if v],
                   [_file_key(k) for k in old_exes])
        self._sync(ProcMap.WATCHED_FILES, [(_file_key(k), _rule(w)) for k, w in new.files.items()],
                   [_file_key(k) for k in old.files])
        self._sync(ProcMap.WATCHED_DIRS, [(_dir_key(*k), _rule(w, k[1]))
                                          for k, w in new.dirs.items()],
                   [_dir_key(*k) for k in old.dirs])
        self._sync(ProcMap.WATCHED_NAMES, [(_name_key(*k), _rule(w, k[1]))
                                           for k, w in new.names.items()],
                   [_name_key(*k) for k in old.names])
        self._sync(ProcMap.WATCHED_DIR_IDS, [(_file_key(k), ctypes.c_uint8(1))
                                             for k in {d for d, _, _ in new.dirs}],
                   [_file_key(k) for k in {d for d, _, _ in old.dirs}])
        self._sync(ProcMap.SYSTEM_DIRS, [(_file_key(k), ctypes.c_uint8(1))
                                         for k in new.system_dirs],
                   [_file_key(k) for k in old.system_dirs])
        lens = sum(1 << len(n.encode()) for _, n in new.names if len(n.encode()) < abi.NAME_LEN)
        self._map(ProcMap.WATCHED_NAME_LENS).update(ctypes.c_uint32(0), ctypes.c_uint64(lens))
        self._mark_service_cgroups()
        return replaced

    def _replacements(self, old: ident.Resolved, new: ident.Resolved) -> list[Event]:
        if not old.paths:
            return []           # the first resolution: nothing to compare with
        before = {path: fid for fid, path in old.paths.items()}
        old_dirs = {d for d, _, _ in old.dirs}
        now_ns, out = time.monotonic_ns(), []
        for fid in old.files.keys() - new.files.keys():
            self._created.pop(fid, None)           # gone: its inode may be reused
        for fid, path in new.paths.items():
            if before.get(path) == fid or fid in old.files:
                continue        # the same file, or a watched one renamed: judged before
            rec = self._created.pop(fid, None)     # used once: its inode may be reused
            if rec is not None and now_ns - rec[0].mono_ns > CREATED_TTL_NS:
                rec = None
            if rec is not None and rec[1]:
                continue        # created under a watched name: judged when opened
            watch = new.files[fid]
            lists = self._watch_lists[watch.rule_id] if watch.rule_id < len(self._watch_lists) else []
            if rec is None and ("credential_paths" not in lists  # maybe the agent's own
                                or path not in before and not self._watched_dir(old_dirs, path)
                                and os.path.dirname(path) not in old.dir_paths):
                continue        # (its events are never sent), or a directory not watched
                                # (a watched directory moved away and made again is one)
            fields = dict(rec[0].fields) if rec else {}
            fields.update(path=path, file_id=ident.id_text(fid), write=True, created=True,
                          match="rename", replaced=True, watch_lists=lists,
                          pattern=self._pattern_text(watch.rule_id))
            first = rec[0].first_mono_ns if rec else now_ns
            out.append(Event("file.open", path, now_ns, first, fields, SOURCE))
        return out

    def _sync(self, name: str, want: list[tuple], had: list) -> None:
        m = self._map(name)
        keep = {bytes(k) for k, _ in want}
        for key in had:
            if bytes(key) not in keep:
                m.delete(key)
        for key, value in want:
            m.update(key, value)

    def _mark_service_cgroups(self) -> None:
        globs = self.cfg.breach.service_cgroups
        root = self.cgroups.root
        if not globs or root is None:
            return
        m = self._map(ProcMap.SERVICE_CGROUPS)
        for dirpath, _dirs, _files in os.walk(root):
            rel = "/" + os.path.relpath(dirpath, root).removeprefix(".")
            if any(fnmatch.fnmatchcase(rel.rstrip("/") or "/", g) for g in globs):
                try:
                    m.update(ctypes.c_uint64(os.stat(dirpath).st_ino), ctypes.c_uint8(1))
                except OSError:
                    continue

    async def _run_refreshing(self, emit: Callable[[Event], None]) -> None:
        """_run_scoped, and the watch sets re-resolved every refresh_s (sooner when asked)."""
        async def refresher() -> None:
            while True:
                await asyncio.sleep(TICK_S)
                if time.monotonic() >= self._refresh_due:
                    for event in await asyncio.to_thread(self.refresh):
                        emit(event)

        task = asyncio.create_task(refresher()) if self._ring is not None else None
        try:
            await self._run_scoped(emit)
        finally:
            if task:
                task.cancel()

    async def run(self, emit) -> None:
        """Emit every event until cancelled; "proc.stdio" events are also correlated off
        the loop into "proc.stdio_network" events (agent.sources.stdio)."""
        self.correlator = stdio.StdioCorrelator(emit, self.exes)

        def both(event: Event) -> None:
            emit(event)
            self.correlator.submit(event)

        try:
            await self._run_refreshing(both)
        finally:
            self.correlator.close()

    def status(self) -> dict[str, dict[str, str]]:
        """BpfProbe.status, plus the stdio correlation's counters while run() runs. Where
        the kernel runs 32-bit syscalls (x86-64 ia32 emulation) and the compat handler
        is not attached, its entry says what passes unseen."""
        out = super().status()
        compat = out.get(ProcProg.COMPAT_EXIT.value)
        if compat and compat["state"] != "loaded" and os.path.exists(IA32_SYSCTL):
            compat["reason"] += ("; ia32 emulation is on: 32-bit syscalls (int 0x80) of any "
                                 "process open watched files, dup sockets onto stdio, ptrace "
                                 "and load BPF unseen")
        needs = getattr(self, "exec_needs", None)
        if needs is not None:
            out["exec_policy"] = {"state": "loaded", "reason": (
                ("execs of files in writable locations judged" if needs.writable_only
                 else "every exec judged")
                + (", executables hashed" if needs.hash_exes else "")
                if needs.every_exec else "off: no loaded exec policy rule can fire")}
            if exectarget.stuck() >= exectarget.MAX_STUCK:
                out["exec_policy"] = {"state": "degraded", "reason": (
                    f"{exectarget.stuck()} looks at scripts' files still hang (a workload's "
                    "FUSE daemon?): scripts and the loader's programs are not judged until "
                    "they end")}
        c = getattr(self, "correlator", None)
        if c is not None:
            problems = [text for n, text in (
                (c.dropped, f"{c.dropped} shells not examined (over {c.max_pending} pending)"),
                (c.cut_short, f"{c.cut_short} examinations cut short"),
                (c.failed, f"{c.failed} examinations in error"),
                (c.partial, f"{c.partial} /proc snapshots incomplete")) if n]
            out["stdio_correlation"] = {
                "state": "degraded" if c.dropped or c.failed else "loaded",
                "reason": "; ".join(problems) or "every shell with piped stdio examined"}
        return out

    # --- decoding ------------------------------------------------------------------------

    def _decode(self, record: bytes) -> Event | None:
        return self.to_event(abi.decode(record))

    def _lists(self, f: abi.file_id) -> frozenset[str]:
        hit = self.resolved.exes.get(_fid(f))
        return hit[1] if hit else frozenset()

    def _path(self, f: abi.file_id) -> str | None:
        known = self._paths.get(_fid(f))
        if known is None and _fid(f) in self.resolved.exes:
            known = self.resolved.exes[_fid(f)][0]
        return known

    def _identity(self, p: abi.proc_ctx, exe: str | None) -> dict:
        anc = list(p.ancestors[:min(p.ancestor_count, abi.ANCESTORS)])
        are = set().union(*(self._lists(a) for a in anc)) if anc else set()
        return {"exe": exe, "exe_id": ident.id_text(_fid(p.exe)),
                "exe_is": sorted(self._lists(p.exe)),
                "ancestor_exes": [self._path(a) or ident.id_text(_fid(a)) for a in anc],
                "ancestors_are": sorted(are),
                "parent_is": sorted(self._lists(anc[0])) if anc else [],
                "loginuid": None if p.loginuid == abi.UNSET_ID else p.loginuid,
                "sessionid": None if p.sessionid == abi.UNSET_ID else p.sessionid,
                "service_cgroup": bool(p.flags & abi.CTX_SERVICE_CGROUP),
                "reparented": bool(p.flags & abi.CTX_REPARENTED),
                # what a service manager's start of a service looks like (not an orphan
                # that a double fork left to init)
                "manager_start": bool(anc) and "service_managers" in self._lists(anc[0])
                and not p.flags & abi.CTX_REPARENTED}

    def to_event(self, ev: ctypes.Structure | None) -> Event | None:
        if ev is None or not hasattr(ev, "proc"):
            return None
        p = ev.proc
        kind = ev.hdr.kind
        exe = ident.walked_path(p.exe_path, p.exe_path_len, p.exe_path_flags, abi.WALK_COMPLETE)
        claimed = None
        if exe is not None and not self._exe_at(exe, _fid(p.exe)):
            claimed, exe = exe, None
        if exe is not None:     # ancestors' paths, as far as their events were seen
            self._paths[_fid(p.exe)] = exe
            self._paths.move_to_end(_fid(p.exe))
            while len(self._paths) > PATH_CACHE:
                self._paths.popitem(last=False)
        common = {"pid": p.pid, "tid": p.tid, "ppid": p.ppid, "uid": p.uid, "euid": p.euid,
                  "comm": _text(p.comm), "parent_comm": _text(p.parent_comm),
                  "cgroup_id": p.cgroup_id, "cgroup": self.cgroups.path(p.cgroup_id, p.pid),
                  **self._identity(p, exe)}
        if claimed is not None:
            common["exe_claimed"] = claimed
        if kind == abi.EventKind.PROC_EXEC:
            name, subject, extra = "proc.exec", f"pid:{p.pid}", _exec_fields(ev)
            extra.update(execfacts.exec_fields(ev, exe or claimed, common["cgroup"],
                                               self._tmp_devs, self._shm_devs, self.hasher))
            needs = getattr(self, "exec_needs", None)
            if needs is not None and needs.every_exec and extra["exe_known"] and (
                    "loaders" in common["exe_is"] or exectarget.is_loader(exe or claimed)
                    or "shells" in common["exe_is"]):
                # a script's interpreter or the loader run as a program: what it runs
                extra.update(exectarget.target_fields(
                    p.pid, _fid(p.exe), exe or claimed, extra["filename"], extra["argv"],
                    self._tmp_devs, self._shm_devs, self.hasher,
                    loader="loaders" in common["exe_is"],
                    truncated=ev.filename_len >= len(ev.filename) - 1))
        elif kind == abi.EventKind.PROC_EXIT:
            if "package_managers" in common["exe_is"]:     # binaries may have changed
                self._refresh_due = min(self._refresh_due, time.monotonic() + SOON_S)
            code = ev.exit_code
            name, subject = "proc.exit", f"pid:{p.pid}"
            extra = {"exit_code": code, "exit_status": (code >> 8) & 0xFF, "signal": code & 0x7F}
        elif kind == abi.EventKind.FILE_OPEN:
            name, extra = "file.open", self._open_fields(ev)
            subject = extra["path"] or extra["file_id"]
            extra["ancestors"] = ancestors(p.ppid)
            if extra["created"]:
                event = Event(name, subject, ev.hdr.ts_ns, ev.hdr.ts_ns, {**common, **extra}, SOURCE)
                self._remember_creation(_fid(ev.file), event, ev.rule_id != abi.CREATIONS_ID)
                return event
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
            extra = stdio.dup_fields(ev)
        elif kind == abi.EventKind.PROC_STDIO:
            name, subject = "proc.stdio", f"pid:{p.pid}"
            extra = stdio.exec_stdio_fields(ev)
        elif kind == abi.EventKind.GPU_OPEN:
            name, subject, extra = "gpu.open", f"pid:{p.pid}", gpu_open_fields(ev)
        else:
            return None
        return Event(name, subject, ev.hdr.ts_ns, ev.hdr.ts_ns, {**common, **extra}, SOURCE)

    def _exe_at(self, path: str, fid: ident.FileId) -> bool:
        """Whether the host's `path` is the executable `fid` (the kernel's walk stops at
        the process's mount namespace root: a private mount namespace names any file
        /usr/bin/x; a memfd or a deleted file names nothing on the host)."""
        if self._paths.get(fid) == path:
            return True
        host = ident.on_host(self.cfg.breach.host_root, path)
        try:
            st = os.stat(host)
        except (OSError, ValueError):
            return False
        return ident.file_id(st, host) == fid

    def _watched_dir(self, dirs: set[ident.FileId], path: str) -> bool:
        """Whether `path`'s directory was watched: then its creation would have been seen."""
        try:
            d = ident.on_host(self.cfg.breach.host_root, os.path.dirname(path))
            st = os.stat(d)
        except OSError:
            return False
        return ident.file_id(st, d) in dirs

    def _remember_creation(self, fid: ident.FileId, event: Event, direct: bool) -> None:
        self._created[fid] = (event, direct)
        self._created.move_to_end(fid)
        while len(self._created) > CREATED_KEPT:
            self._created.popitem(last=False)
        if not direct:          # a temporary file beside watched ones: look again soon
            self._refresh_due = min(self._refresh_due, time.monotonic() + SOON_S)

    def _pattern_text(self, rule_id: int) -> str | None:
        if rule_id >= len(self.patterns):
            return None
        how, text, _ = self.patterns[rule_id]
        return {"suffix": "*" + text, "prefix": text + "*"}.get(how, text)

    def _open_fields(self, ev: abi.file_open_event) -> dict:
        return {"path": ident.walked_path(ev.path, ev.path_len, ev.path_flags, abi.WALK_COMPLETE),
                "file_id": ident.id_text(_fid(ev.file)), "dir_id": ident.id_text(_fid(ev.dir)),
                "flags": ev.flags, "write": bool(ev.fmode & (abi.FMODE_WRITE | abi.FMODE_CREATED)),
                "created": bool(ev.fmode & abi.FMODE_CREATED),
                "syscall": abi.OPEN_SYSCALLS.get(ev.syscall, str(ev.syscall)),
                "match": abi.OPEN_MATCHES.get(ev.match, str(ev.match)),
                "pattern": self._pattern_text(ev.rule_id), "replaced": False,
                "watch_lists": self._watch_lists[ev.rule_id]
                if ev.rule_id < len(self._watch_lists) else []}


def _file_key(k: ident.FileId) -> abi.file_id:
    return abi.file_id(dev=k[0], ino=k[1])


def _dir_key(dir_id: ident.FileId, name: str, exact: bool) -> abi.dir_key:
    raw = name.encode()[:abi.NAME_LEN - 1]
    key = abi.dir_key(prefixlen=(4 + ctypes.sizeof(abi.file_id) + len(raw)) * 8,  # pad0, dir, name
                      dir=_file_key(dir_id))
    ctypes.memmove(key.name, raw, len(raw))
    return key


def _name_key(d: str, name: str) -> abi.name_key:
    key = abi.name_key()
    ctypes.memmove(key.dir, d.encode(), len(d.encode()))
    ctypes.memmove(key.name, name.encode(), len(name.encode()))
    return key


def _rule(w: ident.Watch, name: str = "") -> abi.path_rule:
    return abi.path_rule(flags=w.flags, len=len(name.encode()), id=w.rule_id)


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


CLK_TCK = os.sysconf("SC_CLK_TCK")


def gpu_open_fields(ev: abi.gpu_open_event) -> dict:
    """An open of /dev/nvidia*: the device, and the process's start time in the clock
    ticks of /proc/PID/stat (start_boottime / (NSEC_PER_SEC / USER_HZ), as the kernel
    computes it), which pins the process for the response."""
    minor = ev.minor
    return {"major": ev.major, "minor": minor, "flags": ev.flags, "syscall": ev.syscall,
            "start_ticks": ev.start_ns // (1_000_000_000 // CLK_TCK),
            "gpu_index": minor if minor < 254 else None,      # 254 modeset, 255 nvidiactl
            "device": f"/dev/nvidia{minor}" if minor < 254 else
            {255: "/dev/nvidiactl", 254: "/dev/nvidia-modeset"}.get(minor, f"minor {minor}")}
