"""anomaly.beacon: periodic outbound connections per (workload, destination, port).

Scored as RITA scores beacons, robust to jitter: for the intervals between connection
starts, the Bowley skew ((Q1 + Q3 - 2 Q2) / (Q3 - Q1): 0 for a symmetric jitter around
the period) and the MAD relative to the median (0.15 for +-30% uniform jitter; about 0.7
for a Poisson process such as a service's client traffic); the same for the connections'
sizes where flow.close gave them. score = 0.25 (1 - |skew|) + 0.75 (1 - MAD/median) over
intervals (weight 0.7) and the mean of the two over sizes (0.3). It learns nothing, so a beacon already running
while the models warm up is still found.

What is not a beacon: destinations in `known_destinations` and the mesh/management
allowlists, and internal ones (RFC 1918, CGNAT, ULA, link-local: kubelet's probes,
scrapes; unless `internal`) are never tracked; destinations many workloads use (prevalence >=
`prevalence_max`: a shared NTP, DNS or metrics endpoint); bulk transfers (median size
over `max_median_bytes`: a checkpoint upload every 30 min); intervals under 1 s (a
connection pool) or over `max_interval_s`; pairs marked benign by feedback ("learn")."""
from __future__ import annotations

import ipaddress
import re
from collections import OrderedDict, deque
from typing import Any

from agent.detect.anomaly.features import profile_of

MIN_INTERVAL_S = 1.0
INTERNAL = [ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16",
    "fc00::/7", "fe80::/10")]
SKEW_SPREAD = 0.3     # MAD/median under which the skew is discounted
GHOSTS_PER_PAIR = 2    # evicted one-connection pairs remembered, per pair of the table
_UNIT = re.compile(r"^(.*?\.(?:service|scope))(?:/|$)")


def beacon_key(container: str, cgroup: str) -> str:
    """Whose connections a beacon pair gathers: the container; else the systemd unit the
    cgroup is in (its sub-cgroups are the unit's: root in x.service may make x.service/a,
    /b, /c), with numbers and ids made wildcards (a fresh `systemd-run --scope` or session
    per connection is the same kind), else the cgroup path."""
    if container:
        return container
    m = _UNIT.match(cgroup)
    return profile_of(m.group(1) if m else cgroup)


class Pair:
    __slots__ = ("times", "sizes", "exes", "dirty", "benign", "last_alert_ns", "first_ns",
                 "new_dst", "workload")

    def __init__(self, history: int, d: dict[str, Any] | None = None):
        d = d or {}
        self.times: deque[int] = deque(d.get("times", ()), maxlen=history)
        self.sizes: deque[int] = deque(d.get("sizes", ()), maxlen=history)
        self.exes: list[str] = list(d.get("exes", ()))[:4]
        self.dirty = False
        self.benign = bool(d.get("benign", False))
        self.last_alert_ns = d.get("last_alert_ns")
        self.first_ns = int(d.get("first_ns", 0))
        self.new_dst = bool(d.get("new_dst", False))
        self.workload = str(d.get("workload", ""))   # the last workload that connected

    def dump(self) -> dict[str, Any]:
        return {"times": list(self.times), "sizes": list(self.sizes), "exes": self.exes,
                "benign": self.benign, "last_alert_ns": self.last_alert_ns,
                "first_ns": self.first_ns, "new_dst": self.new_dst, "workload": self.workload}


