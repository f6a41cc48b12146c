"""What a start does with the kernel table and the database it finds (agent.daemon,
agent.respond.health, agent.enforce.recover).

The database is the record: a start puts its mitigations in force (reconcile) and lifts
what the table holds beyond them. The kernel table is read back only into a database
started afresh (first start, or the old one moved aside as corrupt), and then only what
the agent itself writes there. A finding's row is committed before its host change
(agent.respond.engine), so a crash in between leaves the row, which the next start
applies -- for every kind, also those the table cannot tell back (a service isolation).
Found by a red-team review: a start that adopted the table's extra elements undid an
operator's unblock, blocked 128.0.0.0/2 for good and took a stray counter rule for a
node isolation; a crash between a service isolation and its commit lost both."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from agent.enforce.cgroup import cgroup2_mount
from agent.model import Mitigation, MitigationKind, MitigationState
from agent.state.store import Store
from swarmlab.breachlab import throwaway_cgroup
from swarmlab.lab import sh, wait_for
from swarmlab.scenario import Scenario

pytestmark = pytest.mark.privileged

LIFTED = "203.0.113.50"


def cli(sc: Scenario, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "agent.cli.main", *args, "--config",
                           str(sc.agent.config_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def table(sc: Scenario, *what: str) -> str:
    return sh("nft", "list", *what, ns=sc.lab.victim).stdout


def test_a_start_lifts_what_the_database_does_not_hold():
    with Scenario() as sc:
        cli(sc, "block", LIFTED, "--reason", "operator block, until lifted")
        cli(sc, "unblock", LIFTED)
        assert sc.agent.stop() == 0
        # A stale ruleset dump restored at boot, or a careless `nft add element` while the
        # agent was down: elements without a timeout that no row holds.
        own = sc.lab.addr("victim")
        for elem in (LIFTED, "128.0.0.0/2", own):
            sh("nft", "add", "element", "inet", "swarm_agent", "block_v4", f"{{ {elem} }}",
               ns=sc.lab.victim)
        sc.agent.start()
        with sc.agent.store() as store:
            recorded = {m.target for m in store.mitigations(state=MitigationState.ACTIVE)}
        assert not recorded & {LIFTED, "128.0.0.0/2", own}, recorded
        in_kernel = table(sc, "set", "inet", "swarm_agent", "block_v4")
        assert LIFTED not in in_kernel and "128.0.0.0" not in in_kernel, in_kernel


def test_a_fresh_database_takes_no_stray_rule_for_a_node_isolation():
    with Scenario("allowlist:\n  management: [192.0.2.0/24]\n") as sc:
        assert sc.agent.stop() == 0
        sh("nft", "add", "rule", "inet", "swarm_agent", "isolate_fwd", "counter",
           ns=sc.lab.victim)
        for suffix in ("", "-wal", "-shm"):       # the next start begins afresh
            sc.agent.db_path.with_name(sc.agent.db_path.name + suffix).unlink(missing_ok=True)
        sc.agent.start()
        with sc.agent.store() as store:
            kinds = [m.kind for m in store.mitigations(state=MitigationState.ACTIVE)]
        assert MitigationKind.ISOLATE_NODE not in kinds
        assert "drop" not in table(sc, "chain", "inet", "swarm_agent", "isolate_in")


def test_a_service_isolation_recorded_but_not_applied_is_applied_by_the_next_start():
    with Scenario() as sc, throwaway_cgroup("swa-recover") as cg:
        path = "/" + str(cg.relative_to(cgroup2_mount()))
        assert sc.agent.stop() == 0
        # What a crash between the finding's first commit and its host change leaves:
        # the row in force, nothing on the host.
        now = time.time()
        with Store(sc.agent.db_path) as store:
            store.add_mitigation(Mitigation(MitigationKind.ISOLATE_SERVICE, path, now, None,
                                            state=MitigationState.ACTIVE,
                                            reason="isolate_service (breach.reverse_shell)"))
        assert "cgroupv2" not in table(sc, "table", "inet", "swarm_agent")
        sc.agent.start()
        wait_for(lambda: "cgroupv2" in table(sc, "table", "inet", "swarm_agent"), timeout_s=10)
        assert (cg / "cgroup.freeze").read_text().strip() == "1"
        with sc.agent.store() as store:
            [m] = store.mitigations(state=MitigationState.ACTIVE, target=path)
        assert m.kind is MitigationKind.ISOLATE_SERVICE
