"""Fan-out of the responder's changes to WatchIncidents streams.

The responder calls `on_change` (its observer hook) right after each change, normally on
the loop thread; each subscriber has a bounded queue. A subscriber that falls behind by
more than QUEUE_SIZE changes is dropped with RESOURCE_EXHAUSTED rather than slowing the
responder or growing memory; at most MAX_WATCHERS streams run at once.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any, AsyncIterator

import grpc

from agent.control import convert
from agent.model import Incident, Mitigation
from agent.proto.swarm.control.v1 import control_pb2 as pb

QUEUE_SIZE = 1000
MAX_WATCHERS = 16
_OVERFLOW = object()


class WatchHub:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        """Construct on the loop's own thread."""
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._queues: set[asyncio.Queue] = set()
        self.dropped = 0      # subscribers dropped for falling behind

    def on_change(self, kind: str, obj: Any) -> None:
        """The responder's observer: ("incident", Incident) or ("mitigation", Mitigation)."""
        if not self._queues:
            return
        if kind == "incident" and isinstance(obj, Incident):
            change = pb.Change(incident=convert.incident(obj))
        elif kind == "mitigation" and isinstance(obj, Mitigation):
            change = pb.Change(mitigation=convert.mitigation(obj))
        else:
            return
        if threading.get_ident() == self._loop_thread:
            self._offer(change)
        else:
            self._loop.call_soon_threadsafe(self._offer, change)

    def _offer(self, change: pb.Change) -> None:
        for q in list(self._queues):
            if q.full():
                continue
            if q.qsize() == QUEUE_SIZE - 1:
                q.put_nowait(_OVERFLOW)   # the last slot says "you fell behind"
            else:
                q.put_nowait(change)

    async def subscribe(self, context, initial: list[pb.Change]) -> AsyncIterator[pb.Change]:
        """Yield `initial`, then every change until the client goes away."""
        if len(self._queues) >= MAX_WATCHERS:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"too many watchers (at most {MAX_WATCHERS} at once)")
        q: asyncio.Queue = asyncio.Queue(QUEUE_SIZE)
        self._queues.add(q)   # before sending `initial`, so no change falls in between
        try:
            for change in initial:
                yield change
            while True:
                change = await q.get()
                if change is _OVERFLOW:
                    self.dropped += 1
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        f"watcher fell behind by {QUEUE_SIZE} changes; "
                                        "watch again")
                yield change
        finally:
            self._queues.discard(q)
