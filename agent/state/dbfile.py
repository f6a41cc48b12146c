"""SQLite files for the store: opening with the agent's pragmas, judging whether a file is a
database of ours (whole, our schema, a version we know), migrating, transactions, and
telling a storage failure (disk full, I/O error, read-only) from a wrong statement.

Only agent/state uses it (agent.state.backing).
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path
from typing import Callable, TypeVar

from agent.state.schema import MIGRATIONS, SCHEMA_VERSION

T = TypeVar("T")

# Primary result codes that mean "the storage failed", not "the statement is wrong".
_STORAGE = {"SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN",
            "SQLITE_PERM", "SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_NOLFS", "SQLITE_BUSY",
            "SQLITE_LOCKED", "SQLITE_PROTOCOL"}
# ... and of those, the ones that say the file is not a usable database of ours.
_CORRUPT = {"SQLITE_CORRUPT", "SQLITE_NOTADB"}


class StoreError(RuntimeError):
    """The database cannot be used (unreadable, or from a newer agent)."""


class Corrupt(StoreError):
    """The file is not a database this agent can read; moving it aside is the cure."""


def primary(e: BaseException) -> str:
    """"SQLITE_IOERR_WRITE" -> "SQLITE_IOERR" (the primary result code's name)."""
    return "_".join((getattr(e, "sqlite_errorname", None) or "").split("_")[:2])


def is_storage_error(e: BaseException) -> bool:
    return isinstance(e, sqlite3.Error) and primary(e) in _STORAGE


def is_corrupt(e: BaseException) -> bool:
    return primary(e) in _CORRUPT


def transaction(db: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    # IMMEDIATE takes the write lock now, so a concurrent reader never makes a
    # read-then-write transaction fail half way with SQLITE_BUSY.
    db.execute("BEGIN IMMEDIATE")
    try:
        out = fn(db)
        db.execute("COMMIT")
        return out
    except BaseException:
        # SQLite may have rolled back already (disk full, I/O error).
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise


def connect(path: Path) -> sqlite3.Connection:
    if path.exists() and not path.is_file():
        raise Corrupt("is not a regular file")
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        pragmas(db)
    except BaseException:
        db.close()
        raise
    return db


def open_readonly(path: Path) -> sqlite3.Connection:
    """A reader's connection (the CLI): nothing migrated, moved or written."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                             check_same_thread=False)
        pragmas(db)
        version = db.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.Error as e:
        raise StoreError(f"cannot open database {path}: {e}") from None
    if version != SCHEMA_VERSION:
        db.close()
        raise StoreError(f"database {path} has schema version {version}, "
                         f"this program reads {SCHEMA_VERSION}")
    return db


def pragmas(db: sqlite3.Connection) -> None:
    # The agent and a reading CLI may briefly contend for the lock: wait, do not fail.
    db.execute("PRAGMA busy_timeout=5000")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    db.row_factory = sqlite3.Row


def memory() -> sqlite3.Connection:
    db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    pragmas(db)
    return db


def open_checked(path: Path) -> sqlite3.Connection:
    """Open, check and migrate the file; Corrupt when it is not ours to read."""
    try:
        db = connect(path)
    except sqlite3.DatabaseError as e:
        if is_corrupt(e):
            raise Corrupt(f"is not a database ({sentence(e)})") from None
        raise
    try:
        check(db, path)
        migrate(db, path)
    except BaseException:
        db.close()
        raise
    return db


def precheck(path: Path) -> str | None:
    """Why the file (its main part, read without writing anything: no WAL replayed or
    removed, no lock file) is not ours to read, or None."""
    if not path.is_file():
        return "is not a regular file"
    try:
        db = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    except sqlite3.Error:
        return None                 # the read-write open says what is wrong
    try:
        check(db, path)
    except Corrupt as e:
        return str(e)
    except sqlite3.Error:
        return None
    finally:
        db.close()
    return None


def has_wal(path: Path) -> bool:
    try:
        return Path(f"{path}-wal").stat().st_size > 0
    except OSError:
        return False


def with_sides(path: Path, aside: Path) -> list[tuple[Path, Path]]:
    """(file, its name aside) for the database and its -wal and -shm that exist."""
    pairs = [(path, aside)] if path.exists() else []
    for suffix in ("-wal", "-shm"):
        side = Path(f"{path}{suffix}")
        if side.exists():
            pairs.append((side, Path(f"{aside}{suffix}")))
    return pairs


def check(db: sqlite3.Connection, path: Path) -> None:
    """Corrupt unless the file reads whole and holds our schema at a version we know."""
    try:
        problems = [r[0] for r in db.execute("PRAGMA quick_check").fetchall()]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = _columns(db)
    except sqlite3.DatabaseError as e:
        if is_corrupt(e):
            raise Corrupt(f"is not a database ({sentence(e)})") from None
        raise
    if problems != ["ok"]:
        raise Corrupt(f"is damaged ({'; '.join(problems[:3])})")
    if version > SCHEMA_VERSION:
        raise Corrupt(f"has schema version {version}, newer than this agent's {SCHEMA_VERSION}")
    if version < 0 or (version == 0 and tables):
        raise Corrupt("holds tables of another program")
    want = _expected(version)
    if any(tables.get(name) != cols for name, cols in want.items()):
        raise Corrupt(f"does not hold the schema of version {version}")


_EXPECTED: dict[int, dict[str, tuple[str, ...]]] = {}


def _expected(version: int) -> dict[str, tuple[str, ...]]:
    """Tables and their columns after the first `version` migrations."""
    if version not in _EXPECTED:
        ref = sqlite3.connect(":memory:", isolation_level=None)
        for statements in MIGRATIONS[:version]:
            for s in statements:
                ref.execute(s)
        _EXPECTED[version] = _columns(ref)
        ref.close()
    return _EXPECTED[version]


def _columns(db: sqlite3.Connection) -> dict[str, tuple[str, ...]]:
    names = [r[0] for r in db.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")]
    return {n: tuple(r[1] for r in db.execute(f'PRAGMA table_info("{n}")')) for n in names}


def migrate(db: sqlite3.Connection, path: Path) -> None:
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise Corrupt(f"has schema version {version}, newer than this agent's {SCHEMA_VERSION}")
    for target in range(version + 1, SCHEMA_VERSION + 1):
        def step(c: sqlite3.Connection, target: int = target) -> None:
            for statement in MIGRATIONS[target - 1]:
                c.execute(statement)
            c.execute(f"PRAGMA user_version={target}")
        transaction(db, step)


def free_bytes(directory: Path) -> int | None:
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def filesystem_hint(directory: Path) -> str:
    """What the filesystem says about writing there: "read-only filesystem", "no space
    left", or "" (sqlite's own messages, e.g. "unable to open database file", do not)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return ""
    if st.f_flag & os.ST_RDONLY:
        return "read-only filesystem"
    if st.f_bavail == 0 or st.f_favail == 0:
        return "no space left"
    return ""


def is_empty_file(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size == 0
    except OSError:
        return False


def sentence(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__
