"""One transaction per finding (Store.batch, agent.state.batch): the incident, mitigation,
timeline and outbox rows of one finding are written together or not at all -- on disk,
in the memory fallback, and when the disk fails half way through (a real full tmpfs)."""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from agent.model import (EventClass, Finding, Mitigation, MitigationKind, MitigationState,
                         Severity)
from agent.state.store import Store
from tests.fullfs import SmallFs

TABLES = ("incidents", "mitigations", "incident_events", "outbox")


def finding(n: int, note: str = "") -> Finding:
    return Finding(rule_id="net.syn_flood", rule_version=1,
                   event_class=EventClass.SYSTEM_ATTACK, severity=Severity.HIGH,
                   entity=f"ip:198.51.100.{n}", action="block", first_mono_ns=1,
                   detected_mono_ns=2, evidence={"syns": n, "note": note})


def block(target: str, incident_id: str | None = None) -> Mitigation:
    return Mitigation(kind=MitigationKind.BLOCK_IP, target=target, created_at=1000.0,
                      expires_at=1600.0, state=MitigationState.ACTIVE, reason="test",
                      incident_id=incident_id)


def write_finding(store: Store, n: int, note: str = "") -> str:
    """What the responder writes for one blocked finding."""
    inc = store.record_finding(finding(n, note), 100.0, 101.0)
    m = block(f"198.51.100.{n}", inc.id)
    store.add_mitigation(m, rule="net.syn_flood@1")
    store.add_incident_event(inc.id, "mitigation_applied", "blocked", 102.0,
                             {"mitigation_id": m.id})
    store.mark_mitigated(inc.id, 102.0, False)
    return inc.id


def counts(path: Path) -> dict[str, int]:
    """Rows per table as another process sees the file."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in TABLES}
    finally:
        db.close()


def test_a_batch_is_one_commit(tmp_path: Path) -> None:
    store = Store(tmp_path / "agent.db")
    try:
        with store.batch():
            incident_id = write_finding(store, 1)
            # Inside: the batch reads its own writes; another reader sees none of them.
            assert store.incident(incident_id).mitigated_at == 102.0
            assert counts(store.path) == dict.fromkeys(TABLES, 0)
        after = counts(store.path)
        assert after["incidents"] == after["mitigations"] == 1
        assert after["incident_events"] == 2      # the finding and the applied mitigation
        assert after["outbox"] == 2               # one snapshot per incident and mitigation
    finally:
        store.close()


def test_an_exception_mid_batch_leaves_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "agent.db")
    try:
        with pytest.raises(RuntimeError, match="half way"):
            with store.batch():
                incident_id = write_finding(store, 1)
                raise RuntimeError("half way")
        assert counts(store.path) == dict.fromkeys(TABLES, 0)
        assert store.incident(incident_id) is None
        # The store goes on: the next batch commits.
        with store.batch():
            write_finding(store, 2)
        assert counts(store.path)["incidents"] == 1
    finally:
        store.close()


def test_a_failed_write_inside_leaves_nothing_of_itself(tmp_path: Path) -> None:
    store = Store(tmp_path / "agent.db")
    try:
        with store.batch():
            incident_id = write_finding(store, 1)
            [m] = store.mitigations()
            with pytest.raises(sqlite3.IntegrityError):
                store.add_mitigation(m)           # the same id again
        assert counts(store.path)["mitigations"] == 1
        assert store.incident(incident_id) is not None
    finally:
        store.close()


def test_nested_batches_join_the_outer_one(tmp_path: Path) -> None:
    store = Store(tmp_path / "agent.db")
    try:
        with pytest.raises(RuntimeError):
            with store.batch():
                with store.batch():
                    write_finding(store, 1)
                raise RuntimeError("after the inner one")
        assert counts(store.path) == dict.fromkeys(TABLES, 0)
    finally:
        store.close()


@pytest.mark.privileged       # mounts a tmpfs
def test_disk_full_mid_batch_lands_whole_in_memory(tmp_path: Path) -> None:
    with SmallFs(tmp_path / "state", 1024) as fs:
        store = Store(fs.path / "agent.db")
        try:
            write_finding(store, 1)
            before = counts(store.path)
            big = "x" * 1000
            with store.batch():
                ids = [write_finding(store, 10, big)]
                fs.fill()                          # the disk fills half way through
                ids += [write_finding(store, n, big) for n in range(11, 30)]
            assert store.degraded
            # Nothing of the batch on disk, all of it in the memory copy.
            assert counts(store.path) == before
            assert all(store.incident(i) is not None for i in ids)
            assert len(store.mitigations(incident_id=ids[-1])) == 1
            fs.free()
            assert store.catch_up(force=True)
            after = counts(store.path)
            assert after["incidents"] == before["incidents"] + 20
            assert after["mitigations"] == before["mitigations"] + 20
        finally:
            store.close()


@pytest.mark.privileged
def test_a_batch_while_degraded_is_atomic_in_memory(tmp_path: Path) -> None:
    with SmallFs(tmp_path / "state", 512) as fs:
        store = Store(fs.path / "agent.db")
        try:
            fs.fill()
            for n in range(1, 200):                # until a write goes to memory
                write_finding(store, n, "x" * 1000)
                if store.degraded:
                    break
            assert store.degraded
            kept = len(store.mitigations())
            with pytest.raises(RuntimeError):
                with store.batch():
                    incident_id = write_finding(store, 250)
                    raise RuntimeError("half way")
            assert store.incident(incident_id) is None
            assert len(store.mitigations()) == kept
            fs.free()
            assert store.catch_up(force=True)
            assert counts(store.path)["mitigations"] == kept
        finally:
            store.close()


def test_syncing_store_commits_and_survives_reopen(tmp_path: Path) -> None:
    store = Store(tmp_path / "agent.db")
    store.start_syncing(0.01)
    try:
        with store.batch():
            incident_id = write_finding(store, 1)
        store.record_audit(1.0, "local:uid=0", "admin", "Block", {}, "ok")
        assert counts(store.path)["incidents"] == 1
    finally:
        store.close()
    again = Store(tmp_path / "agent.db")
    try:
        assert again.incident(incident_id).mitigated_at == 102.0
        assert len(again.audit()) == 1
    finally:
        again.close()


def _garble(path: Path, store: Store) -> None:
    """The file goes bad under the agent (every page past the first overwritten)."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(4096)
        f.write(os.urandom(size - 4096))
    store._backing.read(lambda db: db.execute("PRAGMA shrink_memory"))


