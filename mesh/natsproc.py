"""The embedded nats-server: `swarm-mesh run` with `nats.server` set starts nats-server
itself and keeps it running.

- It runs as a child in its own process group (a Ctrl-C in the terminal reaches the mesh
  service, which stops it in order) and gets SIGKILL from the kernel if the service dies
  without stopping it (PR_SET_PDEATHSIG), so a restarted service never finds an orphan
  holding the port.
- `start()` returns once it logged "Server is ready"; if it exits first or takes longer
  than READY_TIMEOUT_S, StartError says why with its last line.
- `supervise(stop)` restarts it whenever it exits, after 1 s doubling to 30 s while it
  keeps failing (back to 1 s once it ran STABLE_S); the mesh's NATS client reconnects on
  its own and the decider republishes what stayed pending.
- `stop()`: SIGTERM to its process group, SIGKILL after STOP_TIMEOUT_S.
- Its output goes to `log_file` when set, else each line becomes a record of logger
  "swarm_mesh.nats" at the level nats-server gave it.
"""
from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import os
import re
import shutil
import signal
import time
from pathlib import Path

from mesh.config import NatsServerConfig
from mesh.server import StartError

log = logging.getLogger("swarm_mesh.nats")

READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
STABLE_S = 60.0
MAX_BACKOFF_S = 30.0
SEARCH = ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin")
READY = "Server is ready"
_PR_SET_PDEATHSIG = 1
_LINE = re.compile(r"^\[\d+\] \S+ \S+ \[(DBG|TRC|INF|WRN|ERR|FTL)\] ?(.*)$")
_LEVELS = {"DBG": logging.DEBUG, "TRC": logging.DEBUG, "INF": logging.INFO,
           "WRN": logging.WARNING, "ERR": logging.ERROR, "FTL": logging.CRITICAL}


def find_binary(name: str) -> str:
    """The nats-server executable: `name` if it is a path, else on PATH or in SEARCH
    (Debian installs it in /usr/sbin, which a user's PATH often lacks)."""
    if "/" in name:
        if os.access(name, os.X_OK) and Path(name).is_file():
            return name
        raise StartError(f"nats.server.binary {name} is not an executable file "
                         "(apt install nats-server)")
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(SEARCH))
    if found is None:
        raise StartError(f"{name} is not installed (looked on PATH and in /usr/sbin): "
                         "apt install nats-server, or run one yourself and remove nats.server "
                         "from the config")
    return found


