"""The bounded queue between the probes and the detector.

The ring buffers are drained on the loop into this queue and nothing else (decoding a
record is all the reader does), and a consumer task takes events out in budgeted
batches for the detector and responder. So reading the kernel never waits for a
finding to be recorded and enforced beyond one batch's budget, and a backlog costs
memory up to `capacity` events, never more.

Full: the event is dropped and counted by kind (`dropped`); nothing is dropped silently.
What an attacker does with a bounded queue is flood it with cheap events (short
processes are cheap for any tenant) so that the one that matters, a threshold crossing
or the exec of a shell, is the one thrown away. Two things keep one kind from starving
the others: a full queue drops from the kind that holds the most events (the incoming
event if it is that kind, else the oldest event of that kind makes room), and `take`
serves the kinds round robin, so a rare kind's event waits behind at most one event of
each other kind, never behind a flood's backlog. Within one kind nothing is ranked:
a flood of execs can still push out another exec, and the drop counter (status,
`swarm_agent_events_dropped`) is what tells the operator it happened.
"""
from __future__ import annotations

import asyncio
from collections import Counter, deque
from typing import Generic, Hashable, TypeVar

T = TypeVar("T")


class EventQueue(Generic[T]):
    """Bounded per-kind FIFO queues served round robin, with counted drops.

    `put(kind, item)` never blocks and returns False when `item` itself was dropped;
    `take(n)` returns up to n items, one kind at a time in turn; `wait()` returns once
    something is queued. Single-threaded: used on the loop's thread only."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._by_kind: dict[Hashable, deque[T]] = {}
        self._turn: deque[Hashable] = deque()      # kinds with queued items, in serving order
        self._size = 0
        self.depth_max = 0
        self.dropped: Counter[str] = Counter()     # kind -> items dropped because full
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return self._size

    def put(self, kind: Hashable, item: T) -> bool:
        if self._size >= self.capacity:
            largest = max(self._by_kind, key=lambda k: len(self._by_kind[k]))
            if largest == kind or len(self._by_kind[largest]) <= len(self._by_kind.get(kind, ())):
                self.dropped[str(kind)] += 1
                return False
            self._by_kind[largest].popleft()
            self.dropped[str(largest)] += 1
            self._size -= 1
            if not self._by_kind[largest]:
                self._forget(largest)
        q = self._by_kind.get(kind)
        if q is None:
            q = self._by_kind[kind] = deque()
            self._turn.append(kind)
        q.append(item)
        self._size += 1
        self.depth_max = max(self.depth_max, self._size)
        self._ready.set()
        return True

    def take(self, n: int) -> list[T]:
        """Up to `n` items, round robin over the kinds (each kind's own order kept)."""
        out: list[T] = []
        while self._size and len(out) < n:
            kind = self._turn[0]
            q = self._by_kind[kind]
            out.append(q.popleft())
            self._size -= 1
            if q:
                self._turn.rotate(-1)
            else:
                self._forget(kind)
        if not self._size:
            self._ready.clear()
        return out

    def _forget(self, kind: Hashable) -> None:
        del self._by_kind[kind]
        self._turn.remove(kind)

    async def wait(self) -> None:
        await self._ready.wait()

    def depth(self) -> dict[str, int]:
        """Queued items per kind (only kinds with some)."""
        return {str(k): len(q) for k, q in self._by_kind.items()}

    def status(self) -> dict:
        return {"depth": self._size, "depth_max": self.depth_max, "capacity": self.capacity,
                "dropped": dict(self.dropped)}
