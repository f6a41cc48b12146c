"""The decider's periodic duties (mixed into mesh.decide.Decider): the sweep of stored
proposals nobody decided on (after a start, and every SWEEP_EVERY_S in Decider.run), and
superseding decisions dated past what agents take (mesh/supersede.py says why)."""
from __future__ import annotations

import logging
from typing import Any

from agent.fleet.decision import DecisionError, normalize_target
from mesh import supersede
from mesh.revocation import covers

log = logging.getLogger("swarm.mesh.decide")

SWEEP_EVERY_S = 60.0       # Decider.run sweeps stored proposals and future-dated decisions this often
SWEEP_MAX = 1000           # targets one periodic sweep decides on at most


class Periodic:
    """Needs the Decider's store, policy, clock, _db, _lock, _refuse, _issue, on_proposal."""

    async def sweep(self, limit: int | None = None) -> int:
        """After a start, and every SWEEP_EVERY_S in `run`: decides again on the newest
        proposal for each target proposed within the corroboration window that no active
        block covers (refused proposals and those of revoked certificates aside). The
        server stores a proposal before the decider sees it, so one stored just before a
        crash, or one the server did not queue (its node's share of the queue was full),
        is decided here, not lost (the node will not send it again). Targets proposed by
        the most nodes go first; `limit`: at most that many. Returns how many."""
        now = self.clock()
        window = self.policy.config.corroboration_window_s
        rows = await self._db(self.store.proposals, since=now - window, limit=100_000)
        refused = {(r.get("node"), r.get("proposal_id"))
                   for r in await self._db(self.store.refusals, since=now - window, limit=100_000)}
        revoked: dict[str, float] = {}
        for r in await self._db(self.store.node_revocations, limit=1_000_000):
            revoked[r["node"]] = max(revoked.get(r["node"], 0.0), float(r["revoked_at"]))
        newest: dict[str, dict[str, Any]] = {}
        nodes: dict[str, set[str]] = {}
        for p in rows:                                   # newest first
            if (p.get("node"), p.get("proposal_id")) not in refused and not \
                    covers(revoked.get(p.get("node", "")), float(p.get("cert_not_before") or 0)):
                newest.setdefault(p.get("target", ""), p)
                nodes.setdefault(p.get("target", ""), set()).add(p.get("node", ""))
        order = sorted(newest, key=lambda t: -len(nodes[t]))      # stable: newest first
        done = 0
        for target in order[:limit]:
            p = newest[target]
            try:
                latest = await self._db(self.store.latest_decision, normalize_target(target))
            except DecisionError:
                latest = None
            if latest and latest.get("action") == "block" and latest.get("expires_at", 0) > now:
                continue
            await self.on_proposal(p)
            done += 1
        return done

    async def _clock_fault(self, target: Any, now: float) -> None:
        """Under the lock: when `target`'s latest decision is dated past what any agent
        takes (mesh/supersede.py), retire it and issue it again now."""
        try:
            norm = normalize_target(target)
        except DecisionError:
            return
        latest = await self._db(self.store.latest_decision, norm)
        if latest is not None and float(latest["issued_at"]) > now + supersede.AGENT_FUTURE_S:
            await self._reissue(latest, now)

    async def _reissue(self, row: dict[str, Any], now: float) -> None:
        # every decision of the target dated that far ahead: the latest is issued again
        await self._db(self.store.retire_future, row["target"], now + supersede.AGENT_FUTURE_S)
        await self._refuse(supersede.ahead_reason(row, now), row["target"], "", "", "",
                           "clock", now)
        log.warning("%s", supersede.ahead_reason(row, now))
        outlive = await self._db(self.store.block_expiry, row["target"])
        await self._issue(supersede.reissued(row, now, outlive))

    async def supersede_future(self) -> int:
        """Every target whose latest decision is dated past what agents take: retired and
        issued again now (the stream then holds the new one). Returns how many."""
        async with self._lock():
            now = self.clock()
            rows = await self._db(self.store.future_decisions, now + supersede.AGENT_FUTURE_S)
            for row in rows:
                await self._reissue(row, now)
            return len(rows)

    async def _sweep_round(self) -> None:
        """The periodic part of `run`: future-dated decisions superseded, then stored
        proposals nobody decided on (bounded); a failure is logged, the loop goes on."""
        try:
            await self.supersede_future()
            await self.sweep(limit=SWEEP_MAX)
        except Exception:   # noqa: BLE001 -- a store hiccup must not stop publishing
            log.exception("periodic sweep failed")
