"""NftMonitor: notifications of nftables changes in this network namespace.

A raw NETLINK_NETFILTER socket joined to multicast group NFNLGRP_NFTABLES receives a
message for every committed change (ours included). The agent does not parse them: any
message means "reconcile soon". Our own repairs notify too, but the reconcile they trigger
finds no drift and sends nothing, so the loop goes quiet after one round.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
from typing import Callable

from agent.enforce.base import EnforceError

NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
_NLMSGHDR = struct.Struct("=IHHII")

log = logging.getLogger(__name__)


class NftMonitor:
    """Non-blocking listener; open it inside the namespace to watch. fileno() is for
    loop.add_reader; drain() reads everything pending and says how many messages came."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self._sock.bind((0, 0))
            self._sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
            self._sock.setblocking(False)
        except OSError:
            self._sock.close()
            raise

    def fileno(self) -> int:
        return self._sock.fileno()

    def drain(self) -> int:
        """Read all pending messages; returns their number (an overrun counts as one)."""
        count = 0
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return count
            except OSError as e:
                # ENOBUFS: the kernel dropped notifications; something changed all the same.
                if e.errno != errno.ENOBUFS:
                    raise
                count += 1
                continue
            count += _count_messages(data)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "NftMonitor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _count_messages(data: bytes) -> int:
    count, offset = 0, 0
    while offset + _NLMSGHDR.size <= len(data):
        (length,) = struct.unpack_from("=I", data, offset)
        if length < _NLMSGHDR.size:
            break
        count += 1
        offset += (length + 3) & ~3
    return max(count, 1)


async def watch(monitor: NftMonitor, on_change: Callable[[], object], debounce_s: float = 0.05) -> None:
    """Call on_change() (synchronously) after each burst of nftables changes, until cancelled.

    A transaction arrives as several messages (and `nft flush ruleset` as many): waiting
    debounce_s after the first one lets a burst end so it costs one reconcile. An
    EnforceError from on_change is logged and the watch goes on; the next change retries."""
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()

    def readable() -> None:
        if monitor.drain():
            changed.set()

    loop.add_reader(monitor.fileno(), readable)
    try:
        while True:
            await changed.wait()
            await asyncio.sleep(debounce_s)
            changed.clear()
            monitor.drain()
            try:
                on_change()
            except EnforceError as e:
                log.error("repairing nftables drift failed: %s", e)
    finally:
        loop.remove_reader(monitor.fileno())