def _die_with_parent() -> None:     # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class EmbeddedNats:
    """One nats-server child process, restarted when it dies. `restarts` counts restarts,
    `pid` is the running one's (0: none)."""

    def __init__(self, cfg: NatsServerConfig):
        self.cfg = cfg
        self.binary = find_binary(cfg.binary)
        if not Path(cfg.config).is_file():
            raise StartError(f"nats.server.config {cfg.config} does not exist "
                             "(swarm-mesh init writes one)")
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._started_at = 0.0
        self._tail: collections.deque[str] = collections.deque(maxlen=20)
        self._ready = asyncio.Event()
        self._reader: asyncio.Task | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else 0

    async def start(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Starts it and waits until it is ready; StartError otherwise (it is stopped)."""
        await self._spawn()
        await self._wait_ready(timeout_s)

    async def _spawn(self) -> None:
        self._ready.clear()
        self._tail.clear()
        out: int | object = asyncio.subprocess.PIPE
        log_fd = None
        if self.cfg.log_file:
            try:
                log_fd = os.open(self.cfg.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
            except OSError as e:
                raise StartError(f"nats.server.log_file {self.cfg.log_file}: {e.strerror}") from None
            out = log_fd
        try:
            self.proc = await asyncio.create_subprocess_exec(
                self.binary, "-c", self.cfg.config, stdin=asyncio.subprocess.DEVNULL,
                stdout=out, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent)
        except OSError as e:
            raise StartError(f"cannot run {self.binary}: {e.strerror}") from None
        finally:
            if log_fd is not None:
                os.close(log_fd)
        self._started_at = time.monotonic()
        if self.cfg.log_file:
            self._reader = asyncio.create_task(self._follow_file(self.cfg.log_file))
        else:
            self._reader = asyncio.create_task(self._forward(self.proc.stdout))
        log.info("nats-server started", extra={"pid": self.proc.pid, "config": self.cfg.config,
                                               "binary": self.binary})

    def _line(self, text: str, forward: bool) -> None:
        self._tail.append(text)
        if READY in text:
            self._ready.set()
        if forward:
            m = _LINE.match(text)
            level, msg = (_LEVELS[m.group(1)], m.group(2)) if m else (logging.INFO, text)
            if msg.strip():
                log.log(level, msg, extra={"source": "nats-server"})

    async def _forward(self, stream: asyncio.StreamReader | None) -> None:
        assert stream is not None
        while True:
            raw = await stream.readline()
            if not raw:
                return
            self._line(raw.decode(errors="replace").rstrip(), forward=True)

    async def _follow_file(self, path: str) -> None:
        """Watches the log file only until the server is ready (for `start`'s sake)."""
        offset = os.path.getsize(path)
        pending = b""
        while not self._ready.is_set():
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            *lines, pending = (pending + chunk).split(b"\n")
            for raw in lines:
                self._line(raw.decode(errors="replace").rstrip(), forward=False)
            await asyncio.sleep(0.05)

    async def _wait_ready(self, timeout_s: float) -> None:
        assert self.proc is not None
        ready = asyncio.create_task(self._ready.wait())
        exited = asyncio.create_task(self.proc.wait())
        try:
            await asyncio.wait({ready, exited}, timeout=timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (ready, exited):
                t.cancel()
        if self._ready.is_set() and self.proc.returncode is None:
            return
        if self.proc.returncode is None:
            await self._terminate()
            why = f"was not ready within {timeout_s:g} s"
        else:
            await asyncio.sleep(0.1)            # its last lines, still in the pipe
            why = f"exited with status {self.proc.returncode}"
        last = next((line for line in reversed(self._tail) if line.strip()), "")
        m = _LINE.match(last)
        last = m.group(2) if m else last
        raise StartError(f"nats-server ({self.cfg.config}) {why}" + (f": {last}" if last else ""))

    async def supervise(self, stop: asyncio.Event) -> None:
        """Until `stop`: restart it whenever it exits, with backoff."""
        backoff = 0.0
        while not stop.is_set():
            if self.proc is not None and self.proc.returncode is None:
                waiter = asyncio.create_task(self.proc.wait())
                stopper = asyncio.create_task(stop.wait())
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                stopper.cancel()
                if stop.is_set():
                    return
                ran_s = time.monotonic() - self._started_at
                if ran_s >= STABLE_S:
                    backoff = 0.0
                log.error("nats-server exited; restarting it",
                          extra={"status": self.proc.returncode, "ran_s": round(ran_s, 1)})
            backoff = min(MAX_BACKOFF_S, backoff * 2 or 1.0)
            try:
                await asyncio.wait_for(stop.wait(), backoff)
                return
            except asyncio.TimeoutError:
                pass
            try:
                await self.start()
            except StartError as e:
                log.error("nats-server restart failed", extra={"error": str(e)})
                continue
            self.restarts += 1
            log.info("nats-server restarted", extra={"pid": self.pid, "restarts": self.restarts})

    async def _terminate(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                await asyncio.wait_for(proc.wait(), wait_s)
                break
            except asyncio.TimeoutError:
                continue

    async def stop(self) -> None:
        """Stops it (SIGTERM, then SIGKILL) and the task reading its output."""
        await self._terminate()
        if self._reader is not None:
            try:
                await asyncio.wait_for(self._reader, 2.0)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                pass
            self._reader = None
        if self.proc is not None and self.proc.returncode is not None:
            log.info("nats-server stopped", extra={"status": self.proc.returncode})
