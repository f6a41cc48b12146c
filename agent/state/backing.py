"""Where the store's rows live: the database file, or memory while the file cannot be used.

Enforcement must outlive storage: a full or failing disk never stops a write. The first
write that fails for a storage reason (disk full, I/O error, read-only, cannot open)
switches the store to a copy of the database in memory (taken from the file, which can
still be read; a file that cannot even be read leaves a fresh schema seeded by the
caller) and that write is done there. From then on every read and write goes to memory,
so the responder sees what it did. `catch_up()` writes the whole memory copy back into
the file in one transaction (sqlite's backup: all or nothing, a failure leaves the file as
it was) and switches back; `maybe_catch_up()` tries it with a bounded exponential backoff,
or at once when the filesystem has more free space than at the last failed try. A run that
ends still degraded leaves its memory copy in `spill` (the agent's run directory, another
filesystem; refreshed after each failed try and at most every SPILL_EVERY_S while new
writes arrive, so a crash loses at most that much), loaded by the next start. A file that
goes unreadable under a running agent makes the memory copy start empty: `on_lost` is
called at once so the caller re-records what is in force (from the kernel's table).

A database that is not one (truncated, garbled, random bytes, a directory, a schema this
agent cannot read) is moved aside with a timestamped name, kept for forensics, and a
fresh one is started (`recovered` says what was moved and why; `fresh` that the caller
must seed the store, from the kernel's table). Nothing here raises on storage trouble
except `StoreError` for a file that cannot be opened or moved aside at all -- and even
then only in readonly (CLI) mode: the agent runs on in memory.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from agent.state import dbfile
from agent.state.batch import Batch, Batching, Syncer, tune
from agent.state.dbfile import Corrupt, StoreError, is_storage_error

log = logging.getLogger("swarm_agent")
T = TypeVar("T")
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0
SPILL_EVERY_S = 1.0          # while degraded, new writes reach `spill` this often at most
FREED_BYTES = 64 * 1024      # this much more free space: try at once, backoff or not


@dataclass
class Health:
    """What `status`, the metrics and the storage incident say about the database."""

    state: str = "ok"                 # ok | degraded
    reason: str = ""                  # why degraded (the first failure's sentence)
    since: float | None = None        # when it became degraded
    write_failures: int = 0           # writes that could not go to the file: kept in memory
    catch_up_failures: int = 0        # tries to write the memory copy back that failed
    catch_ups: int = 0                # times the memory copy was written back
    recovered: list[str] = field(default_factory=list)   # files moved aside, and why

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "reason": self.reason, "since": self.since,
                "write_failures": self.write_failures, "catch_ups": self.catch_ups,
                "catch_up_failures": self.catch_up_failures, "recovered": list(self.recovered)}


class Backing(Batching):
    """The connection the store uses, with the fallback above. `read(fn)` and `write(fn)`
    run `fn(connection)` under one lock (write: in one BEGIN IMMEDIATE transaction)."""

    def __init__(self, path: str | Path, *, readonly: bool = False,
                 spill: str | Path | None = None, clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self.spill = Path(spill) if spill else None
        self.readonly = readonly
        self.clock = clock
        self.health = Health()
        self.fresh = False                # no history: the caller seeds it
        self._lock = threading.RLock()
        # Held while the file is replaced (catch_up) and by the Syncer's checkpoint, which
        # opens the file and its WAL by name in two steps: never a new file's WAL paired
        # with the old one's pages. The writer never takes it.
        self._file_lock = threading.Lock()
        self._disk: sqlite3.Connection | None = None
        self._mem: sqlite3.Connection | None = None
        self._base_lost = False           # the memory copy does not hold the file's rows
        self._next_try = 0.0
        self._free_at_failure: int | None = None
        # Called (under the lock, on the thread that hit the failure) when the memory copy
        # had to start empty because the file could not be read.
        self.on_lost: Callable[[], None] | None = None
        self._dirty = False               # memory holds writes not yet in `spill`
        self._spilled_at = 0.0
        self._spill_failing = False
        self._batch: Batch | None = None     # the open batch() (its thread holds the lock)
        self._syncer: Syncer | None = None
        if readonly:
            self._disk = dbfile.open_readonly(self.path)
        else:
            self._open()
            self._load_spill()

    # -- opening -----------------------------------------------------------------------------

    def _open(self) -> None:
        existed = self.path.exists() and not dbfile.is_empty_file(self.path)
        # Judge the file as found, writing nothing; but a file with a WAL may be only
        # half checkpointed (a crash), which the read-write open repairs: keep a copy of
        # the evidence first and let that open decide.
        suspect = dbfile.precheck(self.path) if existed else None
        copied = None
        why: str | None = None
        try:
            if suspect is not None and not (dbfile.has_wal(self.path) and self.path.is_file()):
                raise Corrupt(suspect)
            if suspect is not None:
                copied = self._copy_aside()
            self._disk = dbfile.open_checked(self.path)
            self.fresh = not existed
            for _, dst in dbfile.with_sides(self.path, copied) if copied else ():
                dst.unlink(missing_ok=True)
            return
        except Corrupt as e:
            why = str(e)
        except (sqlite3.Error, OSError) as e:
            self._degrade(f"cannot open {self.path}: {dbfile.sentence(e)}")
        if why is not None:
            aside = self._move_aside(why, copied)
            if aside is not None:
                try:
                    self._disk = dbfile.open_checked(self.path)
                    self.fresh = True
                    return
                except (sqlite3.Error, OSError) as e:
                    self._degrade(f"cannot create {self.path}: {dbfile.sentence(e)}")
            else:
                self._degrade(f"{self.path} {why}, and it cannot be moved aside")
        # Run in memory: from what can still be read of the file, else from nothing.
        self._mem = dbfile.memory()
        if why is None and existed and self._snapshot_file():
            self.fresh = False                 # (_base_lost: see _snapshot_file)
        else:
            self._base_lost = existed      # an absent or empty file lost nothing
            self.fresh = True
        dbfile.migrate(self._mem, self.path)

    def _snapshot_file(self) -> bool:
        """Copy what the file holds into memory, reading only (its WAL too where the
        shared-memory file allows); False when it cannot be read whole."""
        assert self._mem is not None
        for uri in (f"file:{self.path}?mode=ro", f"file:{self.path}?immutable=1"):
            try:
                src = sqlite3.connect(uri, uri=True)
                try:
                    dbfile.check(src, self.path)
                    src.backup(self._mem)
                    if "immutable" in uri and dbfile.has_wal(self.path):
                        # Read without its WAL: the file holds more than the copy, so
                        # catching up must not overwrite it (it is moved aside, kept).
                        self._base_lost = True
                    return True
                finally:
                    src.close()
            except (sqlite3.Error, OSError, StoreError):
                self._mem.close()
                self._mem = dbfile.memory()
        return False

    def _copy_aside(self) -> Path | None:
        """Copy the file and its WAL aside as found (best effort: a full disk cannot)."""
        copied = self._aside_name()
        try:
            for src, dst in dbfile.with_sides(self.path, copied):
                shutil.copy2(src, dst)
        except OSError:
            for _, dst in dbfile.with_sides(self.path, copied):
                with contextlib.suppress(OSError):
                    dst.unlink()
            return None
        return copied

    def _load_spill(self) -> None:
        """A previous run ended while degraded and left its memory copy in `spill` (on
        another filesystem: the run directory): it is the newest state, so it is used,
        and written to the file when the file can take it."""
        if self.spill is None or not self.spill.exists():
            return
        try:
            src = sqlite3.connect(f"file:{self.spill}?immutable=1", uri=True)
            try:
                dbfile.check(src, self.spill)
                mem = dbfile.memory()
                src.backup(mem)
            finally:
                src.close()
        except (sqlite3.Error, OSError, StoreError) as e:
            log.error("unsaved state of the last run unreadable, ignored",
                      extra={"path": str(self.spill), "error": dbfile.sentence(e)})
            with contextlib.suppress(OSError):
                self.spill.unlink()
            return
        if self._mem is not None:
            self._mem.close()
        self._mem, self._base_lost, self.fresh = mem, False, False
        self._degrade(f"the last run could not write its state; it is in {self.spill}")
        log.warning("unsaved state of the last run loaded", extra={"path": str(self.spill)})
        self.catch_up()

    def _spill_now(self) -> None:
        """Keep the memory copy in `spill` too, so a restart does not lose it."""
        with self._lock:
            self._spilled_at = time.monotonic()
            if self.spill is None or self._mem is None:
                return
            tmp = self.spill.with_name(self.spill.name + ".tmp")
            try:
                self.spill.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                tmp.unlink(missing_ok=True)
                out = sqlite3.connect(tmp)
                try:
                    self._mem.backup(out)
                finally:
                    out.close()
                os.replace(tmp, self.spill)
                self._dirty, self._spill_failing = False, False
            except (sqlite3.Error, OSError) as e:
                if not self._spill_failing:     # once per outage, not every second
                    log.warning("cannot keep the unsaved state in the run directory either",
                                extra={"path": str(self.spill), "error": dbfile.sentence(e)})
                self._spill_failing = True
                with contextlib.suppress(OSError):
                    tmp.unlink()

    def _aside_name(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.clock()))
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        return aside

    def _move_aside(self, why: str, copied: Path | None = None) -> Path | None:
        """Rename the file (and its -wal, -shm: a stale WAL must never meet the fresh
        file) to a timestamped name; with `copied`, that copy already holds them as they
        were found and the files here are removed."""
        aside = copied or self._aside_name()
        try:
            for src, dst in dbfile.with_sides(self.path, aside):
                if copied:
                    if src.is_dir():
                        shutil.rmtree(src)
                    else:
                        src.unlink()
                else:
                    os.rename(src, dst)
        except OSError as e:
            log.error("corrupt database could not be moved aside",
                      extra={"path": str(self.path), "reason": why, "error": e.strerror})
            return None
        text = f"{self.path} {why}: moved aside to {aside.name}, a fresh database started"
        self.health.recovered.append(text)
        log.error("corrupt database moved aside", extra={
            "path": str(self.path), "reason": why, "moved_to": str(aside)})
        return aside

    # -- running statements --------------------------------------------------------------------

    @property
    def degraded(self) -> bool:
        return self._mem is not None

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            if self._mem is not None or self.readonly:
                db = self._mem or self._disk
                assert db is not None
                return fn(db)
            assert self._disk is not None
            try:
                return fn(self._disk)
            except sqlite3.Error as e:
                if not is_storage_error(e):
                    raise
                reason = f"reading {self.path} failed: {dbfile.sentence(e)}"
                if self._batch is not None:
                    self._batch_to_memory(self._batch, reason)
                else:
                    self._to_memory(reason)
            assert self._mem is not None
            return fn(self._mem)

    def write(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = False) -> T:
        """`fn` in one transaction (inside an open batch(): joined to it); `durable`:
        fsync'd before returning even while a Syncer defers it (the audit log)."""
        with self._lock:
            if self.readonly:
                assert self._disk is not None
                return dbfile.transaction(self._disk, fn)
            if self._batch is not None:
                return self._in_batch(self._batch, fn)
            if self._mem is None:
                assert self._disk is not None
                try:
                    out = dbfile.transaction(self._disk, fn)
                    self._committed(durable)
                    return out
                except sqlite3.Error as e:
                    if not is_storage_error(e):
                        raise
                    self.health.write_failures += 1
                    self._to_memory(f"writing {self.path} failed: {dbfile.sentence(e)}")
            else:
                self.health.write_failures += 1
            assert self._mem is not None
            out = dbfile.transaction(self._mem, fn)
            self._dirty = True
            return out

    def _to_memory(self, reason: str, reseed: bool = True) -> bool:
        """Move the state to memory: a copy of the file, or, when it cannot be read, an
        empty store that `on_lost` re-seeds (unless `reseed` is False: the caller does it
        once its own writes are in). True when the copy started empty."""
        self._degrade(reason)
        self._mem = dbfile.memory()
        try:
            assert self._disk is not None
            self._disk.backup(self._mem)
            dbfile.check(self._mem, self.path)     # backup copies pages as they are, bad ones too
        except (sqlite3.Error, StoreError):
            self._mem.close()
            self._mem = dbfile.memory()
            dbfile.migrate(self._mem, self.path)
            self._base_lost = True
            self.fresh = True
            if reseed and self.on_lost is not None:
                # The file cannot even be read: the history is gone from this run, and
                # whoever knows what is in force (the kernel table) must say it now,
                # before anything asks the store what should be.
                try:
                    self.on_lost()
                except Exception:   # noqa: BLE001 -- the store must go on regardless
                    log.exception("re-seeding the state kept in memory failed")
            return True
        return False

    def _degrade(self, reason: str) -> None:
        hint = dbfile.filesystem_hint(self.path.parent)
        if hint and hint not in reason:
            reason = f"{reason} ({hint})"
        if self.health.state != "degraded":
            self.health.state, self.health.reason = "degraded", reason
            self.health.since = self.clock()
            self._next_try = time.monotonic() + BACKOFF_INITIAL_S
            self._free_at_failure = dbfile.free_bytes(self.path.parent)
        log.error("storage degraded: state kept in memory, detection and enforcement go on",
                  extra={"path": str(self.path), "reason": reason})

    # -- catching up ----------------------------------------------------------------------------

    def maybe_catch_up(self) -> bool | None:
        """Try `catch_up` if degraded and the backoff allows, or at once when space was
        freed since the last try (statvfs is cheap); None when not tried."""
        if self._mem is None:
            return None
        free = dbfile.free_bytes(self.path.parent)
        freed = free is not None and self._free_at_failure is not None and \
            free >= self._free_at_failure + FREED_BYTES
        if time.monotonic() < self._next_try and not freed:
            if self._dirty and time.monotonic() >= self._spilled_at + SPILL_EVERY_S:
                self._spill_now()       # a crash meanwhile loses at most these seconds
            return None
        if self.catch_up():
            return True
        self._free_at_failure = dbfile.free_bytes(self.path.parent)
        self._spill_now()
        n = self.health.catch_up_failures
        cap = min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2.0 ** min(n, 16))
        self._next_try = time.monotonic() + cap / 2 + cap / 2 * random.random()
        return False

    def catch_up(self) -> bool:
        """Write the memory copy into the file and use the file again; False (the file
        unchanged, still in memory) when it cannot be written yet."""
        with self._lock, self._file_lock:
            if self._mem is None:
                return True
            try:
                if self._base_lost and self.path.exists():
                    if self._disk is not None:
                        self._disk.close()
                        self._disk = None
                    if self._move_aside("could not be read") is None:
                        raise OSError("cannot move the unreadable database aside")
                    self._base_lost = False
                if self._disk is None:
                    self._disk = dbfile.connect(self.path)
                    if self._syncer is not None:
                        tune(self._disk)
                self._mem.backup(self._disk)
                dbfile.check(self._disk, self.path)
                self._committed()
            except (sqlite3.Error, OSError) as e:
                self.health.catch_up_failures += 1
                if self.health.catch_up_failures in (1, 10) or \
                        self.health.catch_up_failures % 100 == 0:
                    log.warning("storage still failing: state stays in memory, retried",
                                extra={"path": str(self.path), "error": dbfile.sentence(e),
                                       "tries": self.health.catch_up_failures})
                return False
            self._mem.close()
            self._mem = None
            if self.spill is not None:
                with contextlib.suppress(OSError):
                    self.spill.unlink()
            was = self.clock() - (self.health.since or self.clock())
            self.health.state, self.health.reason, self.health.since = "ok", "", None
            self.health.catch_ups += 1
            log.warning("storage recovered: the state kept in memory is written",
                        extra={"path": str(self.path), "degraded_s": round(was, 1)})
            return True

    def close(self) -> None:
        if self._syncer is not None:
            self._syncer.stop()     # its last fsync; sqlite's closing checkpoint follows
        with self._lock:
            if self._mem is not None and not self.catch_up():
                self._spill_now()       # a last try; else kept in the run directory
            for db in (self._mem, self._disk):
                if db is not None:
                    db.close()
            self._mem = self._disk = None
