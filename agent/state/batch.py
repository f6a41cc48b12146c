"""Several store writes as one transaction, and commits made durable off the hot path.

Batch: what the responder writes for one finding (its incident, mitigation, timeline
entries, and the outbox rows the triggers add) is committed together or not at all. The
store's writes made inside `Store.batch()` join its transaction, each in a savepoint (a
write that raises leaves nothing of itself and the batch goes on, or the caller lets the
exception end the batch and nothing of it is written). Every write is journaled: when
the disk fails half way (or at COMMIT), the backing moves to memory and replays the
journal there, so the batch lands whole in the memory copy instead of half on disk. A
replay runs the same functions on the same rows, so they must not draw their own ids or
clocks (the store's callers pass them in).

Batching is the part of agent.state.backing that runs them (a mixin: the connections,
the lock and the fallback to memory are the backing's).

Syncer: the agent commits with synchronous=NORMAL (a commit is written to the WAL, not
fsync'd) and this thread fsyncs the WAL shortly after (SYNC_EVERY_S), and checkpoints it
when it grows. A commit survives a crash of the agent at once (the WAL is in the page
cache) and a power loss or kernel crash once synced. Such a loss also empties the nft
table, which lives in kernel memory only, so what it can lose is history, never a
mitigation still in force.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from agent.state import dbfile
from agent.state.dbfile import is_storage_error

log = logging.getLogger("swarm_agent")
T = TypeVar("T")
SYNC_EVERY_S = 0.25
CHECKPOINT_BYTES = 4 << 20     # the WAL is folded into the file past this size


class Batch:
    """One open transaction on `db` and the writes made in it, in order."""

    def __init__(self) -> None:
        self.db: sqlite3.Connection | None = None
        self.journal: list[Callable[[sqlite3.Connection], object]] = []
        # Writes of this batch committed at an earlier commit point (Store.commit_point):
        # redone only into a memory copy that starts without them (the file was unreadable).
        self.committed: list[Callable[[sqlite3.Connection], object]] = []

    def begin(self, db: sqlite3.Connection) -> None:
        db.execute("BEGIN IMMEDIATE")
        self.db = db

    def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn` inside the transaction, all or nothing of it (a savepoint)."""
        assert self.db is not None
        db = self.db
        db.execute("SAVEPOINT store_write")
        try:
            out = fn(db)
        except BaseException:
            # SQLite may have rolled the whole transaction back already (disk full).
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK TO store_write")
                db.execute("RELEASE store_write")
            raise
        db.execute("RELEASE store_write")
        self.journal.append(fn)
        return out

    def replay(self, db: sqlite3.Connection, with_committed: bool = False) -> None:
        """Begin on `db` and redo the writes made since the last commit (the disk failed
        under them); `with_committed`: those committed earlier in the batch too."""
        self.begin(db)
        try:
            for fn in (self.committed + self.journal) if with_committed else self.journal:
                fn(db)
        except BaseException:
            self.abort()
            raise

    def commit(self) -> None:
        assert self.db is not None
        self.db.execute("COMMIT")
        self.committed += self.journal
        self.journal = []

    def abort(self) -> None:
        if self.db is not None and self.db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")


def tune(db: sqlite3.Connection) -> None:
    """The agent's disk connection once a Syncer runs: commits reach the WAL unsynced, and
    checkpoints (which fsync) are left to the syncer's thread."""
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA wal_autocheckpoint=0")


class Syncer:
    """fsyncs `path`'s WAL every `every_s` after commits (`dirty()`), on its own thread;
    `sync()` does it now on the caller's. Failures are counted in `failures` and logged
    once per run of them (the next write meets the disk's trouble and degrades)."""

    def __init__(self, path: Path, every_s: float = SYNC_EVERY_S,
                 file_lock: threading.Lock | None = None):
        self.path, self.every_s = path, every_s
        # The backing's: held while catch_up replaces the file (see _checkpoint).
        self._file_lock = file_lock or threading.Lock()
        self.wal = Path(f"{path}-wal")
        self.failures = 0
        self.syncs = 0
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="store-sync", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def dirty(self) -> None:
        self._dirty.set()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            if self._dirty.is_set():
                self._dirty.clear()
                self.sync()

    def sync(self) -> None:
        try:
            fd = os.open(self.wal, os.O_RDONLY)
        except FileNotFoundError:
            return           # checkpointed and gone: nothing unsynced
        except OSError as e:
            self._fail(e)
            return
        try:
            os.fsync(fd)
            size = os.fstat(fd).st_size
        except OSError as e:
            self._fail(e)
            return
        finally:
            os.close(fd)
        self.syncs += 1
        self._failing = False
        if size > CHECKPOINT_BYTES:
            self._checkpoint()

    def _checkpoint(self) -> None:
        # Its own connection: a PASSIVE checkpoint never waits for the agent's writer,
        # and mode=rw never creates a file that was moved aside meanwhile.
        # Under the file lock: sqlite opens the file here and its WAL (by name) at the
        # checkpoint; a catch_up replacing the file in between would pair the new WAL with
        # the old file and lose the new one's pages.
        with self._file_lock:
            try:
                db = sqlite3.connect(f"file:{self.path}?mode=rw", uri=True, timeout=0)
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                finally:
                    db.close()
            except sqlite3.Error as e:
                self._fail(e)

    def _fail(self, e: Exception) -> None:
        self.failures += 1
        if not self._failing:
            log.warning("cannot make the database's recent commits durable; retried",
                        extra={"path": str(self.path), "error": str(e)})
        self._failing = True
        self._dirty.set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.sync()


