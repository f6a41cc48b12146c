"""The activity probe's polled maps (agent.sources.activity): bytes sent per (cgroup,
destination, port, protocol) and per-cgroup counters, turned into "flow.bytes" and
"activity.counts" events of what changed since the last poll, bounded per poll (the
largest first, the rest counted), and LRU maps found nearly full reported (an evicted
entry's counts since the last poll are lost)."""
from __future__ import annotations

import ctypes
import ipaddress

from agent.model import Event
from agent.sources import abi, libbpf
from agent.sources.abi import ActivityMap
from agent.sources.gpuproc import container_of

SOURCE = "activity"
PROTOS = {6: "tcp", 17: "udp"}
# activity.counts' fields: cgroup_activity's counters, then its dropped[] (enum activity_cap)
COUNTS = ("execs", "connects", "listens", "flows_dropped", "exec_new_dropped", "listens_dropped")
FULL = 0.9              # an LRU map this full evicts entries (status says so)


def address(raw, family: int) -> tuple[str, int]:
    """(text, 4|6) of a kernel address; an IPv4-mapped IPv6 address (a v6 socket talking
    to a v4 peer) is the IPv4 address: one destination, one name."""
    if family == 2:
        return str(ipaddress.IPv4Address(bytes(raw[:4]))), 4
    a = ipaddress.IPv6Address(bytes(raw[:16]))
    return (str(a.ipv4_mapped), 4) if a.ipv4_mapped else (str(a), 6)


class CounterPolls:
    """Mixin for ActivityProbe: needs _map(), sizes, cgroups, bytes_per_poll,
    counts_per_poll, dropped, full_polls and full_now (set by the probe)."""

    _polled_ns: int | None = None
    polls = 0

    def poll_counters(self, now_ns: int) -> list[Event]:
        """flow.bytes and activity.counts: what changed since the last call (the maps
        start empty at load: the first call reports everything since)."""
        if self._obj is None:
            return []
        window = 0 if self._polled_ns is None else now_ns - self._polled_ns
        self._polled_ns = now_ns
        self.polls += 1
        out = self._poll_bytes(now_ns, window)
        out += self._poll_counts(now_ns, window)
        return out

    def _poll_bytes(self, now_ns: int, window: int) -> list[Event]:
        cpus = libbpf.num_possible_cpus()
        seen, changed = {}, []
        for key, per_cpu in self._map(ActivityMap.FLOW_BYTES).items(
                abi.flow_bytes_key, abi.flow_bytes * cpus):
            k = bytes(key)
            total = (sum(v.bytes for v in per_cpu), sum(v.sends for v in per_cpu))
            seen[k] = total
            old = self._bytes_seen.get(k, (0, 0))
            if total[0] < old[0] or total[1] < old[1]:
                old = (0, 0)      # evicted and made again since: all of it is new
            if total[1] > old[1]:
                changed.append((total[0] - old[0], total[1] - old[1],
                                abi.flow_bytes_key.from_buffer_copy(k)))
        self._bytes_seen = seen
        self._check_full(ActivityMap.FLOW_BYTES, len(seen))
        changed.sort(key=lambda c: c[0], reverse=True)
        self.dropped["flow.bytes"] += max(0, len(changed) - self.bytes_per_poll)
        out = []
        for nbytes, sends, key in changed[:self.bytes_per_poll]:
            daddr, fam = address(key.daddr, key.family)
            if not any(key.daddr):
                daddr = ""
            cgroup = self.cgroups.path(key.cgroup_id)
            out.append(Event("flow.bytes", daddr, now_ns, now_ns - window, {
                "cgroup_id": key.cgroup_id, "cgroup": cgroup,
                "container": container_of(cgroup) or "", "daddr": daddr, "dport": key.dport,
                "proto": PROTOS.get(key.proto, str(key.proto)), "family": fam,
                "bytes_out": nbytes, "sends": sends, "window_ns": window}, SOURCE))
        return out

    def _poll_counts(self, now_ns: int, window: int) -> list[Event]:
        names = COUNTS
        seen, changed = {}, []
        for key, value in self._map(ActivityMap.CGROUPS).items(ctypes.c_uint64, abi.cgroup_activity):
            cgid = getattr(key, "value", key)
            total = (value.execs, value.connects, value.listens, *value.dropped)
            seen[cgid] = total
            old = self._counts_seen.get(cgid, (0,) * len(names))
            if any(t < o for t, o in zip(total, old)):
                old = (0,) * len(names)
            delta = tuple(t - o for t, o in zip(total, old))
            if any(delta):
                changed.append((delta, cgid))
                for name, n in zip(names[3:], delta[3:]):
                    self.dropped[name] += n
        self._counts_seen = seen
        self._check_full(ActivityMap.CGROUPS, len(seen))
        changed.sort(key=lambda c: c[0][0] + c[0][1], reverse=True)
        self.dropped["activity.counts"] += max(0, len(changed) - self.counts_per_poll)
        out = []
        for delta, cgid in changed[:self.counts_per_poll]:
            cgroup = self.cgroups.path(cgid)
            out.append(Event("activity.counts", f"cgroup:{cgroup or cgid}", now_ns, now_ns - window, {
                "cgroup_id": cgid, "cgroup": cgroup, "container": container_of(cgroup) or "",
                **dict(zip(names, delta)), "window_ns": window}, SOURCE))
        return out

    def _check_full(self, name: ActivityMap, entries: int) -> None:
        """An LRU map this full evicts: what an evicted entry counted since the last
        poll is lost. Counted per poll; status() is degraded while the last poll found
        one so."""
        full = entries >= self.sizes[name] * FULL
        self.full_now[name.value] = full
        if full:
            self.full_polls[name.value] = self.full_polls.get(name.value, 0) + 1
