"""What every BPF probe does the same way: load an object with the programs this kernel
accepts, report the rest, attach tracepoints, count what the kernel could not queue, and
turn ring-buffer records into Events on the loop.

A probe subclasses BpfProbe, names its programs, tracepoints and maps in class attributes,
and keeps only what is its own: how the object is configured before load (map sizes,
.rodata), what goes into maps after load, any attach beyond tracepoints, and decoding.
"""
from __future__ import annotations

import asyncio
import ctypes
import enum
import errno
import logging
import os
from typing import Callable, ClassVar, Self

from agent.model import Event
from agent.sources import libbpf

logger = logging.getLogger("swarm_agent")
VERIFIER_TAIL = 8      # lines of a verifier's log in the status reason (all of it in the log)

# What a kernel says when it does not allow something (as opposed to a broken object).
REFUSED = {errno.EPERM, errno.EACCES, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOENT,
           errno.ENODEV, errno.EBUSY, 524}  # 524: the kernel's ENOTSUPP
# A load refused with a verifier log is our program's fault ("failed"), unless the log says
# the kernel lacks what the program uses: a helper this kernel (or this program type) does
# not have ("unknown func"), an instruction it does not know, or a field CO-RE found
# nowhere (libbpf poisons the instruction as a call to unknown#195896080, 0xbad2310).
# Refusals without a log (EPERM for LSM and fentry, an unknown program type) are the
# kernel's: "degraded".
LACKING = ("unknown func", "invalid func unknown#195896080", "cannot use helper",
           "unknown opcode")


def _verdict(prog: enum.StrEnum, e: OSError, lines: list[str]) -> tuple[str, str] | None:
    """(state, reason) of a program the kernel would not load; None for an error that is
    neither the kernel's refusal nor the verifier's (the object is broken: it raises)."""
    log = libbpf.verifier_log(lines)
    if log and not any(m in log for m in LACKING):
        log_text = "\n".join(log.splitlines()[-VERIFIER_TAIL:])
        logger.error("the verifier rejected program %s (%s); its log:\n%s",
                     prog.value, e.strerror, log)
        return "failed", f"the verifier rejected the program ({e.strerror}): {log_text}"
    if e.errno not in REFUSED:
        return None
    said = [x for x in (log or "").splitlines() if any(m in x for m in LACKING)]
    why = said[0] if said else (lines[-1] if lines else "no log")
    return "degraded", f"the kernel refused the program: {e.strerror} ({why})"


