"""The store outlives its storage: a full disk (a real, small tmpfs) sends writes to
memory and they are written back when space returns; a corrupt database file of any kind
is moved aside (kept, byte for byte) and a fresh one started."""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from agent.model import (EventClass, Finding, Mitigation, MitigationKind, MitigationState,
                         Severity)
from agent.state.backing import BACKOFF_INITIAL_S
from agent.state.outbox import Outbox
from agent.state.store import SCHEMA_VERSION, Store
from tests.fullfs import SmallFs

pytestmark = pytest.mark.privileged     # mounts a tmpfs


def finding(n: int) -> Finding:
    return Finding(rule_id="net.syn_flood", rule_version=1,
                   event_class=EventClass.SYSTEM_ATTACK, severity=Severity.HIGH,
                   entity=f"ip:198.51.100.{n % 250}", action="block", first_mono_ns=1,
                   detected_mono_ns=2, evidence={"syns": n, "note": "x" * 200 + str(n)})


def block(target: str, at: float = 1000.0) -> Mitigation:
    return Mitigation(kind=MitigationKind.BLOCK_IP, target=target, created_at=at,
                      expires_at=at + 600, state=MitigationState.ACTIVE, reason="test")


def on_disk(path: Path, sql: str) -> int:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchone()[0]
    finally:
        db.close()


@pytest.fixture
def fs(tmp_path: Path):
    """A 512 KiB tmpfs at tmp_path/state; unmounted after the test."""
    with SmallFs(tmp_path / "state", 512) as small:
        yield small


def write_until_degraded(store: Store, start: int = 0, bound: int = 5000) -> int:
    """Record findings until a write goes to memory; how many were recorded."""
    for n in range(start, start + bound):
        store.record_finding(finding(n), 100.0 + n, 100.0 + n)
        if store.degraded:
            return n - start + 1
    raise AssertionError("the full filesystem never failed a write")


def test_full_disk_keeps_writes_in_memory_and_catches_up(fs: SmallFs) -> None:
    store = Store(fs.path / "agent.db")
    store.add_mitigation(block("192.0.2.1"))
    fs.fill()
    written = write_until_degraded(store)
    h = store.health
    assert h.state == "degraded" and "full" in h.reason and h.write_failures >= 1
    # Writes keep working, and reads see them (the responder must see what it did).
    store.add_mitigation(block("192.0.2.2", 1001.0))
    assert {m.target for m in store.active_mitigations(1100.0)} == {"192.0.2.1", "192.0.2.2"}
    on_file = on_disk(store.path, "SELECT COUNT(*) FROM mitigations")
    assert on_file == 1
    # Still full: a write-back fails and leaves the file as it was.
    assert store.catch_up(force=True) is False
    assert store.health.catch_up_failures == 1 and store.degraded
    assert on_disk(store.path, "SELECT COUNT(*) FROM mitigations") == 1
    fs.free()
    assert store.catch_up(force=True) is True
    assert not store.degraded and store.health.state == "ok" and store.health.catch_ups == 1
    assert on_disk(store.path, "SELECT COUNT(*) FROM mitigations") == 2
    assert on_disk(store.path, "SELECT SUM(findings) FROM incidents") == written
    # And the file is written directly again.
    store.add_mitigation(block("192.0.2.3", 1002.0))
    assert on_disk(store.path, "SELECT COUNT(*) FROM mitigations") == 3
    store.close()
    with Store(store.path) as again:
        assert len(again.active_mitigations(1100.0)) == 3 and not again.fresh


def test_retries_are_backed_off(fs: SmallFs) -> None:
    store = Store(fs.path / "agent.db")
    fs.fill()
    write_until_degraded(store)
    assert store.catch_up() is None          # the first try waits BACKOFF_INITIAL_S
    store._backing._next_try = 0.0
    assert store.catch_up() is False         # tried, still full
    assert store.catch_up() is None          # backed off again
    assert store._backing._next_try > 0 and BACKOFF_INITIAL_S > 0
    fs.free()
    assert store.catch_up() is True           # space came back: tried at once
    store.close()


