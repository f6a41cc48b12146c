"""The reporting API's door for revoked nodes: every call, on every service (MeshReporting,
health, reflection), from a certificate that a node revocation covers is refused with
PERMISSION_DENIED before its handler runs (mesh/revocation.py says which certificates).

The check is per call, not per connection, so a channel a node opened before it was
revoked is cut at its next call; a streaming call (reflection, health's Watch) is checked
again before each message it reads or writes, so a stream opened before the revocation
ends at its next message. A certificate that names no node (mesh/identity.py: the mesh's
own server certificate among them) is refused UNAUTHENTICATED on every service.

The node's latest revocation time is read from the store at most once every CACHE_S per
node name (a message of a stream costs a dictionary look); Store.record_reports checks
again inside the transaction that would store a batch, so no report of a revoked
certificate is stored in that window either (and what it finds is learnt here). When the
store cannot be read the last known time is used, else the call goes on to its handler:
Report then fails on the store itself (UNAVAILABLE, the node keeps its batch), and health
and reflection say nothing a revoked node could use.
"""
from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any, Callable

import grpc

from mesh import identity, revocation
from mesh.store import StoreError

CACHE_S = 2.0
CACHE_MAX = 10_000


class RevocationGate(grpc.aio.ServerInterceptor):
    """`store.node_revoked_at(node)` is read through a small cache; `on_refused(who,
    revoked_at)` is told of each refused call (to count it and log it once), and
    `on_unidentified(error, context)` of each call refused for its certificate."""

    def __init__(self, store: Any, on_refused: Callable[[identity.Identity, float], None],
                 cache_s: float = CACHE_S, clock: Callable[[], float] = time.monotonic,
                 on_unidentified: Callable[[identity.IdentityError, Any], None] | None = None):
        self.store, self.on_refused, self.on_unidentified = store, on_refused, on_unidentified
        self.cache_s, self.clock = cache_s, clock
        self._cache: dict[str, tuple[float | None, float]] = {}

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        for name in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            inner = getattr(handler, name)
            if inner is not None:
                return handler._replace(**{name: self._guard(inner, name.startswith("stream"))})
        return handler

    def _guard(self, inner: Callable, streamed_requests: bool) -> Callable:
        """The handler behind the gate: checked when the call starts, and a streaming
        call again before each message it reads or writes (a stream opened before the
        revocation ends at its next message)."""
        if inspect.isasyncgenfunction(inner):
            async def streamed(request, context):
                who = await self.check(context)
                if streamed_requests:
                    request = self._each_checked(request, who, context)
                async for item in inner(request, context):
                    await self.recheck(who, context)
                    yield item
            return streamed

        async def called(request, context):
            who = await self.check(context)
            if streamed_requests:
                request = self._each_checked(request, who, context)
            result = inner(request, context)
            return await result if inspect.isawaitable(result) else result
        return called

    async def _each_checked(self, requests, who: identity.Identity, context):
        async for request in requests:
            await self.recheck(who, context)
            yield request

    async def check(self, context) -> identity.Identity:
        """The caller, unless its certificate names no node (UNAUTHENTICATED, with the
        reason: the mesh's own server certificate, say) or is revoked (PERMISSION_DENIED):
        then the call is aborted, on every service."""
        try:
            who = identity.from_auth_context(context.auth_context())
        except identity.IdentityError as e:
            if self.on_unidentified is not None:
                self.on_unidentified(e, context)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        await self.recheck(who, context)
        return who

    async def recheck(self, who: identity.Identity, context) -> None:
        """Aborts the call when `who`'s certificate is revoked (a cache look, mostly)."""
        revoked_at = await self.revoked_at(who.node)
        if revocation.covers(revoked_at, who.not_before):
            self.on_refused(who, revoked_at)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                revocation.refusal(who.node, revoked_at))

    def learn(self, node: str, revoked_at: float) -> None:
        """A revocation the store reported elsewhere (Report's own transaction): the
        node's next calls are refused here at once, whatever the cache held."""
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[node] = (revoked_at, self.clock())

    async def revoked_at(self, node: str) -> float | None:
        now = self.clock()
        hit = self._cache.get(node)
        if hit is not None and now - hit[1] < self.cache_s:
            return hit[0]
        try:
            value = await asyncio.to_thread(self.store.node_revoked_at, node)
        except StoreError:
            return hit[0] if hit is not None else None
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[node] = (value, now)
        return value
