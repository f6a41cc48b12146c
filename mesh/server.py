"""The mesh reporting API: a grpc.aio MeshReporting server with mutual TLS.

Every call is from a node whose client certificate chains to the configured CA; the node
is the certificate's CN, its provider its O (mesh/identity.py), never what a report's
node_id claims. A batch is stored in one transaction (Store.record_reports, in a thread)
and the reply lists the ids processed, now or before; a store failure answers UNAVAILABLE
so the agent keeps the batch and retries. Proposals new in a batch are handed, after the
batch is stored, to `on_proposal(dict)` one at a time in arrival order by one task (the
decider plugs in there); a slow decider never delays a node's acknowledgement. One node
holds at most 1/NODE_SHARE of the queue, so a node's flood cannot crowd out the others'
proposals. The proposals are in the store whatever happens to that queue; those not queued
are decided by the decider's periodic sweep.

A revoked node's certificate (`swarm-mesh node-revoke`) is refused on every call with
PERMISSION_DENIED (mesh/gate.py, and again inside the batch's transaction), counted in
`revoked_calls` and logged once per certificate; a certificate that names no node (the
mesh's own server certificate, say: mesh/identity.py) is refused UNAUTHENTICATED on every
call, counted in `refused_calls`.

Health (grpc.health.v1) and reflection are served beside it; a pruning task forgets
processed report ids after cfg.report_ids_keep_s, proposals after cfg.proposals_keep_s and
refusals after cfg.refusals_keep_s (an hourly pass of bounded transactions).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

import grpc

from agent.control import health, reflection
from agent.proto.swarm.mesh.v1 import mesh_pb2, mesh_pb2_grpc
from mesh import identity, revocation
from mesh.config import MeshConfig
from mesh.gate import RevocationGate
from mesh.store import PRUNE_BATCH, Store, StoreError

log = logging.getLogger("swarm_mesh")

SERVICE_NAME = mesh_pb2.DESCRIPTOR.services_by_name["MeshReporting"].full_name
PROPOSAL_QUEUE_MAX = 10_000
NODE_SHARE = 64             # one node holds at most 1/64 of the queue (156 proposals)
PRUNE_EVERY_S = 3600.0
PRUNE_ROUNDS_MAX = 200      # bounded transactions per pruning pass; the rest waits an hour
STOP_GRACE_S = 5.0

OnProposal = Callable[[dict[str, Any]], Awaitable[None]]


class ReportingService(mesh_pb2_grpc.MeshReportingServicer):
    """The MeshReporting servicer. `counters` (reports, batches, duplicates, mismatched,
    rejected, unknown, skipped, refused_calls, revoked_calls, store_errors, proposals,
    proposals_dropped (queue full), proposals_deferred (the node's share of the queue
    full)) are for logs, metrics and tests."""

    def __init__(self, store: Store, on_proposal: OnProposal | None = None):
        self.store = store
        self.on_proposal = on_proposal
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(PROPOSAL_QUEUE_MAX)
        # per-node fairness: one node's flood takes at most this many queue slots
        self.per_node_max = max(1, PROPOSAL_QUEUE_MAX // NODE_SHARE)
        self.queued: dict[str, int] = {}              # node -> its proposals in the queue
        self.counters = dict.fromkeys(
            ("reports", "batches", "duplicates", "mismatched", "rejected", "unknown", "skipped",
             "refused_calls", "revoked_calls", "store_errors", "proposals",
             "proposals_dropped", "proposals_deferred"), 0)
        self._said: set[tuple[str, ...]] = set()     # what was logged once
        self.gate: RevocationGate | None = None       # MeshServer sets it

    def _once(self, key: tuple[str, ...], msg: str, **extra: Any) -> None:
        if key not in self._said and len(self._said) < 10_000:
            self._said.add(key)
            log.warning(msg, extra=extra)

    def refused_revoked(self, who: identity.Identity, revoked_at: float) -> None:
        """A call from a revoked certificate was refused: counted, logged once."""
        self.counters["revoked_calls"] += 1
        self._once(("revoked", who.node, str(who.not_before)),
                   "call refused: the node's certificate is revoked", node=who.node,
                   provider=who.provider, not_before=revocation.iso(who.not_before),
                   revoked_at=revocation.iso(revoked_at))

    def refused_unidentified(self, error: identity.IdentityError, context) -> None:
        """A call whose certificate names no node was refused: counted, logged once."""
        self.counters["refused_calls"] += 1
        self._once(("identity", str(error)), "call refused: caller not identified",
                   peer=context.peer(), error=str(error))

    async def Report(self, request: mesh_pb2.ReportBatch, context) -> mesh_pb2.ReportAck:
        try:                 # the gate refused it already; this server may run without one
            who = identity.from_auth_context(context.auth_context())
        except identity.IdentityError as e:
            self.refused_unidentified(e, context)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        if not who.provider:
            self._once(("no-provider", who.node), "node certificate names no provider (O)",
                       node=who.node)
        reports = list(request.reports)
        try:
            done = await asyncio.to_thread(self.store.record_reports, who.node, who.provider,
                                           reports, time.time(), who.not_before)
        except revocation.NodeRevoked as e:      # revoked since the gate's look
            self.refused_revoked(who, e.revoked_at)
            if self.gate is not None:
                self.gate.learn(who.node, e.revoked_at)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
        except StoreError as e:
            self.counters["store_errors"] += 1
            log.error("reports not stored; the node will send them again",
                      extra={"node": who.node, "reports": len(reports), "error": str(e)})
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the mesh store is unavailable")
        c = self.counters
        c["batches"] += 1
        c["reports"] += len(reports)
        for key in ("duplicates", "mismatched", "rejected", "unknown", "skipped"):
            c[key] += getattr(done, key)
        if done.mismatched:
            claimed = sorted({r.node_id for r in reports if r.node_id and r.node_id != who.node})
            self._once(("claim", who.node, *claimed), "reports claim another node; stored "
                       "under the certificate's node", node=who.node, claimed=claimed)
        if done.rejected or done.unknown or done.skipped:
            self._once(("odd", who.node), "reports kept raw or skipped", node=who.node,
                       rejected=done.rejected, unknown=done.unknown, skipped=done.skipped)
        for p in done.proposals:
            c["proposals"] += 1
            if self.on_proposal is not None:
                self._enqueue(p)
        return mesh_pb2.ReportAck(accepted=done.accepted)

    def _enqueue(self, p: dict[str, Any]) -> None:
        """Queue a stored proposal for the decider, unless its node already holds its
        share of the queue (deferred) or the queue is full (dropped): those stay in the
        store, and the decider's periodic sweep decides on them (Decider.run)."""
        node = p.get("node", "")
        if self.queued.get(node, 0) >= self.per_node_max:
            self.counters["proposals_deferred"] += 1
            self._once(("node-share", node), "a node's proposals fill its share of the "
                       "queue; the rest stay in the store for the periodic sweep", node=node,
                       limit=self.per_node_max)
            return
        try:
            self.queue.put_nowait(p)
        except asyncio.QueueFull:
            self.counters["proposals_dropped"] += 1
            self._once(("queue-full",), "proposal queue full; proposals stay in the store",
                       limit=PROPOSAL_QUEUE_MAX)
            return
        self.queued[node] = self.queued.get(node, 0) + 1

    async def deliver_proposals(self) -> None:
        """Hand queued proposals to on_proposal, one at a time, until cancelled."""
        assert self.on_proposal is not None
        while True:
            p = await self.queue.get()
            try:
                await self.on_proposal(p)
            except Exception:   # the decider's bug must not stop the next proposal
                log.exception("on_proposal failed", extra={"proposal_id": p.get("proposal_id"),
                                                           "node": p.get("node")})
            finally:
                node = p.get("node", "")
                left = self.queued.get(node, 1) - 1
                if left > 0:
                    self.queued[node] = left
                else:
                    self.queued.pop(node, None)
                self.queue.task_done()