def test_outbox_shares_the_memory_copy(fs: SmallFs) -> None:
    store = Store(fs.path / "agent.db")
    box = Outbox(store, max_reports=1000, hard_max_reports=2000)
    box.clear()
    fs.fill()
    write_until_degraded(store)
    store.add_mitigation(block("192.0.2.9"))
    queued = box.pending(10_000)
    assert any(p.kind == "mitigation" and p.payload["target"] == "192.0.2.9" for p in queued)
    box.add_heartbeat({"seq": 1}, 1.0)       # no exception on a full disk
    assert box.acknowledge([p.id for p in queued]) == len(queued)
    assert box.depth()["heartbeat"] == 1
    fs.free()
    assert store.catch_up(force=True)
    assert on_disk(store.path, "SELECT COUNT(*) FROM outbox") == 1   # the acks are written too
    store.close()


def test_start_on_a_full_disk_runs_in_memory(fs: SmallFs) -> None:
    fs.fill()
    store = Store(fs.path / "agent.db")
    assert store.degraded and store.fresh and store.schema_version == SCHEMA_VERSION
    store.add_mitigation(block("192.0.2.1"))
    assert len(store.active_mitigations(1100.0)) == 1
    fs.free()
    assert store.catch_up(force=True)
    assert on_disk(store.path, "SELECT COUNT(*) FROM mitigations") == 1
    store.close()


def test_start_on_a_full_disk_keeps_the_existing_file(fs: SmallFs) -> None:
    with Store(fs.path / "agent.db") as first:
        first.add_mitigation(block("192.0.2.1"))
    fs.fill()
    store = Store(fs.path / "agent.db")
    assert not store.fresh                    # the file's rows are there, in memory or not
    store.add_mitigation(block("192.0.2.2"))
    store.add_mitigation(block("192.0.2.3"))
    store.record_finding(finding(1), 1.0, 1.0)
    assert len(store.active_mitigations(1100.0)) == 3
    fs.free()
    assert store.catch_up(force=True) in (True, None)
    assert on_disk(store.path, "SELECT COUNT(*) FROM mitigations") == 3
    store.close()


def _valid_db(path: Path) -> None:
    with Store(path) as s:
        for n in range(200):
            s.record_finding(finding(n), 1.0, 1.0)
        s.add_mitigation(block("192.0.2.1"))


def _truncated(path: Path) -> None:
    _valid_db(path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 3)


def _garbled_header(path: Path) -> None:
    _valid_db(path)
    with open(path, "r+b") as f:
        f.write(b"this is no sqlite")


def _random(path: Path) -> None:
    path.write_bytes(os.urandom(64 * 1024))


def _directory(path: Path) -> None:
    path.mkdir()
    (path / "something").write_text("x")


