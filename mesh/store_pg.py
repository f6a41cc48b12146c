"""The PostgreSQL backend of the mesh store (psycopg2, Debian's python3-psycopg2).

One connection, serialised by the store's lock. A lost connection (the server restarted,
a network cut) fails the transaction in progress with a StoreError (the reporting API
answers UNAVAILABLE and the agent retries) and is opened again by the next one.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from agent.yamlsafe import printable
from mesh.config import shown_url
from mesh.schema import SCHEMA_VERSION, upgrade_statements
from mesh.store import Cursor, Store, StoreAbsent, StoreError

try:
    import psycopg2
except ImportError:            # pragma: no cover - python3-psycopg2 is a dependency
    psycopg2 = None

CONNECT_TIMEOUT_S = 10
# The schema is created once even when two mesh services start together.
_SCHEMA_LOCK = 7_443_001
# With a node name's hash: one node's batches and revocations (mesh/revocation.py).
_NODE_LOCK = 7_443_002


def _sentence(e: Exception) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return printable(text.rstrip("."))


class _PgCursor(Cursor):
    def __init__(self, cur: Any):
        self.cur = cur

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        self.cur.execute(sql.replace("?", "%s"), tuple(params))
        return self.cur.rowcount

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        self.cur.execute(sql.replace("?", "%s"), tuple(params))
        names = [d[0] for d in self.cur.description]
        return [dict(zip(names, _plain(row))) for row in self.cur.fetchall()]


def _plain(row: tuple) -> list[Any]:
    return [bytes(v) if isinstance(v, memoryview) else v for v in row]


class PgStore(Store):
    dialect = "postgresql"

    def __init__(self, url: str, create: bool = True):
        super().__init__()
        if psycopg2 is None:
            raise StoreError("the PostgreSQL store needs psycopg2 (python3-psycopg2)")
        self.url = url
        self._conn = None
        self._connect()
        try:
            self._schema(create)
        except psycopg2.Error as e:
            self._close()
            raise StoreError(f"cannot use store {shown_url(url)}: {_sentence(e)}") from None
        except StoreError:
            self._close()
            raise

    def _connect(self) -> None:
        try:
            self._conn = psycopg2.connect(self.url, connect_timeout=CONNECT_TIMEOUT_S)
        except psycopg2.Error as e:
            raise StoreError(f"cannot connect to store {shown_url(self.url)}: {_sentence(e)}") \
                from None

    def _schema(self, create: bool) -> None:
        assert self._conn is not None
        with self._conn, self._conn.cursor() as cur:
            if create:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            cur.execute("SELECT to_regclass('meta') IS NOT NULL")
            version = None
            if cur.fetchone()[0]:
                cur.execute("SELECT value FROM meta WHERE key = 'schema_version'")
                row = cur.fetchone()
                version = int(row[0]) if row else None
            if version is not None and version > SCHEMA_VERSION:
                raise StoreError(f"store {shown_url(self.url)} has schema version {version}, "
                                 f"newer than this mesh service's {SCHEMA_VERSION}")
            if version == SCHEMA_VERSION:
                return
            if not create:
                shown = shown_url(self.url)
                if version is None:
                    raise StoreAbsent(f"store {shown} is not a mesh store (no schema)")
                raise StoreError(f"store {shown} has schema version {version}, older than "
                                 f"this mesh service's {SCHEMA_VERSION}: start the service once to "
                                 "upgrade it")

            def columns_of(table: str) -> set[str]:
                cur.execute("SELECT column_name FROM information_schema.columns WHERE "
                            "table_schema = current_schema() AND table_name = %s", (table,))
                return {row[0] for row in cur.fetchall()}

            for sql in upgrade_statements("postgresql", columns_of):
                cur.execute(sql)
            cur.execute("INSERT INTO meta VALUES ('schema_version', %s) ON CONFLICT (key) "
                        "DO UPDATE SET value = excluded.value", (str(SCHEMA_VERSION),))

    def lock_node(self, cur: Cursor, node: str) -> None:
        """Until this transaction ends (a hash collision only serialises two nodes)."""
        cur.run("SELECT pg_advisory_xact_lock(?, hashtext(?))", (_NODE_LOCK, node))

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[Cursor]:
        if self._conn is None or self._conn.closed:
            self._connect()
        conn = self._conn
        assert conn is not None
        try:
            with conn, conn.cursor() as cur:     # commit at the end, rollback on an error
                yield _PgCursor(cur)
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as e:
            self._close()                        # the next transaction connects again
            raise StoreError(f"store {shown_url(self.url)}: {_sentence(e)}") from None
        except psycopg2.Error as e:
            raise StoreError(f"store {shown_url(self.url)}: {_sentence(e)}") from None

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg2.Error:
                pass
            self._conn = None
