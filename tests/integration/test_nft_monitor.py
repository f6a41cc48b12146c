"""NftMonitor and watch(): kernel notifications trigger a reconcile that repairs drift fast."""
from __future__ import annotations

import asyncio
import json
import time

import pytest

from agent.config import Config
from agent.enforce.monitor import NftMonitor, watch
from agent.enforce.nft import NftEnforcer
from swarmlab.lab import netns, sh, wait_for
from agent.model import Mitigation, MitigationKind

pytestmark = pytest.mark.privileged


def _block_elements(ns: str) -> list:
    r = sh("nft", "-j", "list", "set", "inet", "swarm_agent", "block_v4", ns=ns, check=False)
    if r.returncode:
        return []
    (s,) = [o["set"] for o in json.loads(r.stdout)["nftables"] if "set" in o]
    return s.get("elem", [])


def test_monitor_sees_a_change(lab):
    with netns(lab.victim):
        monitor = NftMonitor()
    with monitor:
        assert monitor.drain() == 0
        sh("nft", "add", "table", "inet", "someone_else", ns=lab.victim)
        wait_for(monitor.drain, 2.0)


@pytest.mark.parametrize("damage", ["flush ruleset", "delete table inet swarm_agent", "element"])
def test_watch_repairs_drift_within_a_second(lab, damage):
    target = lab.addr("attacker")
    if damage == "element":
        damage = f"delete element inet swarm_agent block_v4 {{ {target} }}"
    now = time.time()
    desired = [Mitigation(MitigationKind.BLOCK_IP, target, now, now + 600)]
    with netns(lab.victim):
        enforcer = NftEnforcer(Config())
        monitor = NftMonitor()
    calls = []

    def on_change() -> None:
        calls.append(enforcer.reconcile(desired, time.time()))

    async def scenario() -> None:
        enforcer.setup(desired, time.time())
        task = asyncio.create_task(watch(monitor, on_change, debounce_s=0.05))
        try:
            await wait_async(lambda: calls, 2.0)   # our own setup notifies: one quiet round
            assert _block_elements(lab.victim)
            await asyncio.to_thread(sh, "nft", *damage.split(), ns=lab.victim)
            start = time.monotonic()
            await wait_async(lambda: any(calls), 1.0)
            await wait_async(lambda: _block_elements(lab.victim), 1.0 - (time.monotonic() - start))
            # The repair notifies us too; the reconcile after it finds nothing: the loop ends.
            await wait_async(lambda: calls and not calls[-1], 1.0)
            settled = len(calls)
            await asyncio.sleep(0.3)    # an observation window: nothing may happen in it
            assert len(calls) == settled
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    try:
        with netns(lab.victim):     # every nftables call of the test stays in the victim
            asyncio.run(scenario())
            enforcer.remove()
    finally:
        monitor.close()
        enforcer.close()


async def wait_async(predicate, timeout_s: float) -> None:
    deadline = time.monotonic() + max(timeout_s, 0.0)
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"condition not met within {timeout_s:.2f} s")
        await asyncio.sleep(0.01)
