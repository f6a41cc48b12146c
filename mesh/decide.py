"""The decider: proposals and operators' requests -> fleet decisions, signed, persisted,
published.

Order for every decision: decide under the policy, sign, persist (store state "pending"),
publish (Nats-Msg-Id = decision id), mark published with the stream sequence. A crash or a
nats-server outage anywhere after the persist leaves the decision pending; `run` retries
pending ones with backoff and `republish_pending` on start sends them again (JetStream
drops the duplicates it already has within its duplicate window). One lock serialises
deciding and publishing, so for one target a newer decision is never published before an
older one; a pending decision that a newer one for its target superseded, or one that
expired while pending, is never sent: it is marked published with sequence 0. A decision
nats-server refuses for good (PublishError.permanent: a subject or payload it will never
take) is marked "failed", recorded as a refusal with the server's reason, and the others
go on; only "nats-server is away" keeps the rest pending behind it.

When the publisher had to (re)create the stream (a new nats-server, a wiped JetStream
store, `nats stream rm`), every target's current decision in the store is published again,
oldest first, so agents that reload the snapshot of the new stream get them back.

The policy's unoverridable allowlist gets the fleet's own decision channel: the host of
nats.url (its addresses, when it is a name) and the mesh's listen address.

Every refusal is recorded in the store with its reason (`add_refusal`). Proposals are
stored by the store (record_reports/add_proposal) BEFORE `on_proposal` sees them, so the
proposal itself counts in its node's rate; `submit` does both for callers that have not.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import ipaddress
import logging
import os
import socket
import time
from urllib.parse import urlsplit
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Protocol

from agent.fleet.decision import (MAX_BODY_BYTES, Decision, DecisionError, Signer,
                                  load_private_key, normalize_target, subject_for)
from mesh import records, supersede
from mesh.periodic import SWEEP_EVERY_S, Periodic
from mesh.policy import Outcome, Policy, PolicyConfig
from mesh.publish import NatsOptions, Publisher, PublishError

log = logging.getLogger("swarm.mesh.decide")

MAX_BACKOFF_S = 30.0


class Publishes(Protocol):
    async def publish(self, subject: str, body: bytes, msg_id: str) -> int: ...


class Decider(Periodic):
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
        self._resets_done = 0          # the publisher's stream_resets already republished

    @classmethod
    def from_config(cls, store: Any, nats: dict[str, Any] | None, signing: dict[str, Any] | None,
                    policy: dict[str, Any] | None, clock: Callable[[], float] = time.time,
                    listen: str | None = None) -> "Decider":
        """The decider of the mesh config's `nats:`, `signing:` (private_key: the Ed25519
        PEM path) and `policy:` sections; ValueError with one sentence when one is wrong.
        The hosts of nats.url and of `listen` (the reporting API's host:port) join the
        policy's unoverridable allowlist. Nothing connects yet: the first publish (or
        `run`) does."""
        cfg = PolicyConfig.from_dict(policy)
        options = NatsOptions.from_dict(nats)
        own = _own_networks("the fleet's NATS server (nats.url)", urlsplit(options.url).hostname)
        if listen:
            own += _own_networks("the mesh service (listen)", listen.rpartition(":")[0])
        cfg = dataclasses.replace(cfg, allowed=cfg.allowed + tuple(own))
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
        p = records.bounded_proposal(p)
        if not await self._db(self.store.add_proposal, p):
            return None
        return await self.on_proposal(p)

    async def on_proposal(self, p: dict[str, Any]) -> Outcome:
        """The outcome of an already stored proposal; refusals are recorded, decisions
        persisted and published (or left pending when nats-server is away)."""
        async with self._lock():
            now = self.clock()
            await self._clock_fault(p.get("target"), now)
            history = await self._db(self._history, p, now)
            outcome = self.policy.evaluate(p, now=now, **history)
            if outcome.kind == "refuse":
                await self._refuse(outcome.reason, p.get("target", ""), p.get("node", ""),
                                   p.get("provider", ""), p.get("proposal_id", ""), "proposal", now)
            elif outcome.kind == "decide":
                why = await self._issue(outcome.decision)
                if why:             # no refusal: the proposal stays a vote, swept later
                    outcome = Outcome("pending", why)
            log.info("proposal %s from %s for %s: %s (%s)", p.get("proposal_id"),
                     p.get("node"), p.get("target"), outcome.kind, outcome.reason)
            return outcome

    def _history(self, p: dict[str, Any], now: float) -> dict[str, Any]:
        """What the policy needs, read in one thread hop: the node's recent proposal count,
        the votes (one per node, refused ones and revoked certificates' aside) for the
        target and every network covering it down to the prefix limit, the target's latest
        decision, the standing revocations, (for drawn canaries) the fleet's nodes, and
        the latest revocation of the proposing node."""
        cfg = self.policy.config
        node_count = self.store.count_proposals(p.get("node", ""), now - cfg.rate_window_s)
        votes: list[dict[str, Any]] = []
        latest, revoked = None, []
        try:
            net = ipaddress.ip_network(normalize_target(p.get("target")))
        except DecisionError:
            net = None
        if net is not None:
            latest = self.store.latest_decision(str(net))
            revoked = self.store.current_decisions(now, action="revoke")
            limit = cfg.max_prefix_v4 if net.version == 4 else cfg.max_prefix_v6
            targets = [str(net.supernet(new_prefix=plen))
                       for plen in range(net.prefixlen, limit - 1, -1)]
            votes = self.store.votes(targets, since=now - cfg.corroboration_window_s, now=now,
                                     window_s=cfg.corroboration_window_s)
        known: list[str] = []
        if isinstance(cfg.stage_canary, int) and cfg.stage_canary and cfg.stage_s > 0:
            # a revoked node is no canary: its results would tell nobody anything
            known = [n["node"] for n in self.store.nodes()
                     if n.get("node") and not n.get("revoked")]
        return {"node_count": node_count, "votes": votes, "latest": latest,
                "known_nodes": known, "revoked": revoked,
                "node_revoked_at": self.store.node_revoked_at(p.get("node", ""))}

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
            await self._clock_fault(target, now)
            outcome = self.policy.operator_block(target, ttl_s, reason, operator, now)
            return await self._conclude(outcome, target, operator, now)

    async def revoke(self, target: str, reason: str, operator: str) -> Outcome:
        """Revokes the target's active block: a revoke decision on the same subject (the
        stream keeps only it), kept until every block ever issued for the target would
        have expired. The outcome names the blocks of covering networks still in force
        (they still drop the target's traffic), in its reason and `covering`."""
        async with self._lock():
            now = self.clock()
            try:
                norm = normalize_target(target)
            except DecisionError:
                norm = None
            latest, outlive, covering = None, 0.0, ()
            if norm is not None:
                await self._clock_fault(norm, now)
                latest = await self._db(self.store.latest_decision, norm)
                outlive = await self._db(self.store.block_expiry, norm)
                blocks = await self._db(self.store.current_decisions, now, action="block")
                covering = supersede.covering(norm, blocks)
            outcome = self.policy.operator_revoke(target, latest, reason, operator, now,
                                                  outlive=outlive)
            outcome = supersede.with_covering(outcome, norm or "", covering)
            return await self._conclude(outcome, target, operator, now)

    async def _conclude(self, outcome: Outcome, target: str, operator: str,
                        now: float) -> Outcome:
        """Records a refusal or issues the decision; the final outcome (a decision that
        cannot be dated after its target's latest is refused)."""
        if outcome.kind == "decide":
            why = await self._issue(outcome.decision)
            if why:
                outcome = Outcome("refuse", why, covering=outcome.covering)
        if outcome.kind == "refuse":
            await self._refuse(outcome.reason, target, "", "", "", f"operator:{operator}", now)
        log.info("operator %s on %s: %s (%s)", operator, target, outcome.kind, outcome.reason)
        return outcome

    # -- staged rollout ---------------------------------------------------------------------
    async def promote_due(self, now: float | None = None) -> list[Decision]:
        """Publishes for every node each canary decision that was out for stage_s and is
        still its target's latest."""
        promoted = []
        async with self._lock():
            now = self.clock() if now is None else now
            rows = await self._db(self.store.due_canaries, now - self.policy.config.stage_s, now)
            for row in rows:
                latest = await self._db(self.store.latest_decision, row["target"])
                d = self.policy.promotion(row, latest, now)
                if d is not None and not await self._issue(d):
                    promoted.append(d)
        return promoted

    # -- persist, publish, republish --------------------------------------------------------
    async def _issue(self, d: Decision) -> str:
        """Persist, then publish; a failed publish leaves it pending for `run` (or marks
        it failed when nats-server will never take it). Returns why it was not issued
        ("" when it was)."""
        latest = await self._db(self.store.latest_decision, d.target)
        why = supersede.too_far_ahead(latest, d)
        if why:
            log.warning("decision for %s not issued: %s", d.target, why)
            return why
        d = self._after_latest(d, latest)
        envelope = self.signer.envelope(d)
        if len(envelope) > MAX_BODY_BYTES:
            # The policy bounds what a decision carries; this is the last guard: agents
            # refuse an envelope this big unread, so it is never persisted or sent.
            await self._refuse(f"decision of {len(envelope)} bytes is over the agents' limit "
                               f"of {MAX_BODY_BYTES}", d.target, "", "", "", "publish",
                               self.clock())
            log.error("decision for %s not issued: %d bytes", d.target, len(envelope))
            return f"the decision's envelope is over the agents' limit of {MAX_BODY_BYTES} bytes"
        await self._db(self.store.add_decision, d.to_dict(), envelope)
        try:
            await self._send(d.to_dict(), envelope)
        except PublishError as e:
            await self._failed(d.to_dict(), e)
        else:
            await self._after_reset()
        return ""

    @staticmethod
    def _after_latest(d: Decision, latest: dict[str, Any] | None) -> Decision:
        """Agents apply a target's decisions in issued_at order and refuse an older or
        equal one as stale (a replayed block must not undo a revocation). A mesh clock that
        stepped back (NTP) or two decisions in one clock tick would make an operator's
        revoke stale everywhere: a decision is issued just after its target's `latest`
        (its expiry kept, or its lifetime when that expiry would come first); _issue
        checked that this is at most supersede.FUTURE_MARGIN_S past now."""
        if latest is None or float(latest["issued_at"]) < d.issued_at:
            return d
        issued = float(latest["issued_at"]) + 0.001
        expires = d.expires_at if d.expires_at > issued else issued + (d.expires_at - d.issued_at)
        return dataclasses.replace(d, issued_at=issued, expires_at=expires)

    async def _send(self, d: dict[str, Any], envelope: bytes) -> int:
        seq = await self.publisher.publish(subject_for(d["target"]), envelope, d["id"])
        await self._db(self.store.mark_published, d["id"], seq)
        return seq

    async def _failed(self, d: dict[str, Any], e: PublishError) -> None:
        """A publish failed: pending (retried by `run`), or failed for good, recorded."""
        self.publish_failures += 1
        self.last_publish_error = str(e)
        if not getattr(e, "permanent", False):
            log.warning("decision left pending: %s", e)
            return
        await self._db(self.store.mark_failed, d["id"])
        await self._refuse(f"decision {d['id']} cannot be published: {e}", d["target"], "", "",
                           "", "publish", self.clock())
        log.error("decision %s for %s failed for good: %s", d["id"], d["target"], e)

    def _connect_failed(self, e: PublishError) -> None:
        self.publish_failures += 1
        self.last_publish_error = str(e)
        log.warning("nats-server not reachable; decisions stay pending: %s", e)

    async def _after_reset(self) -> bool:
        """When the publisher (re)created the stream since the last look: publish every
        target's current decision again, oldest first (a new stream is empty; agents load
        its snapshot and would lift what it lacks). Under the decision lock. False when
        a publish failed (the next call tries again)."""
        resets = getattr(self.publisher, "stream_resets", 0)
        if resets == self._resets_done:
            return True
        now = self.clock()
        rows = await self._db(self.store.current_decisions, now, envelopes=True)
        sent = 0
        for row in rows:
            if row["state"] != "published":
                continue                   # pending ones: republish_pending sends them
            envelope = row.pop("envelope")
            try:
                await self._send(row, envelope)
            except PublishError as e:
                if getattr(e, "permanent", False):
                    log.error("decision %s not republished: %s", row["id"], e)
                    continue
                self._connect_failed(e)
                return False
            sent += 1
        self._resets_done = resets
        log.warning("stream %s was (re)created: republished %d current decisions",
                    "SWARM_DECISIONS", sent)
        return True

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
                    await self._failed(d, e)
                    if getattr(e, "permanent", False):
                        continue            # marked failed: the others go on
                    return i, len(pending) - i
            if not await self._after_reset():
                return len(pending), 1
            return len(pending), 0

    async def run(self, stop: asyncio.Event, tick_s: float = 1.0) -> None:
        """Until `stop`: connect (creating the stream), republish pending decisions (backoff
        1 s doubling to 30 s while nats-server fails) and promote due canaries, every tick_s;
        every SWEEP_EVERY_S, supersede future-dated decisions and sweep undecided proposals
        (mesh/periodic.py)."""
        backoff, next_try = 0.0, 0.0
        next_sweep = time.monotonic() + SWEEP_EVERY_S    # the start-up sweep runs beside
        while not stop.is_set():
            mono = time.monotonic()
            if mono >= next_sweep:
                next_sweep = mono + SWEEP_EVERY_S
                await self._sweep_round()
            if mono >= next_try:
                try:
                    # connected and the stream in place before any decision: agents
                    # subscribe to a stream that exists from the service's first start
                    connect = getattr(self.publisher, "connect", None)
                    if connect is not None:
                        await connect()
                except PublishError as e:
                    self._connect_failed(e)
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


def _own_networks(label: str, host: str | None) -> list[tuple[str, ipaddress.IPv4Network |
                                                              ipaddress.IPv6Network]]:
    """(label, /32 or /128) for each address of `host` (an address, or a name resolved
    now); nothing for an unspecified or absent host. A name that does not resolve is
    logged: the allowlist then lacks it, the configured infrastructure list still holds."""
    host = (host or "").strip("[]")
    if not host:
        return []
    try:
        addrs = {ipaddress.ip_address(host)}
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError) as e:
            log.warning("cannot resolve %s (%s) to allowlist it: %s", host, label, e)
            return []
        addrs = {ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos}
    return [(label, ipaddress.ip_network(a)) for a in sorted(addrs, key=str)
            if not a.is_unspecified]
