"""FleetSubscriber: the agent's side of fleet decisions, one task on its loop.

It reads stream SWARM_DECISIONS (subjects swarm.decisions.>) through an ordered
JetStream consumer that starts at the last applied stream sequence + 1 (the cursor, in
the agent's database). The stream keeps one message per subject (the latest decision per
target), so replaying from the cursor is the whole catch-up after any disconnect. When
the stream was reset (its last sequence is below the cursor, or its creation time is not
the one recorded) the agent loads the whole stream -- the snapshot. What the snapshot does
not name is NOT lifted on the server's word: a reset, an empty stream, "nothing pending"
are what a hostile or broken NATS server says, and it cannot sign anything. Blocks end by
a signed revoke (the mesh republishes every target's latest decision, revokes included,
into a recreated stream) or at their own bounded expiry in the kernel. Only a local cause
lifts by omission: a changed set of trusted keys (below). Each batch (one live message, a catch-up's worth, a chunk of a snapshot) is
verified and planned on a worker thread (agent.fleet.apply), recorded in ONE SQLite
transaction with its cursor, then put in force in ONE nftables transaction
(agent.enforce.fleet). Reconnects are jittered (agent.report.mesh.backoff_s); while the
mesh or NATS is away the kernel keeps enforcing what is in force until each element's
own timeout.

Refusals that may not last are not final. A decision refused as issued in the future
(this node's clock is behind: NTP broken) is remembered by its subject (in memory, at most
RETRY_MAX; after a restart, from the refusals table) and its subject's latest message is
fetched again (js.get_last_msg) at the start of each session and every RETRY_S, at most
RETRY_BATCH a round, only up to the cursor (the consumer brings the rest): applied once
the clock allows, dropped once applied or superseded, a repeat refusal not recorded
again. A decision signed by a key not trusted yet (the mesh rotated its key before the
agents) cannot pass without a restart that adds the key: the key ids the last complete
snapshot was verified with are recorded, and a start with a different set loads the
whole stream again as a snapshot, which ends by lifting the blocks only a removed key
signed (each entry records its key: agent.fleet.apply); a key only added lifts nothing.

What a server leaves out is fetched again: at each session start (unless a snapshot was
just read) and every AUDIT_S, jittered, the anti-entropy read (_audit) takes every
subject's latest message and applies, as ordinary decisions, those this agent does not
hold -- a revoke or block a relay withheld while the cursor moved on, a decision refused
as expired while the clock was ahead. Entries are forgotten only FORGET_AFTER_S (7 days)
after they run out, so a forward step of the wall clock lifts nothing for good. Nothing
a server sends accumulates: a snapshot or read is applied in chunks (CHUNK_MAX messages,
CHUNK_MAX_BYTES), a live batch is bounded in bytes too.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import time
from collections import Counter
from dataclasses import replace
from typing import Any, Callable, Sequence

from agent._vendor import nats
from agent._vendor.nats.js import errors as js_errors
from agent.config import Config, ConfigError
from agent.enforce.base import EnforceError
from agent.enforce.fleet import FleetEnforcer, Network
from agent.fleet import apply as fleetapply
from agent.fleet import connect as fleetconnect
from agent.fleet.apply import Checks, Entry, Message, Outcome, Refusal
from agent.fleet.config import server_networks
from agent.fleet.decision import STREAM, DecisionError, Verifier, load_public_key
from agent.fleet.reading import (CHUNK_MAX, CHUNK_MAX_BYTES, SNAPSHOT_IDLE_S, SNAPSHOT_MAX_S,
                                 created_of, jittered, next_batch, nothing_pending,
                                 read_latest, trim)
from agent.report.mesh import backoff_s
from agent.state import fleet as fleetdb
from agent.state.store import Store

log = logging.getLogger("swarm_agent")

STREAM_CHECK_S = 5.0        # how often the stream's state is read (reset, lag)
RECONCILE_S = 30.0          # how often the fleet table is compared with what should be
EXPIRE_S = 30.0             # how often run-out entries are forgotten
MAX_SERVER_ALLOW = 64       # NATS server addresses allowlisted at most (configured + met)
REFUSAL_LOG_S = 60.0        # one log line per refusal reason per minute
RETRIED = ("issued_in_future",)   # refusals whose subject is fetched again later
RETRY_S = 30.0              # how often they are
RETRY_MAX = 1000            # subjects remembered at most (the oldest go first)
RETRY_BATCH = 100           # fetched per round at most
AUDIT_S = 600.0             # every subject's latest is read again about this often


class StreamReset(Exception):
    """The stream is not the one the cursor belongs to: load a snapshot."""


def verifier_of(cfg: Config) -> Verifier:
    try:
        return Verifier([load_public_key(p) for p in cfg.fleet.keys])
    except DecisionError as e:
        raise ConfigError(f"fleet.keys: {e}") from None


class FleetSubscriber:
    """See the module docstring. `allow()` gives the allowlist in force now (loopback,
    host addresses, configured networks); `status()` is for status, heartbeat, metrics."""

    def __init__(self, cfg: Config, store: Store, enforcer: FleetEnforcer, node_id: str,
                 allow: Callable[[], Sequence[Network]], clock: Callable[[], float] = time.time,
                 servers: list[Network] | None = None):
        self.cfg, self.fc = cfg, cfg.fleet
        self.store, self.enforcer, self.node_id = store, enforcer, node_id
        self._allow_local, self._clock = allow, clock
        # The NATS servers the decisions (and their revocations) come from: allowlisted in
        # the fleet's checks and its table whatever allowlist.mesh says, so no decision
        # can cut the node off from the channel that would lift it. `servers`, when given,
        # is resolved already and shared with the agent's own table (agent.daemon), which
        # then learns the addresses met on connecting too.
        self.server_allow: list[Network] = servers if servers is not None else []
        self._resolve = servers is None
        self.verifier = verifier_of(cfg)
        self.entries: dict[str, Entry] = {}
        self.cursor, self.stream_created = 0, ""
        self.stream_last_seq = 0
        self.connected = False
        self.server = ""
        self.failures = 0
        self.last_error = ""
        self.refused: Counter[str] = Counter()
        self.applied = 0
        self.snapshots = 0
        self.snapshots_incomplete = 0
        self.retry: dict[str, None] = {}      # subjects to fetch again (an ordered set)
        self._keys_changed = False
        self._keys_before: list[str] | None = None
        self.last_batch: dict[str, float] = {}
        self._logged: dict[str, float] = {}
        self._lock = asyncio.Lock()

    # -- start-up (sync, before the agent is ready) ---------------------------------------

    def start(self) -> None:
        """Load what the database holds and make the fleet table hold exactly that."""
        now = self._clock()
        unresolved: list[str] = []
        if self._resolve:
            self.server_allow[:], unresolved = server_networks(self.fc.server_hosts())
        if unresolved:
            log.warning("fleet servers not resolved at start: allowlisted when connected",
                        extra={"names": unresolved})
        self.entries = fleetdb.entries(self.store)
        self.cursor, self.stream_created = fleetdb.cursor(self.store)
        self._keys_before = fleetdb.trusted_keys(self.store)
        self._keys_changed = self._keys_before != sorted(self.verifier.keys)
        for subject in reversed(fleetdb.refused_subjects(self.store, RETRIED,
                                                         now - self.fc.max_lifetime_s, RETRY_MAX)):
            self._remember(subject)
        self.enforcer.setup(self.blocks(now), self._allow(), now)
        self._record_rejected()

    def _allow(self) -> list[Network]:
        """The allowlist every decision is checked against and the fleet table accepts
        first: the agent's (loopback, host addresses, configured) and the NATS servers."""
        return [*self._allow_local(), *self.server_allow]

    def _allow_server(self, nc: Any) -> bool:
        """Add the address this connection reached (a name resolved differently now, a
        server of the cluster learnt from the one configured); True when it is new."""
        try:
            peer = nc._transport._io_writer.get_extra_info("peername")[0]
            net = ipaddress.ip_network(str(peer).split("%", 1)[0])
        except (AttributeError, TypeError, IndexError, ValueError):
            return False
        if net in self.server_allow or len(self.server_allow) >= MAX_SERVER_ALLOW:
            return False
        self.server_allow.append(net)
        log.info("fleet server allowlisted", extra={"address": str(net)})
        return True

    def blocks(self, now: float) -> dict[str, float]:
        return {t: e.expires_at for t, e in self.entries.items()
                if e.blocking and e.expires_at > now}

    def status(self) -> dict[str, Any]:
        now = self._clock()
        return {"enabled": True, "connected": self.connected, "server": self.server,
                "seq": self.cursor, "stream_last_seq": self.stream_last_seq,
                "lag": max(0, self.stream_last_seq - self.cursor),
                "in_force": len(self.blocks(now)), "refused": dict(self.refused),
                "applied": self.applied, "snapshots": self.snapshots,
                "snapshots_incomplete": self.snapshots_incomplete,
                "last_error": self.last_error, "last_batch": dict(self.last_batch),
                "dry_run": self.enforcer.dry_run}

    # -- the task -------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as e:   # noqa: BLE001 -- any failure: reconnect, jittered
                self._lost(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
            self.failures += 1
            await asyncio.sleep(backoff_s(self.failures, self.fc.reconnect_initial_s,
                                          self.fc.reconnect_max_s, random.random()))

    def _lost(self, why: str) -> None:
        if self.connected or self.last_error != why:
            log.warning("fleet stream unavailable; decisions in force stay enforced",
                        extra={"error": why, "servers": self.fc.servers, "cursor": self.cursor})
        self.connected, self.last_error = False, why

    async def _connect(self) -> Any:
        """A connection to one of the servers (agent/fleet/connect.py), or ConnectionError."""
        return await fleetconnect.connect(self.fc, self.node_id)

    async def _session(self) -> None:
        nc = await self._connect()
        try:
            js = nc.jetstream()
            info = await js.stream_info(STREAM)
            created = created_of(info)
            self.stream_last_seq = info.state.last_seq
            reset = self.cursor == 0 or (self.stream_created and created != self.stream_created) \
                or info.state.last_seq < self.cursor or self._keys_changed
            self.connected, self.server = True, str(nc.connected_url.netloc if nc.connected_url else "")
            if self.failures or self.last_error:
                log.info("fleet stream reachable", extra={"server": self.server,
                                                          "after_failures": self.failures})
            self.failures, self.last_error = 0, ""
            if self._allow_server(nc):
                await self.reconcile()      # the fleet table accepts it from now on
            if reset:
                sub = await fleetconnect.subscribe(js, None)
                await self._snapshot(sub, info.state.last_seq, created, info.state.messages)
            else:
                sub = await fleetconnect.subscribe(js, self.cursor + 1)
            await self._follow(js, nc, sub, created, info.state.last_seq, audit_now=not reset)
        finally:
            self.connected = False
            try:
                await asyncio.wait_for(nc.close(), 2)
            except Exception:   # noqa: BLE001 -- a dead connection closes as it can
                pass

    async def _snapshot(self, sub: Any, last_seq: int, created: str, messages: int = -1) -> None:
        """Read the whole stream (up to its last sequence at connect) and apply it, in
        chunks (CHUNK_MAX messages or CHUNK_MAX_BYTES: a hostile server streaming junk
        costs a chunk of memory, not what it sends), each with the cursor it reaches and
        lifting nothing. After a change of the trusted keys a complete read ends by lifting
        what only a key no longer trusted signed (agent.fleet.apply); otherwise nothing is
        lifted by omission. One that ends early (SNAPSHOT_IDLE_S without a message,
        SNAPSHOT_MAX_S in all) leaves the cursor at the last message read, so the consumer
        goes on from there. `messages`: how many the stream held at connect (0: empty, the
        snapshot is complete unread)."""
        chunk: list[Message] = []
        size = count = seq = 0
        rebase = True               # the first chunk's cursor replaces the old stream's
        applying: asyncio.Task[Outcome] | None = None   # a chunk applied while the next
        deadline = time.monotonic() + SNAPSHOT_MAX_S    # is read (two in memory at most)
        complete = messages == 0 or last_seq == 0
        while not complete and time.monotonic() < deadline:
            try:
                m = await sub.next_msg(timeout=SNAPSHOT_IDLE_S)
            except (asyncio.TimeoutError, TimeoutError):
                break
            seq = m.metadata.sequence.stream
            chunk.append(Message(seq, m.subject, m.data))
            size, count = size + len(m.data or b""), count + 1
            # the last sequence may be gone since (deleted, aged out): nothing pending
            # after this one says the read is whole as surely as reaching it
            complete = seq >= last_seq or nothing_pending(m)
            if not complete and (len(chunk) >= CHUNK_MAX or size >= CHUNK_MAX_BYTES):
                if applying is not None:
                    await applying
                applying = asyncio.create_task(self.apply(chunk, created=created, cursor=seq,
                                                          rebase=rebase))
                chunk, size, rebase = [], 0, False
        if applying is not None:
            await applying
            del applying
        # lift by omission only when this agent itself asked for the reload (its trusted
        # keys changed), never because the server says the stream was reset or is whole
        await self.apply(chunk, snapshot=complete and self._keys_changed, created=created,
                         cursor=max(seq, last_seq) if complete else seq, rebase=rebase)
        del chunk
        trim()                 # hand the snapshot's transient memory back to the system
        if complete:
            keys = sorted(self.verifier.keys)
            await asyncio.to_thread(fleetdb.set_trusted_keys, self.store, keys)
            self._keys_changed, self._keys_before = False, keys
            self.snapshots += 1
            log.info("fleet snapshot loaded", extra={"messages": count, "seq": self.cursor,
                                                     "in_force": len(self.blocks(self._clock()))})
        else:
            self.snapshots_incomplete += 1
            log.warning("fleet snapshot ended early: nothing lifted, reading on from its "
                        "last message", extra={"messages": count, "seq": self.cursor,
                                               "stream_last_seq": last_seq})

    async def _follow(self, js: Any, nc: Any, sub: Any, created: str, last_seq: int,
                      audit_now: bool = True) -> None:
        """Apply what arrives, batched; every STREAM_CHECK_S look at the stream (a reset
        ends the session: the next one loads the snapshot), run out entries, reconcile;
        at the start (unless a snapshot was just read) and every AUDIT_S, jittered, the
        anti-entropy read (_audit) runs beside it."""
        checked = reconciled = expired = time.monotonic()
        retried = -RETRY_S          # the first round at once: the clock may be right now
        audit_at = checked if audit_now else checked + jittered(AUDIT_S)
        audit: asyncio.Task[None] | None = None
        try:
            while True:
                if not nc.is_connected:
                    raise ConnectionError("connection to NATS lost")
                batch = await next_batch(sub, last_seq, self.fc.batch_max)
                if batch:
                    await self.apply(batch, created=created)
                now = time.monotonic()
                if now - checked >= STREAM_CHECK_S:
                    checked = now
                    info = await asyncio.wait_for(js.stream_info(STREAM), 3)
                    self.stream_last_seq = info.state.last_seq
                    if created_of(info) != created or info.state.last_seq < self.cursor:
                        raise StreamReset("the decision stream was reset: loading its snapshot")
                if now >= audit_at and (audit is None or audit.done()):
                    audit_at = now + jittered(AUDIT_S)
                    audit = asyncio.create_task(self._audit(js))
                if self.retry and now - retried >= RETRY_S:
                    retried = now
                    await self._retry(js)
                if now - expired >= EXPIRE_S:
                    expired = now
                    await self.forget_expired()
                if now - reconciled >= RECONCILE_S:
                    reconciled = now
                    await self.reconcile()
        finally:
            if audit is not None:
                audit.cancel()
                await asyncio.gather(audit, return_exceptions=True)

    async def _audit(self, js: Any) -> None:
        """Anti-entropy: read every subject's latest message (DeliverPolicy
        LAST_PER_SUBJECT) and apply, as ordinary decisions, those at or below the cursor
        that this agent does not hold (the consumer brings the rest). A message a server
        once left out (a revoke, a block), or one refused while the clock was wrong, is
        applied so. It lifts nothing by omission; a message whose sequence an entry holds
        is not verified again, so 100,000 decisions cost their receipt. Bounded: chunks
        of CHUNK_MAX or CHUNK_MAX_BYTES, SNAPSHOT_MAX_S in all. A failure is logged: the
        next round comes."""
        try:
            sub = await asyncio.wait_for(fleetconnect.subscribe_latest(js), 5)
            try:
                held = {e.seq for e in self.entries.values()}
                read, applied = await read_latest(sub, self.stream_last_seq, held,
                                                  lambda: self.cursor, self._apply_again)
            finally:
                try:
                    await sub.unsubscribe()
                except Exception:   # noqa: BLE001 -- the consumer goes with its session
                    pass
        except asyncio.CancelledError:
            raise
        except Exception as e:      # noqa: BLE001 -- any failure: the next round
            log.warning("fleet anti-entropy read failed", extra={"error": f"{type(e).__name__}: {e}"})
            return
        if applied:
            log.info("fleet anti-entropy read applied decisions not held",
                     extra={"read": read, "applied": applied, "seq": self.cursor})

    async def _apply_again(self, msgs: list[Message]) -> int:
        return (await self.apply(msgs, again=True)).applied

    # -- applying -------------------------------------------------------------------------

    async def apply(self, msgs: list[Message], *, snapshot: bool = False, created: str = "",
                    cursor: int = 0, rebase: bool = False, again: bool = False) -> Outcome:
        """Verify, plan, record and enforce one batch (the heavy parts on a thread).
        `rebase`: a new stream's first batch, whose `cursor` replaces the old stream's.
        `again`: messages fetched again; their repeated RETRIED refusals are not recorded."""
        async with self._lock:
            return await asyncio.to_thread(self._apply, msgs, snapshot, created or self.stream_created,
                                           cursor if rebase else max(cursor, self.cursor), again)

    async def _retry(self, js: Any) -> None:
        """Fetch again the latest decision of subjects refused for a passing reason (the
        module docstring) and apply what is already behind the cursor."""
        subjects = list(self.retry)[:RETRY_BATCH]
        msgs: list[Message] = []
        for subject in subjects:
            try:
                m = await asyncio.wait_for(js.get_last_msg(STREAM, subject), 3)
            except js_errors.NotFoundError:
                m = None                    # gone (purged, aged out): nothing to apply
            except (nats.errors.Error, asyncio.TimeoutError, TimeoutError) as e:
                log.warning("fleet decisions refused earlier not fetched again",
                            extra={"error": f"{type(e).__name__}: {e}", "pending": len(self.retry)})
                return                      # kept for the next round
            if m is not None and m.seq is not None and m.seq <= self.cursor:
                msgs.append(Message(int(m.seq), m.subject or subject, m.data or b""))
        for subject in subjects:            # refused again: remembered again, at the end
            self.retry.pop(subject, None)
        if msgs:
            await self.apply(msgs, again=True)

    def _remember(self, subject: str) -> None:
        self.retry.pop(subject, None)
        self.retry[subject] = None
        while len(self.retry) > RETRY_MAX:
            self.retry.pop(next(iter(self.retry)))

    def _apply(self, msgs: list[Message], snapshot: bool, created: str, cursor: int,
               again: bool = False) -> Outcome:
        t0 = time.monotonic()
        now = self._clock()
        checks = Checks(self.verifier, self.node_id, list(self._allow()),
                        {4: self.fc.max_prefix_v4, 6: self.fc.max_prefix_v6},
                        self.fc.max_lifetime_s)
        outcome = fleetapply.plan(self.entries, msgs, checks, now, snapshot=snapshot,
                                  cursor=cursor, keys_before=self._keys_before)
        for r in outcome.refusals:
            if r.reason in RETRIED and r.subject:
                self._remember(r.subject)
        recorded = outcome
        if again:                           # refused again for the same passing reason
            recorded = replace(outcome, refusals=[r for r in outcome.refusals
                                                  if r.reason not in RETRIED])
        t1 = time.monotonic()
        fleetdb.commit(self.store, recorded, created, now, self.fc.refusals_kept)
        t2 = time.monotonic()
        entries = {t: e for t, e in self.entries.items() if t not in outcome.removed}
        entries.update(outcome.upserts)
        self.entries = entries
        self.cursor, self.stream_created = outcome.cursor, created
        try:
            if snapshot:
                self.enforcer.change(self.blocks(now), now)
            else:               # only what this batch touched: O(batch), not O(in force)
                touched = set(outcome.upserts) | outcome.removed
                self.enforcer.update({t: (e.expires_at if (e := entries.get(t)) is not None
                                          and e.blocking and e.expires_at > now else None)
                                      for t in touched}, now)
        except EnforceError as e:     # recorded: the next reconcile puts it in force
            log.error("fleet decisions not put in force", extra={"error": str(e)})
        self._record_rejected()
        t3 = time.monotonic()
        self.applied += outcome.applied
        self.last_batch = {"messages": len(msgs), "verify_s": round(t1 - t0, 4),
                           "store_s": round(t2 - t1, 4), "nft_s": round(t3 - t2, 4)}
        self._count_refusals(recorded)
        return outcome

    def _record_rejected(self) -> None:
        """Targets the kernel would not take (the rest of their batch is in force): each a
        refusal "not_enforceable", recorded and counted; the entry stays, so a replay of
        the same decision is still stale."""
        rejected = self.enforcer.take_rejected()
        if not rejected:
            return
        refusals = [Refusal(e.seq if (e := self.entries.get(t)) is not None else 0, "", t,
                            "not_enforceable", why[:200]) for t, why in rejected]
        try:
            fleetdb.record_refusals(self.store, refusals, self._clock(), self.fc.refusals_kept)
        finally:
            self._count_refusals(Outcome(refusals=refusals))

    def _count_refusals(self, outcome: Outcome) -> None:
        now = time.monotonic()
        for r in outcome.refusals:
            self.refused[r.reason] += 1
            if now - self._logged.get(r.reason, -REFUSAL_LOG_S) >= REFUSAL_LOG_S:
                self._logged[r.reason] = now
                log.warning("fleet decision refused", extra={
                    "reason": r.reason, "detail": r.detail, "subject": r.subject,
                    "seq": r.seq, "refused_so_far": self.refused[r.reason]})

    async def forget_expired(self) -> None:
        async with self._lock:
            gone = fleetapply.expired(self.entries, self._clock())
            if gone:
                await asyncio.to_thread(fleetdb.forget, self.store, gone)
                self.entries = {t: e for t, e in self.entries.items() if t not in set(gone)}

    async def reconcile(self) -> None:
        async with self._lock:
            try:
                now = self._clock()     # what the entries want: a block the wall clock
                # passed by a forward step is back in force when the clock is right again
                if await asyncio.to_thread(self.enforcer.reconcile, list(self._allow()), now,
                                           self.blocks(now)):
                    log.warning("fleet table repaired", extra={"in_force": len(self.enforcer.blocks)})
            except EnforceError as e:
                log.error("fleet reconcile failed", extra={"error": str(e)})
            await asyncio.to_thread(self._record_rejected)
