"""A throwaway PostgreSQL cluster for tests (Debian's PostgreSQL 15 binaries).

`PgCluster` runs initdb and pg_ctl as the `postgres` user (runuser) in a temp directory
owned by it; the server listens only on a unix socket in that directory (no TCP), trusts
local connections, and runs with fsync off (the tests kill the mesh service, never the
database). `stop()` stops the server and removes the directory.

Fixtures: `pg_cluster` (session: one cluster per test worker) and `pg_url` (a fresh
database on it per test, dropped after). Where the binaries, the postgres user or root
are missing, tests.conftest.skip_unsupported says so (a failure in CI).
"""
from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import skip_unsupported

PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
PORT = 5432          # only names the socket file; nothing listens on TCP


def pg_bin() -> Path | None:
    for d in PG_BIN_DIRS:
        if (d / "initdb").exists() and (d / "pg_ctl").exists():
            return d
    return None


def unsupported() -> str | None:
    if os.geteuid() != 0:
        return "a throwaway PostgreSQL cluster needs root (to run it as the postgres user)"
    if pg_bin() is None:
        return "needs PostgreSQL server binaries (postgresql-15; install.sh --test)"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "needs the postgres user (the postgresql package makes it)"
    if shutil.which("runuser") is None:
        return "needs runuser (util-linux)"
    return None


class PgCluster:
    def __init__(self) -> None:
        self.bin = pg_bin()
        assert self.bin is not None
        self.dir = Path(tempfile.mkdtemp(prefix="swarm-pg-"))
        pw = pwd.getpwnam("postgres")
        os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.data = self.dir / "data"
        self._names = itertools.count(1)
        self.started = False

    def _as_postgres(self, *args: str, timeout_s: float = 60) -> str:
        out = subprocess.run(["runuser", "-u", "postgres", "--", *args], capture_output=True,
                             text=True, timeout=timeout_s, cwd=self.dir)
        if out.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed: {(out.stderr or out.stdout)[-800:]}")
        return out.stdout

    def start(self) -> "PgCluster":
        self._as_postgres(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                          "-A", "trust", "-E", "UTF8", "--no-sync", "--locale=C.UTF-8")
        opts = (f"-c listen_addresses='' -c unix_socket_directories='{self.dir}' -p {PORT} "
                "-c fsync=off -c full_page_writes=off -c max_connections=50")
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l",
                          str(self.dir / "log"), "-o", opts, "-w", "-t", "60", "start",
                          timeout_s=90)
        self.started = True
        return self

    def url(self, db: str = "postgres") -> str:
        return f"postgresql:///{db}?host={self.dir}&port={PORT}&user=postgres"

    def _admin(self, sql: str) -> None:
        import psycopg2
        conn = psycopg2.connect(self.url())
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    def create_db(self) -> str:
        """A new empty database; returns its URL."""
        name = f"mesh_{next(self._names)}"
        self._admin(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_db(self, url: str) -> None:
        name = url.split("///", 1)[1].split("?", 1)[0]
        self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self) -> None:
        try:
            if self.started:
                self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m",
                                  "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster():
    """A PostgreSQL server for this test worker, stopped and removed at the end."""
    reason = unsupported()
    if reason:
        skip_unsupported(reason)
    cluster = PgCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: PgCluster):
    """The URL of a fresh database for one test, dropped after it."""
    url = pg_cluster.create_db()
    yield url
    pg_cluster.drop_db(url)
