"""The daemon's reader of the egress policy's drop counters (agent/enforce/egress.py).

Every `policy.egress_poll_s` it reads the counters of the egress chains and turns new
drops into `policy.egress_denied` events (rate-limited per scope by EgressMeter: the
first drops at once, then one event per REPORT_EVERY_S carrying the packets since). The
drop itself never waits for this: it happened in the kernel, before the packet left.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from agent.config import Config
from agent.enforce.base import EnforceError
from agent.enforce.egress import EgressMeter, Scope
from agent.model import Event

KIND = "policy.egress_denied"
REPORT_EVERY_S = 10.0    # per policy rule and scope, after its first report

log = logging.getLogger(__name__)


def event_of(scope: Scope, packets: int, total: int, first_mono_ns: int, mono_ns: int) -> Event:
    """The event for `packets` new drops of `scope`; the evidence began after the reading
    before (first_mono_ns): the counters say how many, not exactly when."""
    fields: dict[str, Any] = {"policy": scope.policy, "applies_to": scope.scope,
                              "packets": packets, "packets_total": total}
    how, _, what = scope.scope.partition(":")
    if how == "uplink":     # a macvlan/ipvlan workload, seen at a host link's egress
        fields["uplink"] = True
    else:
        fields["cgroup" if how == "cgroup" else "interface"] = what
    return Event(KIND, f"egress:{scope.policy}:{scope.scope}", mono_ns, first_mono_ns,
                 fields, source="nft.egress")


async def watch(cfg: Config, counts: Callable[[], dict[Scope, int]],
                emit: Callable[[Event], None], failed: Callable[[Exception], None],
                meter: EgressMeter | None = None) -> None:
    """Read `counts()` every poll and `emit` the events; a failed reading is passed to
    `failed` and the next one tried. `meter` keeps the totals (metrics read them)."""
    meter = meter if meter is not None else EgressMeter(REPORT_EVERY_S)
    last_ns = time.monotonic_ns()
    while True:
        await asyncio.sleep(cfg.policy.egress_poll_s)
        now_ns = time.monotonic_ns()
        try:
            current = counts()
        except EnforceError as e:
            failed(e)
            continue
        for scope, packets in meter.update(current, now_ns / 1e9):
            emit(event_of(scope, packets, meter.total.get(scope, packets), last_ns, now_ns))
        last_ns = now_ns
