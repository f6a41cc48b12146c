"""The agent's anti-entropy read (FleetSubscriber._audit) against a real nats-server with
the generated node permissions: a revoke the cursor went past without applying (a relay
withheld it) is read from the latest-per-subject consumer at the next session start and
lifts its block. Dry run, no namespaces."""
from __future__ import annotations

import asyncio
import time

from agent.fleet.decision import STREAM, subject_for
from tests.integration.test_redteam_r11_nats import KEY, Agent, decider, pem, srv  # noqa: F401

X, Y = "203.0.113.21/32", "203.0.113.22/32"


def test_a_revoke_behind_the_cursor_is_read_by_the_next_session(srv, tmp_path):
    async def go():
        dec, pub = decider(srv)
        keys = [pem(tmp_path, KEY, "mesh.pub")]
        agent = Agent(srv, tmp_path / "agent", keys)
        try:
            assert (await dec.block(X, 3600, "", "ana")).kind == "decide"
            await agent.run_for(1.0)
            assert X in agent.sub.blocks(time.time())
        finally:
            agent.close()
        await dec.revoke(X, "false positive", "ana")
        await dec.block(Y, 3600, "", "ana")
        last = await pub._js.get_last_msg(STREAM, subject_for(Y))
        # what a relay that withheld the revoke leaves: the cursor past it, X still held
        agent = Agent(srv, tmp_path / "agent", keys)
        agent.store._write(lambda db: db.execute("UPDATE fleet_cursor SET seq = ?", (last.seq,)))
        agent.close()
        agent = Agent(srv, tmp_path / "agent", keys)
        try:
            assert agent.sub.cursor == last.seq and X in agent.sub.blocks(time.time())
            await agent.run_for(1.5)
            blocks = agent.sub.blocks(time.time())
        finally:
            agent.close()
        await dec.close()
        return blocks

    blocks = asyncio.run(go())
    assert X not in blocks, "the revoke behind the cursor was not read by the anti-entropy read"
