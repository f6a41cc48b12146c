"""Reading the decision stream in bounded pieces, for the FleetSubscriber: a live batch,
the anti-entropy read of every subject's latest message, and small helpers. Nothing here
keeps more than a chunk (CHUNK_MAX messages, CHUNK_MAX_BYTES) of what a server sends."""
from __future__ import annotations

import asyncio
import ctypes
import random
import time
from typing import Any, Awaitable, Callable

from agent.fleet.apply import Message

SNAPSHOT_IDLE_S = 2.0       # a snapshot (or read) ends when the stream is quiet this long...
SNAPSHOT_MAX_S = 120.0      # ... or after this long whatever
CATCH_UP_WAIT_S = 0.2       # while catching up, wait this long for more to batch
CHUNK_MAX = 10_000          # a snapshot is applied in chunks of this many messages...
CHUNK_MAX_BYTES = 4 << 20   # ... or bytes at most (a live batch: 4x that), so what a
                            # server sends never accumulates in memory


async def next_batch(sub: Any, last_seq: int, batch_max: int) -> list[Message]:
    """What arrives within a second, and while catching up (below `last_seq`) or more
    is pending, up to batch_max messages or 4 x CHUNK_MAX_BYTES."""
    batch: list[Message] = []
    try:
        m = await sub.next_msg(timeout=1.0)
        batch.append(Message(m.metadata.sequence.stream, m.subject, m.data))
        size = len(m.data or b"")
        while len(batch) < batch_max and size < 4 * CHUNK_MAX_BYTES:
            catching_up = batch[-1].seq < last_seq
            if sub.pending_msgs == 0 and not catching_up:
                break
            try:
                m = await sub.next_msg(timeout=CATCH_UP_WAIT_S if catching_up else 0.001)
            except (asyncio.TimeoutError, TimeoutError):
                break
            batch.append(Message(m.metadata.sequence.stream, m.subject, m.data))
            size += len(m.data or b"")
    except (asyncio.TimeoutError, TimeoutError):
        pass
    return batch


async def read_latest(sub: Any, last_seq: int, held: set[int], cursor: Callable[[], int],
                      apply: Callable[[list[Message]], Awaitable[int]]) -> tuple[int, int]:
    """(messages read, decisions applied) of one anti-entropy read (FleetSubscriber._audit):
    the messages at or below `cursor()` whose sequence is not in `held`, given to `apply`
    (which returns how many it applied) in chunks; up to `last_seq`, nothing pending, a
    quiet SNAPSHOT_IDLE_S or SNAPSHOT_MAX_S in all."""
    chunk: list[Message] = []
    size = read = applied = 0
    deadline = time.monotonic() + SNAPSHOT_MAX_S
    while time.monotonic() < deadline:
        try:
            m = await sub.next_msg(timeout=SNAPSHOT_IDLE_S)
        except (asyncio.TimeoutError, TimeoutError):
            break
        seq, read = m.metadata.sequence.stream, read + 1
        if seq <= cursor() and seq not in held:
            chunk.append(Message(seq, m.subject, m.data))
            size += len(m.data or b"")
        done = seq >= last_seq or nothing_pending(m)
        if chunk and (done or len(chunk) >= CHUNK_MAX or size >= CHUNK_MAX_BYTES):
            applied += await apply(chunk)
            chunk, size = [], 0
        if done:
            break
    if chunk:
        applied += await apply(chunk)
    return read, applied


def trim() -> None:
    """glibc's malloc_trim(0): a 100,000-decision snapshot's messages and nft batch are
    freed after it, but glibc keeps the pages; elsewhere (musl) a no-op."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def jittered(period_s: float) -> float:
    """A period spread over [0.5, 1.5) of itself, so a fleet's agents do not go in step."""
    return period_s * (0.5 + random.random())


def nothing_pending(m: Any) -> bool:
    """Whether the server said no message of the stream follows this one for its
    consumer (JetStream metadata num_pending); False when it did not say."""
    try:
        return int(m.metadata.num_pending) == 0
    except (AttributeError, TypeError, ValueError):
        return False


def created_of(info: Any) -> str:
    created = getattr(info, "created", None)
    return created.isoformat() if hasattr(created, "isoformat") else str(created or "")