class MeshServer:
    """The service's gRPC side. `await start()` binds cfg.listen (port 0: any; `port`
    says which) and starts the background tasks; `await stop()` stops them, lets calls in
    flight finish (STOP_GRACE_S), then hands the queued proposals to the decider (bounded
    by the same grace). The store is the caller's to close."""

    def __init__(self, cfg: MeshConfig, store: Store, on_proposal: OnProposal | None = None):
        self.cfg, self.store = cfg, store
        self.service = ReportingService(store, on_proposal)
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.ready = False
        self._tasks: list[asyncio.Task] = []

    @property
    def address(self) -> str:
        host = self.cfg.listen.rpartition(":")[0]
        return f"{host}:{self.port}"

    async def start(self) -> None:
        """Raises StartError with one sentence when the TLS files or the address fail."""
        cert, key, ca = self.cfg.tls_files()
        try:
            creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                                require_client_auth=True)
        except (RuntimeError, ValueError) as e:
            raise StartError(f"TLS files not usable: {e}") from None
        self.service.gate = RevocationGate(self.store, self.service.refused_revoked,
                                           on_unidentified=self.service.refused_unidentified)
        server = grpc.aio.server(interceptors=[self.service.gate], options=[
            ("grpc.max_receive_message_length", self.cfg.max_message_bytes),
            ("grpc.so_reuseport", 0),              # a second service must not share the port
            # Agents keep their channel alive with a ping every 30 s.
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ])
        mesh_pb2_grpc.add_MeshReportingServicer_to_server(self.service, server)
        health.add_to_server(health.HealthService(lambda: self.ready, [SERVICE_NAME]), server)
        reflection.add_to_server(server, [SERVICE_NAME, health.SERVICE_NAME])
        try:
            self.port = server.add_secure_port(self.cfg.listen, creds)
        except RuntimeError:
            self.port = 0
        if not self.port:
            raise StartError(f"cannot listen on {self.cfg.listen} (in use, or not an "
                             "address of this host)")
        await server.start()
        self.server = server
        if self.service.on_proposal is not None:
            self._tasks.append(asyncio.create_task(self.service.deliver_proposals()))
        self._tasks.append(asyncio.create_task(self._prune()))
        self.ready = True

    async def _prune(self) -> None:
        """Every PRUNE_EVERY_S: forget report ids, proposals and refusals past their
        retention, in short bounded transactions (reports keep flowing in between)."""
        while True:
            await self.prune_once()
            await asyncio.sleep(PRUNE_EVERY_S)

    async def prune_once(self) -> int:
        now, total = time.time(), 0
        cutoffs = (now - self.cfg.report_ids_keep_s, now - self.cfg.proposals_keep_s,
                   now - self.cfg.refusals_keep_s)
        try:
            for _ in range(PRUNE_ROUNDS_MAX):
                n = await asyncio.to_thread(self.store.prune_reports, *cutoffs)
                total += n
                if n < PRUNE_BATCH:
                    break
                await asyncio.sleep(0.1)
        except StoreError as e:
            log.warning("pruning old report ids, proposals and refusals failed",
                        extra={"error": str(e)})
        if total:
            log.info("forgot old report ids, proposals and refusals", extra={"pruned": total})
        return total

    async def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        self.ready = False
        if self.server is not None:
            await self.server.stop(grace_s)
            self.server = None
        if self.service.on_proposal is not None and self.service.queue.qsize():
            try:
                await asyncio.wait_for(self.service.queue.join(), grace_s)
            except TimeoutError:
                log.warning("stopped with proposals not yet decided; they are in the store",
                            extra={"queued": self.service.queue.qsize()})
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()


class StartError(RuntimeError):
    """The service cannot start; the message is one sentence."""
