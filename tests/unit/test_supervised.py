"""A reporter task that fails is logged and restarted, never allowed to end the agent's
TaskGroup (agent.report.reporting.supervised); cancellation still stops it."""
from __future__ import annotations

import asyncio
import sqlite3

import pytest

from agent.report import reporting


def test_a_failing_reporter_is_restarted(monkeypatch, caplog) -> None:
    monkeypatch.setattr(reporting, "RESTART_S", (0.01, 0.02))
    runs: list[int] = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise sqlite3.OperationalError("database or disk is full")

    asyncio.run(asyncio.wait_for(reporting.supervised("outbox cleanup", flaky), 5))
    assert len(runs) == 3
    assert sum("reporter failed; restarting it" in r.message for r in caplog.records) == 2


def test_cancellation_stops_it() -> None:
    async def forever() -> None:
        await asyncio.sleep(3600)

    async def main() -> None:
        task = asyncio.create_task(reporting.supervised("mesh reporter", forever))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