class BpfProbe:
    """One BPF object, its links and its ring buffer.

    open() loads and attaches; programs the kernel refuses (it lacks a hook, a helper, a
    program type), or whose attach it refuses, are reported by status() as "degraded"
    with the reason; a program the verifier rejects, or another attach error, as
    "failed" (with the verifier's log); the rest keeps running; a missing or broken object raises, and leaves
    nothing behind. poll() returns the events queued now, run() emits them until
    cancelled; a record that does not decode is counted in `undecoded`, never dropped
    silently (a decoder that raises counts there too, and the rest of the batch goes on);
    `emit` must be quick (the agent's puts the event in its bounded queue,
    agent.sources.queue). losses() counts events the kernel could not queue. close() detaches
    everything and is idempotent; the probe is also a context manager (open/close).

    Subclasses set the class attributes and implement _configure, _fill_maps and _decode.
    """

    NAME: ClassVar[str]                        # in errors: "the <NAME> probe is not loaded"
    PROGS: ClassVar[type[enum.StrEnum]]        # every program in the object
    TRACEPOINTS: ClassVar[dict]                # program -> (category, name)
    RING_MAP: ClassVar[str]                    # the ring buffer events arrive through
    LOSS_MAP: ClassVar[str]                    # per-CPU u64 at index 0: failed reserves
    # Programs whose tracepoint only some kernels have: ENOENT on attach is expected.
    OPTIONAL: ClassVar[frozenset] = frozenset()
    # BTF raw tracepoint programs (tp_btf: the tracepoint is in the section name).
    RAW: ClassVar[frozenset] = frozenset()
    # status() reason of an attached tracepoint program.
    ATTACHED: ClassVar[str] = "attached to {category}:{name}"

    def __init__(self, object_path: str | os.PathLike):
        self.object_path = str(object_path)
        self._obj: libbpf.Object | None = None
        self._links: list[libbpf.Link | libbpf.FdLink | libbpf.TcLink] = []
        self._ring: libbpf.RingBuffer | None = None
        self._status: dict[str, dict[str, str]] = {}
        self.undecoded = 0

    # --- hooks ---------------------------------------------------------------------------

    def _configure(self, obj: libbpf.Object) -> None:
        """Size maps and set .rodata of a freshly opened object (before load)."""
        raise NotImplementedError

    def _fill_maps(self) -> None:
        """Write the probe's runtime maps once the object is loaded."""

    def _decode(self, record: bytes) -> Event | None:
        """The Event for one ring-buffer record; None when it does not decode."""
        raise NotImplementedError

    # --- loading -------------------------------------------------------------------------

    def open(self) -> None:
        try:
            refused = self._classify()
            progs = set(self.PROGS) - set(refused)
            self._obj = self._configured(progs)
            if progs:
                self._obj.load()
                self._fill_maps()
                self._ring = libbpf.RingBuffer(self._map(self.RING_MAP))
            for prog, (state, reason) in refused.items():
                self._set(prog, state, reason)
            if progs:
                self._attach(progs)
        except BaseException:
            self.close()
            raise

    def _configured(self, progs: set[enum.StrEnum]) -> libbpf.Object:
        """An opened object, configured, with only `progs` loading."""
        obj = libbpf.Object(self.object_path)
        try:
            self._configure(obj)
            for prog in self.PROGS:
                obj.program(prog).set_autoload(prog in progs)
        except BaseException:
            obj.close()
            raise
        return obj

    def _classify(self) -> dict[enum.StrEnum, tuple[str, str]]:
        """Programs that will not load here -> (state, reason): first everything at once,
        and only if that fails, each program alone (a verifier rejection fails the whole
        object, so this is the only way to learn which one it was). "degraded": the
        kernel lacks a hook or feature the program needs; "failed": the verifier rejected
        our program (a bug to fix, not a property of the host): its whole log goes to the
        agent's log and its last lines into the reason."""
        try:
            self._trial(set(self.PROGS))
            return {}
        except OSError:
            pass
        refused = {}
        for prog in self.PROGS:
            with libbpf.captured() as lines:
                try:
                    self._trial({prog})
                    continue
                except OSError as e:
                    error = e
            verdict = _verdict(prog, error, lines)
            if verdict is None:
                raise error
            refused[prog] = verdict
        return refused

    def _trial(self, progs: set[enum.StrEnum]) -> None:
        obj = self._configured(progs)
        try:
            obj.load()
        finally:
            obj.close()

    def _attach(self, progs: set[enum.StrEnum]) -> None:
        """Attach the loaded `progs`; every outcome lands in status()."""
        for prog, (category, name) in self.TRACEPOINTS.items():
            if prog in progs:
                self._attach_tracepoint(prog, category, name)

    def _attach_tracepoint(self, prog: enum.StrEnum, category: str, name: str) -> None:
        try:
            program = self._obj.program(prog)
            self._links.append(program.attach_trace() if prog in self.RAW
                               else program.attach_tracepoint(category, name))
            self._set(prog, "loaded", self.ATTACHED.format(category=category, name=name))
        except OSError as e:
            if prog in self.OPTIONAL and e.errno == errno.ENOENT:
                reason = f"this kernel has no tracepoint {category}:{name}"
            else:
                reason = str(e)
            self._set(prog, "degraded" if e.errno in REFUSED else "failed", reason)

    def _set(self, prog: enum.StrEnum, state: str, reason: str) -> None:
        self._status[prog.value] = {"state": state, "reason": reason}

    def _map(self, name: str) -> libbpf.Map:
        if self._obj is None:
            raise RuntimeError(f"the {self.NAME} probe is not loaded")
        return self._obj.map(name)

    # --- reading -------------------------------------------------------------------------

    def status(self) -> dict[str, dict[str, str]]:
        """Program name -> {"state": loaded | degraded | failed, "reason": text}."""
        return {k: dict(v) for k, v in self._status.items()}

    def losses(self) -> int:
        """Events the kernel could not queue (ring buffer full), over all CPUs."""
        return sum(self.losses_per_cpu())

    def losses_per_cpu(self) -> list[int]:
        """The loss counter of every possible CPU; [] when nothing is loaded."""
        if self._ring is None:
            return []
        return self._per_cpu(self.LOSS_MAP, 0)

    def _per_cpu(self, name: str, index: int) -> list[int]:
        """Slot `index` of per-CPU u64 array map `name`, one value per possible CPU."""
        values = (ctypes.c_uint64 * libbpf.num_possible_cpus())()
        self._map(name).lookup(ctypes.c_uint32(index), values)
        return list(values)

    def poll(self) -> list[Event]:
        """Events queued now, decoded (what run() emits; usable without a loop)."""
        if self._ring is None:
            return []
        events = []
        for record in self._ring.consume():
            try:
                event = self._decode(record)
            except Exception:   # noqa: BLE001 -- one bad record must not lose the batch
                event = None
            if event is None:
                self.undecoded += 1
            else:
                events.append(event)
        return events

    async def run(self, emit: Callable[[Event], None]) -> None:
        """Emit every event until cancelled; woken by the ring buffer's epoll fd."""
        if self._ring is None:
            await asyncio.Future()  # nothing loaded: idle until cancelled
        loop = asyncio.get_running_loop()
        fd = self._ring.epoll_fd

        def drain() -> None:
            for event in self.poll():
                emit(event)

        loop.add_reader(fd, drain)
        try:
            drain()  # events queued before the reader was registered
            await asyncio.Future()
        finally:
            loop.remove_reader(fd)

    # --- teardown ------------------------------------------------------------------------

    def close(self) -> None:
        if self._ring:
            self._ring.free()
            self._ring = None
        self._detach()
        if self._obj:
            self._obj.close()
            self._obj = None

    def _detach(self) -> None:
        """Destroy every link (before the object that owns the programs goes)."""
        for link in self._links:
            link.destroy()
        self._links.clear()

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
