"""`swarm-mesh enroll` beside other users and other enrolments (mesh/enroll.py): an OUTDIR in
a directory others can write is refused, two enrolments at once both reach the ledger, a
store enroll made as root belongs to the state directory's owner, and node-revoke dates a
revocation after the notBefore the ledger recorded when the store has no record of it.
Everything in tmp_path."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from mesh import cli
from mesh.config import load
from mesh.enroll import enroll
from mesh.identity import from_pem
from mesh.revocation import covers
from mesh.setup import Layout, init_mesh
from mesh.store import open_store

NOBODY = 65534


@pytest.fixture
def mesh_dir(tmp_path: Path) -> Path:
    init_mesh(tmp_path / "mesh", ["mesh.example"], "0.0.0.0:17443", "0.0.0.0:14222",
              tmp_path / "state")
    return tmp_path / "mesh"


def test_an_out_in_a_directory_others_can_write_is_refused(mesh_dir: Path, tmp_path: Path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)                       # not sticky: anyone may rename OUT away
    with pytest.raises(cli.UsageError, match="which another user can write"):
        enroll(mesh_dir, "gpu-1", "acme", shared / "gpu-1", "/p")
    assert not (shared / "gpu-1").exists()
    os.chmod(shared, 0o1777)                      # sticky, like /tmp: fine
    enroll(mesh_dir, "gpu-1", "acme", shared / "gpu-1", "/p")


def test_two_enrolments_at_once_both_reach_the_ledger(mesh_dir: Path, tmp_path: Path):
    errors: list = []

    def one(node: str) -> None:
        try:
            enroll(mesh_dir, node, "acme", tmp_path / node, "/p")
        except Exception as e:                    # noqa: BLE001 (reported below)
            errors.append(e)
    threads = [threading.Thread(target=one, args=(f"gpu-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert sorted(json.loads(Layout(mesh_dir).ledger.read_text())["nodes"]) == \
        [f"gpu-{i}" for i in range(4)]


def test_a_store_enroll_makes_as_root_is_the_state_directorys_owners(mesh_dir: Path,
                                                                     tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("needs root to give the state directory to another user")
    state = tmp_path / "state"
    os.chown(state, NOBODY, NOBODY)
    enroll(mesh_dir, "gpu-1", "acme", tmp_path / "out", "/p")
    owners = {p.name: p.stat().st_uid for p in state.iterdir() if p.name.startswith("mesh.db")}
    assert owners and set(owners.values()) == {NOBODY}, owners


def test_node_revoke_covers_the_ledgers_not_before_the_store_never_recorded(
        mesh_dir: Path, tmp_path: Path):
    """An enrolment from before the store recorded them (its row deleted here), the clock
    stepped back an hour: the ledger beside --config still dates the revocation after it."""
    lay = Layout(mesh_dir)
    enroll(mesh_dir, "gpu-1", "acme", tmp_path / "out", "/p")
    cert = from_pem((tmp_path / "out" / "node.pem").read_bytes())
    store = open_store(load(lay.config).store)
    with store.tx() as cur:
        cur.run("DELETE FROM enrolments")
    store.close()
    from mesh import nodecmd
    got = nodecmd.ledger_not_before(str(lay.config), "gpu-1")
    assert got == cert.not_before
    store = open_store(load(lay.config).store)
    try:
        done = store.revoke_node("gpu-1", "", "op", time.time() - 3600, unknown_ok=True,
                                 not_before=got)
    finally:
        store.close()
    assert covers(done["revoked_at"], cert.not_before)