def _foreign(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    db.execute("INSERT INTO customers (name) VALUES ('someone')")
    db.commit()
    db.close()


def _newer(path: Path) -> None:
    _valid_db(path)
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()


def _wrong_columns(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE incidents (id TEXT)")
    db.execute("PRAGMA user_version=1")
    db.close()


@pytest.mark.parametrize("damage", [_truncated, _garbled_header, _random, _directory,
                                    _foreign, _newer, _wrong_columns])
def test_corrupt_database_is_moved_aside(tmp_path: Path, damage) -> None:
    path = tmp_path / "agent.db"
    damage(path)
    (Path(f"{path}-wal")).write_bytes(b"stale wal of the damaged file")
    before = sorted(p.name for p in tmp_path.iterdir())
    kept = path.read_bytes() if path.is_file() else None
    store = Store(path)
    try:
        h = store.health
        assert h.state == "ok" and store.fresh and not store.degraded
        assert len(h.recovered) == 1 and "moved aside" in h.recovered[0]
        aside = [p for p in tmp_path.iterdir() if p.name.startswith("agent.db.corrupt-")
                 and not p.name.endswith(("-wal", "-shm"))]
        assert len(aside) == 1, before
        if kept is not None:
            assert aside[0].read_bytes() == kept       # kept byte for byte for forensics
        assert Path(f"{aside[0]}-wal").read_bytes() == b"stale wal of the damaged file"
        assert store.active_mitigations(1100.0) == []
        store.add_mitigation(block("192.0.2.1"))
        assert on_disk(path, "SELECT COUNT(*) FROM mitigations") == 1
    finally:
        store.close()


def test_empty_file_is_a_new_database(tmp_path: Path) -> None:
    path = tmp_path / "agent.db"
    path.write_bytes(b"")
    with Store(path) as store:
        assert store.fresh and store.health.recovered == [] and not store.degraded
        assert store.schema_version == SCHEMA_VERSION


def test_a_healthy_database_is_not_fresh(tmp_path: Path) -> None:
    _valid_db(tmp_path / "agent.db")
    with Store(tmp_path / "agent.db") as store:
        assert not store.fresh and store.health.recovered == []
        assert len(store.active_mitigations(1100.0)) == 1


def test_a_run_ending_degraded_leaves_its_state_for_the_next(fs: SmallFs, tmp_path: Path) -> None:
    spill = tmp_path / "run" / "unsaved-state.db"       # the run directory: another fs
    store = Store(fs.path / "agent.db", spill=spill)
    store.add_mitigation(block("192.0.2.1"))
    fs.fill()
    write_until_degraded(store)
    store.add_mitigation(block("192.0.2.2"))
    store.close()                                       # still full: nothing written
    assert spill.exists()
    assert on_disk(fs.path / "agent.db", "SELECT COUNT(*) FROM mitigations") == 1
    again = Store(fs.path / "agent.db", spill=spill)    # still full: runs from the spill
    assert again.degraded and "last run" in again.health.reason and not again.fresh
    assert len(again.active_mitigations(1100.0)) == 2
    fs.free()
    assert again.catch_up(force=True)
    assert not spill.exists()
    assert on_disk(fs.path / "agent.db", "SELECT COUNT(*) FROM mitigations") == 2
    again.close()
    with Store(fs.path / "agent.db", spill=spill) as third:
        assert not third.degraded and len(third.active_mitigations(1100.0)) == 2


def test_a_garbled_spill_is_ignored(tmp_path: Path) -> None:
    spill = tmp_path / "unsaved-state.db"
    spill.write_bytes(b"not a database at all" * 100)
    with Store(tmp_path / "agent.db", spill=spill) as store:
        assert not store.degraded and not spill.exists()


def test_a_file_that_goes_bad_under_the_agent_starts_over_in_memory(tmp_path: Path) -> None:
    path = tmp_path / "agent.db"
    store = Store(path)
    for n in range(200):
        store.record_finding(finding(n), 1.0, 1.0)
    store.add_mitigation(block("192.0.2.1"))
    lost: list[int] = []

    def reseed() -> None:       # what the agent does: re-record what the kernel holds
        lost.append(1)
        store.add_mitigation(block("192.0.2.1"))

    store.on_lost(reseed)
    store._backing.read(lambda db: db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())
    size = path.stat().st_size
    with open(path, "r+b") as f:                 # the same inode, garbage from page 2 on
        f.seek(4096)
        f.write(os.urandom(size - 4096))
    store._backing.read(lambda db: db.execute("PRAGMA shrink_memory"))   # no cached pages
    store.record_finding(finding(1000), 2.0, 2.0)   # neither raises
    assert store.degraded and store.fresh and lost == [1]
    assert [m.target for m in store.active_mitigations(1100.0)] == ["192.0.2.1"]
    assert "failed" in store.health.reason
    assert store.catch_up(force=True)            # the bad file goes aside, memory is written
    assert on_disk(path, "SELECT COUNT(*) FROM mitigations") == 1
    assert len(list(tmp_path.glob("agent.db.corrupt-*"))) >= 1
    store.close()


def test_metrics_say_storage_is_degraded(fs: SmallFs) -> None:
    from prometheus_client import generate_latest

    from agent.report.metrics import Metrics

    store = Store(fs.path / "agent.db")
    metrics = Metrics(store)

    def scrape() -> dict[str, float]:
        text = generate_latest(metrics.registry).decode()
        return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                if line.startswith("swarm_agent_storage_")}

    assert scrape()["swarm_agent_storage_degraded"] == 0
    fs.fill()
    write_until_degraded(store)
    got = scrape()
    assert got["swarm_agent_storage_degraded"] == 1
    assert got["swarm_agent_storage_write_failures_total"] >= 1
    fs.free()
    assert store.catch_up(force=True)
    got = scrape()
    assert got["swarm_agent_storage_degraded"] == 0 and got["swarm_agent_storage_catch_ups_total"] == 1
    store.close()


def test_a_read_only_filesystem_runs_in_memory(fs: SmallFs) -> None:
    with Store(fs.path / "agent.db") as first:
        first.add_mitigation(block("192.0.2.1"))
    fs.readonly()
    store = Store(fs.path / "agent.db")
    assert store.degraded and not store.fresh
    store.add_mitigation(block("192.0.2.2"))
    assert len(store.active_mitigations(1100.0)) == 2
    assert store.catch_up(force=True) is False
    fs.readonly(False)
    assert store.catch_up(force=True)
    assert on_disk(store.path, "SELECT COUNT(*) FROM mitigations") == 2
    store.close()
