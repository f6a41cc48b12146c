"""FleetSubscriber's connection attempts: one bounded try per server, so that the
subscriber's own jittered backoff (fleet.reconnect_initial_s .. reconnect_max_s) paces
reconnects. nats-py's connect() retries an unreachable server by itself every 2 s for
~2 minutes even with allow_reconnect=False (bench/fleet_scale.py found a partitioned node
retrying every 2 s, in step with every other node, its backoff never used)."""
from __future__ import annotations

import asyncio
import socket
import time

import pytest

from agent import config as C
from agent.fleet.decision import generate_key
from agent.fleet.subscriber import FleetSubscriber


def _subscriber(tmp_path, port: int, **fleet) -> FleetSubscriber:
    generate_key(tmp_path / "k.pem", tmp_path / "k.pub")
    cfg = C.validate(C.Config(state_dir=str(tmp_path), fleet=C.FleetConfig(
        nats_url=f"nats://127.0.0.1:{port}", keys=(str(tmp_path / "k.pub"),), **fleet)))
    return FleetSubscriber(cfg, None, None, "node-1", lambda: [])  # type: ignore[arg-type]


def test_an_unreachable_server_fails_the_connect_at_once(tmp_path):
    with socket.socket() as closed:         # bound, not listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        sub = _subscriber(tmp_path, closed.getsockname()[1])
        t = time.monotonic()
        with pytest.raises(ConnectionError, match="refused|failed"):
            asyncio.run(asyncio.wait_for(sub._connect(), 30))
        assert time.monotonic() - t < 5


def test_failed_connects_go_through_the_backoff_and_are_counted(tmp_path):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        sub = _subscriber(tmp_path, closed.getsockname()[1], reconnect_initial_s=0.05,
                          reconnect_max_s=0.1)

        async def briefly() -> None:
            task = asyncio.create_task(sub.run())
            await asyncio.sleep(1.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        asyncio.run(briefly())
    assert sub.failures >= 5, sub.failures
    assert not sub.connected
    assert "refused" in sub.last_error or "failed" in sub.last_error, sub.last_error
