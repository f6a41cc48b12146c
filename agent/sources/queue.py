"""The bounded queue between the probes and the detector.

The ring buffers are drained on the loop into this queue and nothing else (decoding a
record is all the reader does), and a consumer task takes events out in budgeted
batches for the detector and responder. So reading the kernel never waits for a
finding to be recorded and enforced beyond one batch's budget, and a backlog costs
memory up to the two lanes' capacities, never more. The reader is not bounded per
wakeup on purpose: the kernel ring buffer behind it cannot tell a reverse shell from a
storm, this queue can, so a backlog is better here than in the kernel.

Full: the event is dropped and counted by kind and lane (`dropped`); nothing is dropped
silently. What an attacker does with a bounded queue is flood it with cheap events
(short processes are cheap for any tenant) so that the one that matters -- the exec of
a reverse shell, a threshold crossing, another tenant's events -- is thrown away.
Three things stand against it:

- Two lanes. `urgent` events (the caller decides: agent.detect.triage, events that
  already match a high-severity rule, so a flood of them is a flood of real detections)
  go to their own bounded lane, which ordinary events never push out; it is served
  first, up to URGENT_BURST events for each ordinary one, so an endless stream of them
  slows the ordinary lane but never stops it.
- Owners. Within a lane, events are queued per (kind, owner) -- owner is what the caller
  names: the cgroup of a process event, none for network events -- and a full lane
  drops from the sub-queue that holds the most (the incoming event if its own sub-queue
  is that large, else the oldest event of the largest makes room). So one tenant's exec
  storm pushes out its own execs, never another tenant's or another kind's, as long as
  theirs are fewer. Finding the largest sub-queue is O(1) (sizes bucketed), so a storm
  spread over many cgroups costs no more per event.
- Round robin: `take` serves the sub-queues in turn, so a rare one waits behind at most
  one event of each other, never behind a flood's backlog.
"""
from __future__ import annotations

import asyncio
from collections import Counter, deque
from typing import Generic, Hashable, TypeVar

T = TypeVar("T")

URGENT_BURST = 8          # urgent events served for each ordinary one while both wait
URGENT_SHARE = 16         # the urgent lane holds capacity // URGENT_SHARE events,
URGENT_MIN = 64           # at least this many


