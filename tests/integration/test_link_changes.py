"""The network probe follows the links of its namespace: a link created after start (a CNI's
veth for a new container, a re-created interface) is attached within about a second by the
probe's run() on the loop, with the same hook choice and the egress program; a deleted one
leaves the status; the stacked-link rule is re-applied; link churn costs a bounded number
of re-listings. (Red-team round 2, finding 3: links used to be chosen once, at open.)"""
from __future__ import annotations

import asyncio
import time

import pytest

from agent.sources import watched
from agent.sources.abi import NetProg
from agent.sources.net import NetProbe
from swarmlab.lab import netns, sh, wait_for
from tests.integration.test_net_probe import (PROBES, THRESHOLDS, UDP, built,  # noqa: F401
                                             open_probe)

pytestmark = pytest.mark.privileged


def on_loop(probe, body):
    """Runs probe.run() on an event loop while body() runs in a thread; body's result."""
    async def main():
        task = asyncio.create_task(probe.run(lambda _event: None))
        try:
            return await asyncio.to_thread(body)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return asyncio.run(main())


def reasons(probe) -> str:
    st = probe.status()
    return st[NetProg.TC_INGRESS]["reason"] + " | " + st[NetProg.TC_EGRESS]["reason"]


def test_a_link_added_after_start_is_watched(lab):
    probe = open_probe(lab.victim, THRESHOLDS)
    try:
        assert probe.attach_modes() == {"v0": "tc ingress"}

        def body():
            ns1 = lab.add_attacker(1)          # veth v1 appears in the victim namespace
            t0 = time.monotonic()
            wait_for(lambda: "v1" in probe.attach_modes(), 5)
            took = time.monotonic() - t0
            wait_for(lambda: "v1" in probe.status()[NetProg.TC_EGRESS]["reason"], 2)
            before = probe.verdicts()["unsolicited"]
            sh("python3", "-c", UDP, lab.addr("victim", link=1), "9999", "25", ns=ns1, timeout=20)
            time.sleep(0.3)
            return took, probe.verdicts()["unsolicited"] - before

        took, seen = on_loop(probe, body)
        status = probe.status()
        print("attached after", took, "s; seen", seen, status)
        assert took < 2.0
        assert probe.attach_modes() == {"v0": "tc ingress", "v1": "tc ingress"}
        assert 25 <= seen <= 27, f"{seen} of 25 datagrams on the new link judged"
        assert status[NetProg.TC_INGRESS]["state"] == "loaded"
        assert "tc ingress on v0 (veth" in status[NetProg.TC_INGRESS]["reason"]
        assert "), v1 (veth: native XDP copies" in status[NetProg.TC_INGRESS]["reason"]
        assert status[NetProg.TC_EGRESS] == {"state": "loaded", "reason": "tc egress on v0, v1"}
    finally:
        probe.close()


def test_a_deleted_link_leaves_the_status(lab):
    lab.add_attacker(1)
    probe = open_probe(lab.victim, THRESHOLDS)
    try:
        assert probe.attach_modes() == {"v0": "tc ingress", "v1": "tc ingress"}

        def body():
            sh("ip", "link", "del", "v1", ns=lab.victim)
            wait_for(lambda: "v1" not in reasons(probe), 3)

        on_loop(probe, body)
        status = probe.status()
        assert probe.attach_modes() == {"v0": "tc ingress"}
        assert status[NetProg.TC_EGRESS] == {"state": "loaded", "reason": "tc egress on v0"}
        assert status[NetProg.TC_INGRESS]["state"] == "loaded"
        assert len(probe.linkset.links) == 1 and all(
            getattr(k, "fd", 0) >= 0 for k in probe._links)   # nothing dead kept
    finally:
        probe.close()