class Batching:
    """Backing's batches and syncing (agent.state.backing keeps the connections, the lock
    and the fallback to memory these use)."""

    path: Path
    readonly: bool
    health: Any
    _lock: threading.RLock
    _disk: sqlite3.Connection | None
    _mem: sqlite3.Connection | None
    _batch: Batch | None
    _syncer: Syncer | None
    _dirty: bool
    _file_lock: threading.Lock

    on_lost: Callable[[], None] | None

    def _to_memory(self, reason: str, reseed: bool = True) -> bool:
        raise NotImplementedError

    def _spill_now(self) -> None:
        raise NotImplementedError

    def _committed(self, durable: bool = False) -> None:
        """A commit reached the disk connection: have the syncer make it durable."""
        if self._syncer is not None:
            if durable:
                self._syncer.sync()
            else:
                self._syncer.dirty()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Every write inside joins one transaction, committed at the end; an exception
        leaves none of them written. Nested batches join the outermost."""
        with self._lock:
            if self._batch is not None or self.readonly:
                yield
                return
            b = self._batch = Batch()
            try:
                self._batch_begin(b)
                yield
                self._batch_commit(b)
            except BaseException:
                b.abort()
                raise
            finally:
                self._batch = None

    def _batch_begin(self, b: Batch) -> None:
        if self._mem is None:
            assert self._disk is not None
            try:
                b.begin(self._disk)
                return
            except sqlite3.Error as e:
                if not is_storage_error(e):
                    raise
                self._batch_to_memory(b, f"writing {self.path} failed: {dbfile.sentence(e)}")
                return
        self.health.write_failures += 1
        b.begin(self._mem)

    def commit_point(self) -> None:
        """Inside a batch: commit what it wrote so far (unsynced: no fsync on the caller's
        thread) and go on in a new transaction. The responder commits a finding's incident
        and mitigation this way before it changes the host, so a crash in between leaves
        the row, which reconcile applies at the next start; nothing in force is unrecorded."""
        with self._lock:
            b = self._batch
            if b is not None:
                self._batch_commit(b)
            if self._mem is not None and self._dirty:
                # Degraded: the memory copy outlives a crash only in the spill file, and a
                # start lifts what no row holds; so it is written now, before the host change.
                self._spill_now()
            if b is not None:
                self._batch_begin(b)

    def _in_batch(self, b: Batch, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return b.run(fn)
        except sqlite3.Error as e:
            if b.db is not self._disk or not is_storage_error(e):
                raise
            self._batch_to_memory(b, f"writing {self.path} failed: {dbfile.sentence(e)}")
        return b.run(fn)

    def _batch_commit(self, b: Batch) -> None:
        if b.db is self._disk:
            try:
                b.commit()
                self._committed()
                return
            except sqlite3.Error as e:
                if not is_storage_error(e):
                    raise
                self._batch_to_memory(b, f"writing {self.path} failed: {dbfile.sentence(e)}")
        b.commit()
        self._dirty = True

    def _batch_to_memory(self, b: Batch, reason: str) -> None:
        """The disk failed under an open batch: nothing of it stays there; the state
        goes to memory and the batch's writes so far are redone in it. A memory copy that
        starts empty (the file unreadable) gets the batch's committed writes too, and only
        then what the kernel holds (on_lost), which so sees this batch's mitigations and
        does not record them a second time."""
        b.abort()
        self.health.write_failures += 1
        fresh = False
        if self._mem is None:
            fresh = self._to_memory(reason, reseed=False)
        assert self._mem is not None
        b.replay(self._mem, with_committed=fresh)
        if fresh and self.on_lost is not None:
            b.commit()
            self._batch = None          # what on_lost re-records is committed on its own
            try:
                self.on_lost()
            except Exception:   # noqa: BLE001 -- the store must go on regardless
                log.exception("re-seeding the state kept in memory failed")
            finally:
                self._batch = b
            b.begin(self._mem)

    def start_syncing(self, every_s: float) -> None:
        """Commit without fsync and have a thread fsync every `every_s` (agent.state.batch)."""
        if self.readonly or self._syncer is not None:
            return
        with self._lock:
            self._syncer = Syncer(self.path, every_s, self._file_lock)
            if self._disk is not None:
                tune(self._disk)
        self._syncer.start()