def _seeded(path: Path) -> Store:
    store = Store(path)
    for n in range(200):
        store.record_finding(finding(n), 1.0, 1.0)
    store._backing.read(lambda db: db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())
    return store


def test_the_file_going_bad_after_the_commit_point_records_the_block_once(tmp_path: Path) -> None:
    # The responder's order: incident and mitigation committed (commit point), host
    # changed, then the outcome. The file goes bad before the outcome is written: the
    # memory copy starts empty, gets the batch's committed rows, and only then what the
    # kernel holds (on_lost), which must not record the batch's block a second time.
    path = tmp_path / "agent.db"
    store = _seeded(path)
    kernel: set[str] = set()

    def reseed() -> None:
        for target in kernel:
            if not store.mitigations(state=MitigationState.ACTIVE, target=target,
                                     live_at=1100.0, limit=1):
                store.add_mitigation(block(target))

    store.on_lost(reseed)
    try:
        with store.batch():
            inc = store.record_finding(finding(250), 100.0, 101.0)
            m = block("198.51.100.250", inc.id)
            store.add_mitigation(m, rule="net.syn_flood@1")
            store.commit_point()
            kernel.add(m.target)
            _garble(path, store)
            store.add_incident_event(inc.id, "mitigation_applied", "blocked", 102.0,
                                     {"mitigation_id": m.id})
            store.mark_mitigated(inc.id, 102.0, False)
        assert store.degraded
        [active] = store.mitigations(state=MitigationState.ACTIVE, target="198.51.100.250")
        assert active.incident_id == inc.id
        assert store.incident(inc.id).mitigated_at == 102.0
    finally:
        store.close()


def test_a_repeat_finding_survives_the_file_going_bad_mid_batch(tmp_path: Path) -> None:
    # Replayed into a memory copy that lost the file, the repeat finding's incident is
    # opened under the id the batch already used, so its mitigation still refers to it.
    path = tmp_path / "agent.db"
    store = _seeded(path)
    store.on_lost(lambda: None)
    try:
        with store.batch():
            inc = store.record_finding(finding(7), 100.0, 101.0)     # a repeat offender
            m = block("198.51.100.7", inc.id)
            store.add_mitigation(m, rule="net.syn_flood@1")
            _garble(path, store)
            store.add_incident_event(inc.id, "mitigation_applied", "blocked", 102.0,
                                     {"mitigation_id": m.id})
        [kept] = store.mitigations(target="198.51.100.7")
        assert kept.incident_id == inc.id and store.incident(inc.id) is not None
    finally:
        store.close()


def test_a_checkpoint_racing_catch_up_loses_nothing_written_while_degraded(tmp_path, monkeypatch):
    # The Syncer's checkpoint opens the file, then its WAL by name in the next statement;
    # a catch_up that replaced the file in between paired the new file's WAL with the old
    # (moved-aside) file: what was written while degraded was lost. Forced interleaving:
    # the checkpoint is held between its two steps while catch_up runs.
    import threading
    import time
    import types

    from agent.state import batch

    path = tmp_path / "agent.db"
    store = Store(path)
    store.start_syncing(60.0)            # the thread idles: _checkpoint is driven here
    now = time.time()
    store.add_mitigation(Mitigation(MitigationKind.BLOCK_IP, "198.51.100.1", now, now + 600,
                                    state=MitigationState.ACTIVE, reason="before"))
    b = store._backing
    b._to_memory("test: the file cannot be read")
    b._base_lost = True
    store.add_mitigation(Mitigation(MitigationKind.BLOCK_IP, "198.51.100.2", now, now + 600,
                                    state=MitigationState.ACTIVE, reason="while degraded"))
    opened, gate = threading.Event(), threading.Event()
    real = sqlite3.connect

    def connect(*a, **k):
        c = real(*a, **k)
        opened.set()
        gate.wait(5)
        return c

    monkeypatch.setattr(batch, "sqlite3", types.SimpleNamespace(connect=connect,
                                                                Error=sqlite3.Error))
    checkpoint = threading.Thread(target=b._syncer._checkpoint)
    checkpoint.start()
    assert opened.wait(5)
    caught: list[bool] = []
    catching = threading.Thread(target=lambda: caught.append(store.catch_up(force=True)))
    catching.start()
    time.sleep(0.2)                      # catch_up waits for the checkpoint, not under it
    gate.set()
    checkpoint.join(5)
    catching.join(10)
    monkeypatch.undo()
    store.close()
    assert caught == [True]
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        targets = {r[0] for r in db.execute("SELECT target FROM mitigations")}
    finally:
        db.close()
    assert "198.51.100.2" in targets, targets