def test_the_stacked_link_rule_is_applied_again_as_ports_come(lab):
    """A bridge created after start is watched while it has no port; once its port (a new
    veth) is watched, the bridge is left to it, and it is watched again when the port goes."""
    probe = open_probe(lab.victim, THRESHOLDS)
    try:
        def body():
            sh("ip", "link", "add", "br1", "type", "bridge", ns=lab.victim)
            wait_for(lambda: "br1" in probe.attach_modes(), 3)
            lab.add_attacker(1)
            sh("ip", "link", "set", "v1", "master", "br1", ns=lab.victim)
            wait_for(lambda: "br1" not in probe.attach_modes(), 3)
            judged_below = reasons(probe)
            sh("ip", "link", "del", "v1", ns=lab.victim)
            wait_for(lambda: set(probe.attach_modes()) == {"v0", "br1"}, 3)
            return judged_below

        judged_below = on_loop(probe, body)
        assert "not on br1 (judged on v1 below it)" in judged_below
        assert set(probe.attach_modes()) == {"v0", "br1"}
    finally:
        probe.close()


def test_link_churn_costs_a_bounded_number_of_relistings(lab):
    """A root user creating and deleting links in a loop: the probe re-lists at most once
    every watched.RESYNC_MIN_S (plus one), never crashes, and ends with the links there are
    (veth pairs: the only link type every kernel here has; both ends stay in the namespace)."""
    probe = open_probe(lab.victim, THRESHOLDS)
    try:
        def body():
            syncs, t0 = probe.linkset.syncs, time.monotonic()
            script = "".join(f"link add d{i} type veth peer name p{i}\nlink del d{i}\n"
                             for i in range(400))
            script += "link add dkeep type veth peer name pkeep\n"
            sh("ip", "-batch", "-", ns=lab.victim, input=script)
            time.sleep(2 * watched.RESYNC_MIN_S)
            wait_for(lambda: "dkeep" in probe.attach_modes(), 3)
            return probe.linkset.syncs - syncs, time.monotonic() - t0

        syncs, elapsed = on_loop(probe, body)
        print("re-listings", syncs, "in", elapsed, "s")
        assert 1 <= syncs <= elapsed / watched.RESYNC_MIN_S + 2
        assert set(probe.attach_modes()) == {"v0", "dkeep", "pkeep"}
        egress = probe.status()[NetProg.TC_EGRESS]
        assert egress["state"] == "loaded" and egress["reason"].startswith("tc egress on v0, ")
        assert sorted(egress["reason"].split(", ")[1:]) == ["dkeep", "pkeep"]
    finally:
        probe.close()


def test_with_an_explicit_list_a_listed_link_is_followed_and_others_ignored(lab):
    """probes.interfaces [v0, v1]: v1 deleted is reported missing (degraded), re-created it
    is attached again; a link not on the list (v2) is never attached."""
    lab.add_attacker(1)
    with netns(lab.victim):
        probe = NetProbe(PROBES, ["v0", "v1"], THRESHOLDS)
        probe.open()
    try:
        assert probe.attach_modes() == {"v0": "tc ingress", "v1": "tc ingress"}

        def body():
            sh("ip", "link", "del", "v1", ns=lab.victim)
            wait_for(lambda: "no such link" in probe.status()[NetProg.TC_EGRESS]["reason"], 3)
            gone = probe.status()
            lab.add_attacker(2)
            sh("ip", "link", "add", "v1", "type", "veth", "peer", "name", "p1", ns=lab.victim)
            wait_for(lambda: "v1" in probe.attach_modes(), 3)
            time.sleep(2 * watched.RESYNC_MIN_S)       # v2 had its chance to be (wrongly) taken
            return gone

        gone = on_loop(probe, body)
        assert gone[NetProg.TC_INGRESS]["state"] == "degraded"
        assert "not on v1: no such link" in gone[NetProg.TC_INGRESS]["reason"]
        assert gone[NetProg.TC_EGRESS]["reason"] == "attached to 1/2: v1: no such link"
        assert probe.attach_modes() == {"v0": "tc ingress", "v1": "tc ingress"}
        status = probe.status()
        assert status[NetProg.TC_EGRESS] == {"state": "loaded", "reason": "tc egress on v0, v1"}
        assert status[NetProg.TC_INGRESS]["state"] == "loaded"
        assert "v2" not in status[NetProg.TC_INGRESS]["reason"]
    finally:
        probe.close()
