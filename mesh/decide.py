"""The decider: proposals and operators' requests -> fleet decisions, signed, persisted,
published.

Order for every decision: decide under the policy, sign, persist (store state "pending"),
publish (Nats-Msg-Id = decision id), mark published with the stream sequence. A crash or a
nats-server outage anywhere after the persist leaves the decision pending; `run` retries
pending ones with backoff and `republish_pending` on start sends them again (JetStream
drops the duplicates it already has within its duplicate window). One lock serialises
deciding and publishing, so for one target a newer decision is never published before an
older one; a pending decision that a newer one for its target superseded, or one that
expired while pending, is never sent: it is marked published with sequence 0.

Every refusal is recorded in the store with its reason (`add_refusal`). Proposals are
stored by the store (record_reports/add_proposal) BEFORE `on_proposal` sees them, so the
proposal itself counts in its node's rate; `submit` does both for callers that have not.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import logging
import os
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Protocol

from agent.fleet.decision import (Decision, DecisionError, Signer, load_private_key,
                                  normalize_target, subject_for)
from mesh.policy import Outcome, Policy, PolicyConfig
from mesh.publish import NatsOptions, Publisher, PublishError

log = logging.getLogger("swarm.mesh.decide")

MAX_BACKOFF_S = 30.0


class Publishes(Protocol):
    async def publish(self, subject: str, body: bytes, msg_id: str) -> int: ...


class Decider:
    """Wires the policy, the store (mesh.store.Store: sync methods, called in a thread),
    the signer and the publisher. `clock` gives wall seconds (time.time)."""

    def __init__(self, store: Any, policy: Policy, signer: Signer, publisher: Publishes,
                 clock: Callable[[], float] = time.time, lock_path: str | Path | None = None):
        self.store = store
        self.policy = policy
        self.signer = signer
        self.publisher = publisher
        self.clock = clock
        self._mutex = asyncio.Lock()
        # the service and a `swarm-mesh block` run beside it decide under one file lock, so
        # for one target a newer decision is never published before an older one
        self._lock_fd = None
        if lock_path is not None:
            try:
                self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as e:
                raise ValueError(f"cannot open the decision lock {lock_path}: {e.strerror}") from None
        self.publish_failures = 0
        self.last_publish_error = ""

    @classmethod
    def from_config(cls, store: Any, nats: dict[str, Any] | None, signing: dict[str, Any] | None,
                    policy: dict[str, Any] | None, clock: Callable[[], float] = time.time
                    ) -> "Decider":
        """The decider of the mesh config's `nats:`, `signing:` (private_key: the Ed25519
        PEM path) and `policy:` sections; ValueError with one sentence when one is wrong.
        Nothing connects yet: the first publish (or `run`) does."""
        cfg = PolicyConfig.from_dict(policy)
        options = NatsOptions.from_dict(nats)
        signing = dict(signing or {})
        unknown = sorted(set(signing) - {"private_key", "lock_file"})
        if unknown:
            raise ValueError(f"unknown signing setting {unknown[0]!r}")
        if not isinstance(signing.get("private_key"), str) or not signing["private_key"]:
            raise ValueError("signing private_key (the Ed25519 key file) is required")
        signer = Signer(load_private_key(signing["private_key"]))
        lock_path = signing.get("lock_file") or str(signing["private_key"]) + ".lock"
        return cls(store, Policy(cfg), signer, Publisher(options, cfg.max_ttl_s), clock,
                   lock_path=lock_path)

    async def close(self) -> None:
        close = getattr(self.publisher, "close", None)
        if close is not None:
            await close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @contextlib.asynccontextmanager
    async def _lock(self) -> AsyncIterator[None]:
        """This process's mutex, then the file lock other processes deciding share."""
        async with self._mutex:
            if self._lock_fd is None:
                yield
                return
            await asyncio.to_thread(fcntl.flock, self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    async def _db(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    # -- proposals --------------------------------------------------------------------------
    async def submit(self, p: dict[str, Any]) -> Outcome | None:
        """Stores proposal `p` and decides on it; None when it was stored before (a retry
        of the same proposal by its node decides nothing twice)."""
        if not await self._db(self.store.add_proposal, p):
            return None
        return await self.on_proposal(p)

    async def on_proposal(self, p: dict[str, Any]) -> Outcome:
        """The outcome of an already stored proposal; refusals are recorded, decisions
        persisted and published (or left pending when nats-server is away)."""
        async with self._lock():
            now = self.clock()
            history = await self._db(self._history, p, now)
            outcome = self.policy.evaluate(p, now=now, **history)
            if outcome.kind == "refuse":
                await self._refuse(outcome.reason, p.get("target", ""), p.get("node", ""),
                                   p.get("provider", ""), p.get("proposal_id", ""), "proposal", now)
            elif outcome.kind == "decide":
                await self._issue(outcome.decision)
            log.info("proposal %s from %s for %s: %s (%s)", p.get("proposal_id"),
                     p.get("node"), p.get("target"), outcome.kind, outcome.reason)
            return outcome

    async def sweep(self) -> int:
        """After a start: decides again on the newest proposal for each target proposed
        within the corroboration window that no active block covers. The server stores a
        proposal before the decider sees it, so one stored just before a crash is decided
        here, not lost (the node will not send it again). Returns how many were decided on."""
        now = self.clock()
        window = self.policy.config.corroboration_window_s
        rows = await self._db(self.store.proposals, since=now - window, limit=100_000)
        refused = {(r.get("node"), r.get("proposal_id"))
                   for r in await self._db(self.store.refusals, since=now - window, limit=100_000)}
        newest: dict[str, dict[str, Any]] = {}
        for p in rows:                                   # newest first
            if (p.get("node"), p.get("proposal_id")) not in refused:
                newest.setdefault(p.get("target", ""), p)
        done = 0
        for target, p in newest.items():
            try:
                latest = await self._db(self.store.latest_decision, normalize_target(target))
            except DecisionError:
                latest = None
            if latest and latest.get("action") == "block" and latest.get("expires_at", 0) > now:
                continue
            await self.on_proposal(p)
            done += 1
        return done

    def _history(self, p: dict[str, Any], now: float) -> dict[str, Any]:
        """What the policy needs, read in one thread hop: the node's recent proposal count,
        proposals for the target and every network covering it down to the prefix limit,
        the target's latest decision, and (for drawn canaries) the fleet's nodes."""
        cfg = self.policy.config
        node_count = self.store.count_proposals(p.get("node", ""), now - cfg.rate_window_s)
        votes: list[dict[str, Any]] = []
        latest = None
        try:
            net = ipaddress.ip_network(normalize_target(p.get("target")))
        except DecisionError:
            net = None
        if net is not None:
            latest = self.store.latest_decision(str(net))
            since = now - cfg.corroboration_window_s
            limit = cfg.max_prefix_v4 if net.version == 4 else cfg.max_prefix_v6
            for plen in range(net.prefixlen, limit - 1, -1):
                votes += self.store.proposals(target=str(net.supernet(new_prefix=plen)),
                                              since=since)
        known: list[str] = []
        if isinstance(cfg.stage_canary, int) and cfg.stage_canary and cfg.stage_s > 0:
            known = [n["node"] for n in self.store.nodes() if n.get("node")]
        return {"node_count": node_count, "votes": votes, "latest": latest,
                "known_nodes": known}

    async def _refuse(self, reason: str, target: str, node: str, provider: str,
                      proposal_id: str, source: str, now: float) -> None:
        await self._db(self.store.add_refusal, {
            "at": now, "node": node, "provider": provider, "target": str(target)[:64],
            "reason": reason, "proposal_id": proposal_id, "source": source})

    # -- a human on the mesh ----------------------------------------------------------------
    async def block(self, target: str, ttl_s: float | None, reason: str,
                    operator: str) -> Outcome:
        """An operator's block: authoritative (no corroboration), still bounded by the
        allowlists, the prefix limit and the lifetime cap; refusals are recorded."""
        async with self._lock():
            now = self.clock()
            outcome = self.policy.operator_block(target, ttl_s, reason, operator, now)
            await self._conclude(outcome, target, operator, now)
            return outcome

    async def revoke(self, target: str, reason: str, operator: str) -> Outcome:
        """Revokes the target's active block: a revoke decision on the same subject (the
        stream keeps only it), kept until the block would have expired."""
        async with self._lock():
            now = self.clock()
            try:
                latest = await self._db(self.store.latest_decision, normalize_target(target))
            except DecisionError:
                latest = None
            outcome = self.policy.operator_revoke(target, latest, reason, operator, now)
            await self._conclude(outcome, target, operator, now)
            return outcome

    async def _conclude(self, outcome: Outcome, target: str, operator: str, now: float) -> None:
        if outcome.kind == "refuse":
            await self._refuse(outcome.reason, target, "", "", "", f"operator:{operator}", now)
        elif outcome.kind == "decide":
            await self._issue(outcome.decision)
        log.info("operator %s on %s: %s (%s)", operator, target, outcome.kind, outcome.reason)

    # -- staged rollout ---------------------------------------------------------------------
    async def promote_due(self, now: float | None = None) -> list[Decision]:
        """Publishes for every node each canary decision that was out for stage_s and is
        still its target's latest."""
        promoted = []
        async with self._lock():
            now = self.clock() if now is None else now
            rows = await self._db(self.store.decisions, active_at=now)
            for row in rows:
                if (row.get("scope") or {}).get("stage") != "canary":
                    continue
                latest = await self._db(self.store.latest_decision, row["target"])
                d = self.policy.promotion(row, latest, now)
                if d is not None:
                    await self._issue(d)
                    promoted.append(d)
        return promoted

    # -- persist, publish, republish --------------------------------------------------------
    async def _issue(self, d: Decision) -> None:
        """Persist, then publish; a failed publish leaves it pending for `run`."""
        envelope = self.signer.envelope(d)
        await self._db(self.store.add_decision, d.to_dict(), envelope)
        try:
            await self._send(d.to_dict(), envelope)
        except PublishError as e:
            self._failed(e)

    async def _send(self, d: dict[str, Any], envelope: bytes) -> int:
        seq = await self.publisher.publish(subject_for(d["target"]), envelope, d["id"])
        await self._db(self.store.mark_published, d["id"], seq)
        return seq

    def _failed(self, e: Exception) -> None:
        self.publish_failures += 1
        self.last_publish_error = str(e)
        log.warning("decision left pending: %s", e)

    async def republish_pending(self) -> tuple[int, int]:
        """Publishes every stored decision not yet marked published, oldest first; stops at
        the first failure (the rest stay pending). Returns (settled, left pending): settled
        counts those published and those retired unsent (superseded or expired)."""
        async with self._lock():
            pending = sorted(await self._db(self.store.pending_decisions),
                             key=lambda de: (de[0]["issued_at"], de[0]["id"]))
            now = self.clock()
            for i, (d, envelope) in enumerate(pending):
                latest = await self._db(self.store.latest_decision, d["target"])
                superseded = latest is not None and latest["id"] != d["id"] \
                    and latest["issued_at"] >= d["issued_at"]
                if superseded or d["expires_at"] <= now:
                    await self._db(self.store.mark_published, d["id"], 0)
                    log.info("decision %s for %s not sent: %s", d["id"], d["target"],
                             "superseded" if superseded else "expired while pending")
                    continue
                try:
                    await self._send(d, envelope)
                except PublishError as e:
                    self._failed(e)
                    return i, len(pending) - i
            return len(pending), 0

    async def run(self, stop: asyncio.Event, tick_s: float = 1.0) -> None:
        """Until `stop`: connect (creating the stream), republish pending decisions (backoff
        1 s doubling to 30 s while nats-server fails) and promote due canaries, every tick_s."""
        backoff, next_try = 0.0, 0.0
        while not stop.is_set():
            mono = time.monotonic()
            if mono >= next_try:
                try:
                    # connected and the stream in place before any decision: agents
                    # subscribe to a stream that exists from the service's first start
                    connect = getattr(self.publisher, "connect", None)
                    if connect is not None:
                        await connect()
                except PublishError as e:
                    self._failed(e)
                    left = 1
                else:
                    _, left = await self.republish_pending()
                backoff = min(MAX_BACKOFF_S, backoff * 2 or 1.0) if left else 0.0
                next_try = mono + backoff
            if not backoff:
                await self.promote_due()
            try:
                await asyncio.wait_for(stop.wait(), tick_s)
            except asyncio.TimeoutError:
                pass