class BeaconTracker:
    def __init__(self, cfg, known_nets: list, d: dict[str, Any] | None = None):
        self.cfg = cfg.beacon
        self.history = max(self.cfg.history, self.cfg.min_conns)
        self.known = known_nets
        d = d or {}
        self.pairs: OrderedDict[tuple[str, str, int], Pair] = OrderedDict()
        # per workload, its keys in the table's order, one-connection pairs apart from the
        # others: room for a new pair is made in O(1), not by a scan of the table (a flood
        # of ever-new addresses makes a new pair per connection)
        self._singles: dict[str, OrderedDict[tuple[str, str, int], None]] = {}
        self._multis: dict[str, OrderedDict[tuple[str, str, int], None]] = {}
        # One-connection pairs evicted to make room, remembered compactly (key -> first
        # connection's time, size, new_dst), so that a second connection still makes a
        # pair of two: a flood of ever-new addresses from the beacon's own workload must
        # not evict a slow beacon before its second check-in. In memory only, bounded.
        self._ghosts: OrderedDict[tuple[str, str, int], tuple[int, int, bool]] = OrderedDict()
        self.ghost_max = GHOSTS_PER_PAIR * self.cfg.max_pairs
        for item in d.get("pairs", ()):
            w, dst, port, p = item
            if (w, dst, int(port)) not in self.pairs:     # a damaged file's duplicate: once
                self._put((w, dst, int(port)), Pair(self.history, p))
        self.users: OrderedDict[str, list[str]] = OrderedDict(
            (k, list(v)) for k, v in d.get("users", {}).items())
        self.evicted = int(d.get("evicted", 0))
        self.scored = int(d.get("scored", 0))

    def _known(self, dst: str) -> bool:
        try:
            ip = ipaddress.ip_address(dst)
        except ValueError:
            return True      # not an address: nothing to score
        if not self.cfg.internal and any(ip in net for net in INTERNAL):
            return True
        return ip.is_loopback or any(ip in net for net in self.known)

    def connect(self, workload: str, dst: str, port: int, t_ns: int, exe: str | None,
                new_dst: bool, owner: str = "", user: str = "") -> None:
        """One established outbound connection. `workload` is the beacon's key (the
        container, else the unit the cgroup belongs to: see `beacon_key`), `owner` the
        workload it came from (the finding's entity), `user` who it counts as for the
        destination's prevalence (default: the workload; one host account's units are one
        user, so a user cannot make its C2 "shared" from its session, cron and user units)."""
        if not dst or self._known(dst):
            return
        users = self.users.setdefault(dst, [])
        self.users.move_to_end(dst)
        user = user or workload
        if user not in users and len(users) < self.cfg.prevalence_max:
            users.append(user)
        while len(self.users) > self.cfg.max_pairs:
            self.users.popitem(last=False)
        key = (workload, dst, port)
        pair = self.pairs.get(key)
        if pair is None:
            self._make_room(workload)
            pair = self._put(key, Pair(self.history))
            pair.first_ns, pair.new_dst = t_ns, new_dst
            ghost = self._ghosts.pop(key, None)
            if ghost is not None:     # its first connection, evicted from the table
                pair.first_ns, size, pair.new_dst = ghost
                pair.times.append(pair.first_ns)
                if size >= 0:
                    pair.sizes.append(size)
        pair.workload = owner or workload
        pair.times.append(t_ns)
        self._touch(key, pair)
        if exe and exe not in pair.exes and len(pair.exes) < 4:
            pair.exes.append(exe)
        pair.dirty = True

    def _make_room(self, workload: str) -> None:
        """Room for one more pair: a workload holds at most a quarter of the table (its
        one-connection pairs go first, then its oldest), so a flood of connections to
        ever-new addresses evicts its own noise, not its beacon nor other workloads'
        pairs; then the table's oldest."""
        singles, multis = self._singles.get(workload, {}), self._multis.get(workload, {})
        if len(singles) + len(multis) >= max(1, self.cfg.max_pairs // 4):
            self._evict(next(iter(singles or multis)))
        while len(self.pairs) >= self.cfg.max_pairs:
            self._evict(next(iter(self.pairs)))

    def _evict(self, key: tuple[str, str, int]) -> None:
        pair = self.pairs[key]
        if len(pair.times) == 1 and not pair.benign:
            self._ghosts[key] = (pair.times[0], pair.sizes[0] if pair.sizes else -1,
                                 pair.new_dst)
            if len(self._ghosts) > self.ghost_max:
                self._ghosts.popitem(last=False)
        self._drop(key)
        self.evicted += 1

    def _side(self, pair: Pair) -> dict:
        return self._singles if len(pair.times) <= 1 else self._multis

    def _put(self, key: tuple[str, str, int], pair: Pair) -> Pair:
        self.pairs[key] = pair
        self._side(pair).setdefault(key[0], OrderedDict())[key] = None
        return pair

    def _touch(self, key: tuple[str, str, int], pair: Pair) -> None:
        """The pair was used: last in the table's order and its workload's; a second
        connection moves it from the one-connection pairs to the others."""
        self.pairs.move_to_end(key)
        w = key[0]
        single = self._singles.get(w)
        if single is not None and key in single:
            if len(pair.times) <= 1:
                single.move_to_end(key)
                return
            del single[key]
            if not single:
                del self._singles[w]
        self._multis.setdefault(w, OrderedDict())[key] = None
        self._multis[w].move_to_end(key)

    def _drop(self, key: tuple[str, str, int]) -> None:
        del self.pairs[key]
        for side in (self._singles, self._multis):
            own = side.get(key[0])
            if own is not None and key in own:
                del own[key]
                if not own:
                    del side[key[0]]

    def closed(self, workload: str, dst: str, port: int, size: int) -> None:
        pair = self.pairs.get((workload, dst, port))
        if pair is not None:
            pair.sizes.append(size)

    def due(self) -> list[tuple[tuple[str, str, int], Pair, dict[str, Any]]]:
        """Pairs with new connections that now score over the threshold: (key, pair, score
        details). Clears the dirty marks."""
        out = []
        for key, pair in self.pairs.items():
            if not pair.dirty:
                continue
            pair.dirty = False
            if pair.benign or len(pair.times) < self.cfg.min_conns:
                continue
            if len(self.users.get(key[1], ())) >= self.cfg.prevalence_max:
                continue
            self.scored += 1
            s = self.score(pair)
            # Over the threshold with the newest connection and without it (the scoring
            # before): a Poisson client's chance run of regular intervals is 10 times
            # rarer, a beacon costs one more period.
            if s is None or s["score"] < self.cfg.threshold:
                continue
            if len(pair.times) > self.cfg.min_conns:
                before = self.score(pair, drop_last=True)
                if before is not None and before["score"] >= self.cfg.threshold:
                    out.append((key, pair, s))
        return out

    def score(self, pair: Pair, drop_last: bool = False) -> dict[str, Any] | None:
        times = sorted(pair.times)[: -1 if drop_last else None]
        iv = [(b - a) / 1e9 for a, b in zip(times, times[1:])]
        med = _median(iv)
        if med < MIN_INTERVAL_S or med > self.cfg.max_interval_s:
            return None
        ts_skew, ts_mad = _bowley(iv), _mad(iv) / med
        # The skew of a handful of intervals is noisy: it weighs a quarter, the
        # dispersion three quarters (a 5 s +-30% beacon is then found by its 6th-12th
        # connection in 98% of draws; a Poisson client scores about 0.45).
        ts = 0.25 * _skew_score(ts_skew, ts_mad) + 0.75 * max(0.0, 1.0 - ts_mad)
        sizes = list(pair.sizes)[: -1 if drop_last and pair.sizes else None]
        size_med = _median(sizes) if sizes else 0.0
        if size_med > self.cfg.max_median_bytes:
            return None
        if len(sizes) >= self.cfg.min_conns and size_med > 0:
            ds_skew, ds_mad = _bowley(sizes), _mad(sizes) / size_med
            ds = (_skew_score(ds_skew, ds_mad) + max(0.0, 1.0 - ds_mad)) / 2.0
            # Consistent sizes support a beacon, varying ones do not clear it: a
            # check-in's answer varies with the tasks it brings.
            score = max(ts, 0.7 * ts + 0.3 * ds)
        else:
            ds_skew = ds_mad = None
            score = ts
        return {"score": round(score, 4), "interval_s": round(med, 3),
                "interval_skew": round(ts_skew, 3), "interval_mad_ratio": round(ts_mad, 3),
                "size_bytes": size_med, "size_skew": None if ds_skew is None else round(ds_skew, 3),
                "size_mad_ratio": None if ds_mad is None else round(ds_mad, 3),
                "connections": len(times)}

    def learn(self, workload: str, dst: str, port: int | None) -> list[tuple[str, str, int]]:
        """Mark the workload's pairs to dst (one port, or all) benign; the pairs this made
        benign (a pair for that port is made when there is none)."""
        done, any_pair = [], False
        for (w, d, p), pair in self.pairs.items():
            if w == workload and d == dst and (port is None or p == port):
                any_pair = True
                if not pair.benign:
                    pair.benign = True
                    done.append((w, d, p))
        if not any_pair and port is not None:
            self._put((workload, dst, port), Pair(self.history)).benign = True
            done.append((workload, dst, port))
        return done

    def unlearn(self, workload: str, dst: str, port: int) -> None:
        """Undo `learn` for one pair: scored again (a pair learn made, with no connection
        since, goes)."""
        key = (workload, dst, port)
        pair = self.pairs.get(key)
        if pair is None:
            return
        if not pair.times:
            self._drop(key)
        else:
            pair.benign, pair.dirty = False, True

    def forget(self, workload: str) -> None:
        own = [*self._singles.get(workload, ()), *self._multis.get(workload, ())]
        for key in own:
            if not self.pairs[key].benign:
                self._drop(key)

    def rebase(self, delta_ns: int) -> None:
        for pair in self.pairs.values():
            pair.times = deque((t + delta_ns for t in pair.times), maxlen=pair.times.maxlen)
            pair.first_ns += delta_ns
            if pair.last_alert_ns is not None:
                pair.last_alert_ns += delta_ns

    def dump(self) -> dict[str, Any]:
        return {"pairs": [[w, d, p, pair.dump()] for (w, d, p), pair in self.pairs.items()],
                "users": dict(self.users), "evicted": self.evicted, "scored": self.scored}


def _skew_score(skew: float, mad_ratio: float) -> float:
    """1 - |Bowley skew|, with the skew counted only as far as there is spread: the
    quartiles of near-constant values (a beacon's sizes, a timer's intervals) give a
    skew of noise."""
    return max(0.0, 1.0 - abs(skew) * min(1.0, mad_ratio / SKEW_SPREAD))


def _median(v: list[float]) -> float:
    s = sorted(v)
    n = len(s)
    if n == 0:
        return 0.0
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2.0


def _quartiles(v: list[float]) -> tuple[float, float, float]:
    s = sorted(v)
    n = len(s)
    lo, hi = s[: n // 2], s[(n + 1) // 2:]
    return _median(lo or s), _median(s), _median(hi or s)


def _bowley(v: list[float]) -> float:
    q1, q2, q3 = _quartiles(v)
    return 0.0 if q3 - q1 <= 0 else (q1 + q3 - 2.0 * q2) / (q3 - q1)


def _mad(v: list[float]) -> float:
    m = _median(v)
    return _median([abs(x - m) for x in v])