class Lanes(Generic[T]):
    """Bounded FIFO sub-queues per (kind, owner), served round robin; a full lane drops
    from the largest sub-queue and counts the drop by kind."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._queues: dict[Hashable, deque[T]] = {}
        # Keys in serving order; a key emptied by a drop stays until its turn comes (or a
        # compaction), so no drop pays a search of the turn.
        self._turn: deque[Hashable] = deque()
        self._in_turn: set[Hashable] = set()
        self._by_size: dict[int, dict[Hashable, None]] = {}   # size -> keys of that size
        self._largest = 0
        self._size = 0
        self.depth_max = 0
        self.dropped: Counter[str] = Counter()         # kind -> items dropped because full

    def __len__(self) -> int:
        return self._size

    def put(self, kind: Hashable, owner: Hashable, item: T) -> bool:
        """Queue `item`; False when it was itself dropped."""
        key = (kind, owner)
        q = self._queues.get(key)
        if self._size >= self.capacity:
            if q is not None and len(q) >= self._largest:
                self.dropped[str(kind)] += 1
                return False
            victim = next(iter(self._by_size[self._largest]))
            self._pop(victim)
            self.dropped[str(victim[0])] += 1
        if q is None:
            q = self._queues[key] = deque()
            if key not in self._in_turn:
                self._turn.append(key)
                self._in_turn.add(key)
                if len(self._turn) > 2 * self.capacity + 16:
                    self._compact()
        q.append(item)
        self._resize(key, len(q) - 1, len(q))
        self._size += 1
        self.depth_max = max(self.depth_max, self._size)
        return True

    def take_one(self) -> T:
        """The next item in turn (the lane must not be empty)."""
        while self._turn[0] not in self._queues:      # emptied by drops
            self._in_turn.discard(self._turn.popleft())
        key = self._turn[0]
        item = self._pop(key)
        if key in self._queues:
            self._turn.rotate(-1)
        else:
            self._in_turn.discard(self._turn.popleft())
        return item

    def _pop(self, key: Hashable) -> T:
        q = self._queues[key]
        item = q.popleft()
        self._resize(key, len(q) + 1, len(q))
        self._size -= 1
        if not q:
            del self._queues[key]
        return item

    def _compact(self) -> None:
        """Forget the emptied keys in the turn (a storm over ever new owners); amortised
        O(1) per put, as the turn has grown past twice the capacity when it runs."""
        self._turn = deque(k for k in self._turn if k in self._queues)
        self._in_turn = set(self._turn)

    def _resize(self, key: Hashable, old: int, new: int) -> None:
        # Sizes move by one, so the largest moves by at most one too.
        if old:
            bucket = self._by_size[old]
            del bucket[key]
            if not bucket:
                del self._by_size[old]
                if old == self._largest and new < old:
                    self._largest = new
        if new:
            self._by_size.setdefault(new, {})[key] = None
            self._largest = max(self._largest, new)

    def depth(self) -> dict[str, int]:
        """Queued items per kind (only kinds with some)."""
        out: Counter[str] = Counter()
        for (kind, _), q in self._queues.items():
            out[str(kind)] += len(q)
        return dict(out)

    def status(self) -> dict:
        return {"depth": self._size, "depth_max": self.depth_max, "capacity": self.capacity,
                "dropped": dict(self.dropped)}


class EventQueue(Generic[T]):
    """An ordinary lane of `capacity` and an urgent lane beside it (see the module).

    `put(kind, item, owner=None, urgent=False)` never blocks and returns False when
    `item` itself was dropped; `take(n)` returns up to n items, urgent ones first (up to
    URGENT_BURST for each ordinary one); `wait()` returns once something is queued.
    Single-threaded: used on the loop's thread only."""

    def __init__(self, capacity: int, urgent_capacity: int | None = None):
        self.ordinary: Lanes[T] = Lanes(capacity)
        self.urgent: Lanes[T] = Lanes(urgent_capacity or max(URGENT_MIN,
                                                             capacity // URGENT_SHARE))
        self._burst = 0
        self._ready = asyncio.Event()

    @property
    def capacity(self) -> int:
        return self.ordinary.capacity

    @property
    def dropped(self) -> Counter[str]:
        """The ordinary lane's drops by kind (the urgent lane's: `urgent.dropped`)."""
        return self.ordinary.dropped

    @property
    def depth_max(self) -> int:
        return self.ordinary.depth_max

    def __len__(self) -> int:
        return len(self.ordinary) + len(self.urgent)

    def put(self, kind: Hashable, item: T, owner: Hashable = None, urgent: bool = False) -> bool:
        kept = (self.urgent if urgent else self.ordinary).put(kind, owner, item)
        if kept:
            self._ready.set()
        return kept

    def take(self, n: int) -> list[T]:
        out: list[T] = []
        while len(out) < n and len(self):
            if self.urgent and (self._burst < URGENT_BURST or not self.ordinary):
                self._burst += 1
                out.append(self.urgent.take_one())
            else:
                self._burst = 0
                out.append(self.ordinary.take_one())
        if not len(self):
            self._ready.clear()
        return out

    async def wait(self) -> None:
        await self._ready.wait()

    def depth(self) -> dict[str, int]:
        """Queued items per kind, both lanes (only kinds with some)."""
        out = Counter(self.ordinary.depth())
        out.update(self.urgent.depth())
        return dict(out)

    def status(self) -> dict:
        """The ordinary lane's figures at the top level, the urgent lane's under "urgent"."""
        return {**self.ordinary.status(), "urgent": self.urgent.status()}
