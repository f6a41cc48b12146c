"""Which processes a process probe reports: one host, several agents (README, "Running
it"). An agent owns the processes of its own network namespace; the host agent (in the
initial namespace) also those of every namespace without a live agent of its own. Agents
register in probes.process_owners (agent.sources.owners); the host agent's kernel filter
(probes/proc.bpf.h owned()) skips the namespaces in its foreign_* maps, which it re-reads
every REFRESH_OWNERS_S and the kernel clears the moment an owner exits."""
from __future__ import annotations

import asyncio
import ctypes
import os

from agent.config import Config
from agent.sources.abi import ProcMap
from agent.sources.owners import Registry, initial_netns_inode, netns_inode

REFRESH_OWNERS_S = 1.0   # how often the host agent re-reads the other agents' registrations


class OwnedScope:
    """Mixin for ProcProbe (before BpfProbe in its bases): claims this namespace at open,
    keeps the host agent's foreign_* maps current while run() runs, releases at close."""

    def init_scope(self, cfg: Config) -> None:
        self.owners = Registry(cfg.probes.process_owners)
        self.netns, self.host_scope = 0, False

    def open(self) -> None:
        """Loads in, and owns the processes of, the calling thread's network namespace
        (agent.sources.owners); OwnerConflict when another live agent owns them."""
        self.netns, initial = netns_inode(), initial_netns_inode()
        self.host_scope = initial == self.netns
        self.owners.claim(self.netns, os.getpid())
        try:
            super().open()
        except BaseException:
            self.owners.release(self.netns, os.getpid())
            raise
        self._status["process_scope"] = {"state": "loaded", "reason": (
            "processes of this network namespace and of every one without its own agent"
            if self.host_scope else "processes of this network namespace" + (
                "" if initial else " (the host's initial namespace could not be identified)"))}

    def refresh_owners(self) -> None:
        """The host agent: leave the namespaces other live agents registered to them, and
        take back those whose agent is gone (the kernel also does that the moment an
        owner exits). run() calls this every REFRESH_OWNERS_S."""
        if not self.host_scope or self._obj is None:
            return
        live = {ino: o for ino, o in self.owners.live().items() if ino != self.netns}
        by_netns, by_pid = self._map(ProcMap.FOREIGN_NETNS), self._map(ProcMap.FOREIGN_AGENTS)
        u32 = ctypes.c_uint32
        value = lambda x: getattr(x, "value", x)   # batch reads give ints, others c_uint32
        for ino, pid in [(value(k), value(v)) for k, v in by_netns.items(u32, u32)]:
            if ino not in live:
                by_netns.delete(u32(ino))
                by_pid.delete(u32(pid))
        for ino, owner in live.items():
            by_netns.update(u32(ino), u32(owner.pid))
            by_pid.update(u32(owner.pid), u32(ino))
            if not owner.alive():     # exited before its entry was in: the kernel missed it
                by_netns.delete(u32(ino))
                by_pid.delete(u32(owner.pid))

    async def _run_scoped(self, emit) -> None:
        """BpfProbe.run; the host agent also re-reads the other agents' registrations."""
        if not self.host_scope:
            return await super().run(emit)

        async def refresh() -> None:
            scope = dict(self._status["process_scope"])
            while True:
                await asyncio.sleep(REFRESH_OWNERS_S)
                try:
                    self.refresh_owners()
                    self._status["process_scope"] = scope
                except (OSError, RuntimeError) as e:   # keeps the last registrations it read
                    self._status["process_scope"] = {
                        "state": "degraded", "reason": f"cannot read the other agents' registrations: {e}"}

        task = asyncio.create_task(refresh())
        try:
            await super().run(emit)
        finally:
            task.cancel()

    def close(self) -> None:
        super().close()
        if self.netns:
            self.owners.release(self.netns, os.getpid())
            self.netns = 0
