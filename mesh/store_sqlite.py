"""The SQLite backend of the mesh store: one file, WAL, synchronous=FULL (an acknowledged
report survives a power cut), a busy timeout so the CLI can read while the service writes.

Opened by root (`swarm-mesh enroll` records enrolments, and creates the store when the
service never ran) in a directory another user owns (the service's state directory), the
files root made there (the database, its -wal and -shm) are given to that user: a
root-owned store or journal would stop the service from writing."""
from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import os

from agent.yamlsafe import printable
from mesh.schema import SCHEMA_VERSION, upgrade_statements
from mesh.store import Cursor, Store, StoreAbsent, StoreError

BUSY_TIMEOUT_S = 10.0


class _SqliteCursor(Cursor):
    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self.conn.execute(sql, tuple(params)).rowcount

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cur = self.conn.execute(sql, tuple(params))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


class SqliteStore(Store):
    dialect = "sqlite"

    def __init__(self, path: str | Path, create: bool = True):
        super().__init__()
        self.path = Path(path)
        self.url = f"sqlite://{self.path.resolve()}" if self.path.is_absolute() else str(path)
        shown = printable(str(self.path))
        if not create and not self.path.exists():
            raise StoreAbsent(f"store {shown} does not exist (the mesh service creates it "
                             "when it starts)")
        try:
            if create:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_S,
                                         check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"cannot open store {shown}: {getattr(e, 'strerror', None) or e}") \
                from None
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._schema(create)
            self._give_to_directory_owner()
        except OSError as e:
            self._conn.close()
            raise StoreError(f"cannot give store {shown} to its directory's owner: "
                             f"{e.strerror}") from None
        except sqlite3.Error as e:
            self._conn.close()
            raise StoreError(f"cannot use store {shown}: {e}") from None
        except StoreError:
            self._conn.close()
            raise

    def _schema(self, create: bool) -> None:
        has_meta = self._conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                                      "AND name = 'meta'").fetchone()
        version = None
        if has_meta:
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'"
                                     ).fetchone()
            version = int(row[0]) if row else None
        if version is not None and version > SCHEMA_VERSION:
            raise StoreError(f"store {printable(str(self.path))} has schema version {version}, "
                             f"newer than this mesh service's {SCHEMA_VERSION}")
        if version == SCHEMA_VERSION:
            return
        if not create:
            shown = printable(str(self.path))
            if version is None:
                raise StoreAbsent(f"store {shown} is not a mesh store (no schema)")
            raise StoreError(f"store {shown} has schema version {version}, older than "
                             f"this mesh service's {SCHEMA_VERSION}: start the service once to "
                             "upgrade it")
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            for sql in upgrade_statements("sqlite", self._columns):
                self._conn.execute(sql)
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                               (str(SCHEMA_VERSION),))
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    def _give_to_directory_owner(self) -> None:
        if os.geteuid() != 0:
            return
        owner = os.stat(self.path.parent)
        if owner.st_uid == 0:
            return
        for name in (self.path.name, f"{self.path.name}-wal", f"{self.path.name}-shm"):
            p = self.path.parent / name
            try:
                if os.lstat(p).st_uid == 0:
                    os.lchown(p, owner.st_uid, owner.st_gid)
            except FileNotFoundError:
                pass

    def _columns(self, table: str) -> set[str]:
        return {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[Cursor]:
        try:
            self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        except sqlite3.Error as e:
            raise StoreError(f"store {printable(str(self.path))}: {e}") from None
        try:
            yield _SqliteCursor(self._conn)
        except sqlite3.Error as e:
            self._conn.execute("ROLLBACK")
            raise StoreError(f"store {printable(str(self.path))}: {e}") from None
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        try:
            self._conn.execute("COMMIT")
        except sqlite3.Error as e:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise StoreError(f"store {printable(str(self.path))}: {e}") from None

    def _close(self) -> None:
        self._conn.close()
