"""What the engine keeps per profile (the models, the never-seen sets, the drift
reference) and per workload (the open window, persistence, dedup, recent events)."""
from __future__ import annotations

from collections import deque
from typing import Any

from agent.detect.anomaly.detectors import HalfSpaceTrees, Loda, RobustMahalanobis, Stats
from agent.detect.anomaly.features import FLOORS
from agent.detect.anomaly.features import DIM, Known, Novelty, Window

PROFILE_MIN = 30      # windows a profile learns before its models score
LEARNED_MAX = 32      # windows learned as normal (feedback) kept per profile
SEEN_MAX = 256        # image programs a workload was given (image grace), kept
TOLD_MAX = 1024       # programs and destinations a profile's findings reported, kept
LEARN_TOLERANCE = 0.05
FRESH_S = 600         # how long bytes to a newly reached block count as new
FRESH_MAX = 64        # fresh blocks kept per profile
PENDING_MAX = 8       # flagged windows' never-seen items held per workload (at least m + 1)
# The slow mean moves less than a window does: its floors are a third of the windows'
# (a sustained factor of 2-3 in a count, of 2 in bytes, is a drift worth a look).
DRIFT_FLOOR_DIV = 3.0


class Profile:
    def __init__(self, cfg, models: tuple[str, ...], d: dict[str, Any] | None = None):
        d = d or {}
        self.windows = int(d.get("windows", 0))
        self.last_ns = int(d.get("last_ns", 0))
        self.stats = Stats(d.get("stats"))
        self.models: dict[str, Any] = {}
        for name in models:
            state = d.get(name)
            if name == "mahalanobis":
                self.models[name] = RobustMahalanobis(d=state)
            elif name == "hst":
                self.models[name] = HalfSpaceTrees(cfg.hst.trees, cfg.hst.depth,
                                                   cfg.model_window, cfg.seed, state)
            elif name == "loda":
                self.models[name] = Loda(cfg.loda_projections, cfg.model_window, cfg.seed, state)
        self.known = Known(cfg.novelty_max, d.get("known"))
        self.frozen = Stats(d["frozen"]) if d.get("frozen") else None
        self.slow = list(d.get("slow", [0.0] * DIM))
        self.slow_n = int(d.get("slow_n", 0))
        self.drift_since = d.get("drift_since")
        # Windows learned as normal by feedback: a window no higher than one of them in
        # every feature (within LEARN_TOLERANCE) is normal for this profile.
        self.learned: list[list[float]] = [list(v) for v in d.get("learned", ())][-LEARNED_MAX:]
        # Programs and destinations its workloads' findings reported: no news to any
        # workload of this kind again (the next job container, the next ssh session:
        # its investigation has them), not known either; still news to other kinds and
        # node-wide (engine.reported_news) until feedback.
        self.told = Novelty(TOLD_MAX, map(str, d.get("told", ())))
        # Blocks never seen when a workload of this kind first reached them -> when (ns):
        # bytes to them stay "bytes to never-seen destinations" for FRESH_S, from any of
        # its workloads (an export that connects in one window and sends in the next, or
        # whose sidecar sends, must not find the block already known). One entry per
        # block: addresses of the attacker's own block cannot push its drop host out.
        self.fresh: dict[str, int] = {str(b): int(t) for b, t in d.get("fresh", {}).items()}

    def score(self, model: str, x: list[float]) -> float:
        return self.stats.score(x) if model == "zscore" else self.models[model].score(x)

    def scorer(self, model: str):
        return self.stats.score if model == "zscore" else self.models[model].score

    def learn(self, x: list[float]) -> None:
        self.stats.learn(x)
        for m in self.models.values():
            m.learn(x)

    def covered(self, x: list[float]) -> bool:
        """Whether a window learned as normal covers x."""
        return any(all(v <= lv + LEARN_TOLERANCE for v, lv in zip(x, lvec))
                   for lvec in self.learned)

    def drift(self, x: list[float], alpha: float) -> float | None:
        """Update the slow mean; its largest robust z against the frozen reference."""
        self.slow_n += 1
        a = max(alpha, 1.0 / self.slow_n)
        for i, v in enumerate(x):
            self.slow[i] += a * (v - self.slow[i])
        if self.frozen is None:
            return None
        return max(abs(s - m) / max(1.4826 * dv, f / DRIFT_FLOOR_DIV)
                   for s, m, dv, f in zip(self.slow, self.frozen.mean, self.frozen.dev, FLOORS))

    def freeze(self) -> None:
        self.frozen = Stats(self.stats.dump())
        self.slow = list(self.stats.mean)
        self.drift_since = None

    def keep_fresh(self, new_dsts: list[str], now: int) -> None:
        """After a window: its never-seen blocks become fresh, for FRESH_S from when one
        was first reached (not extended by traffic: a service first reached at start-up
        is not new for good). At most FRESH_MAX (a flood of new blocks keeps its latest)."""
        for b in new_dsts:
            self.fresh.setdefault(b, now)
        if not self.fresh:
            return
        since = now - FRESH_S * 1_000_000_000
        if min(self.fresh.values()) < since:
            self.fresh = {b: t for b, t in self.fresh.items() if t >= since}
        if len(self.fresh) > FRESH_MAX:
            self.fresh = dict(sorted(self.fresh.items(), key=lambda kv: kv[1])[-FRESH_MAX:])

    def rebase(self, delta: int) -> None:
        self.last_ns += delta
        if self.drift_since is not None:
            self.drift_since += delta
        self.fresh = {b: t + delta for b, t in self.fresh.items()}

    def dump(self) -> dict[str, Any]:
        d = {"windows": self.windows, "last_ns": self.last_ns, "stats": self.stats.dump(),
             "known": self.known.dump(), "slow": [round(v, 7) for v in self.slow],
             "slow_n": self.slow_n, "drift_since": self.drift_since,
             "frozen": self.frozen.dump() if self.frozen else None, "learned": self.learned,
             "told": self.told.dump(), "fresh": self.fresh}
        for name, m in self.models.items():
            d[name] = m.dump()
        return d


class Workload:
    """One entity: the node ("node") or a workload (container id, else cgroup path)."""

    def __init__(self, key: str, cgroup: str, container: str, profile: str, m: int,
                 recent: int, d: dict[str, Any] | None = None):
        d = d or {}
        self.key, self.cgroup, self.container, self.profile = key, cgroup, container, profile
        self.window = Window()
        self.recent: deque[dict[str, Any]] = deque(maxlen=recent)
        self.last_ns = int(d.get("last_ns", 0))
        self.first_ns = int(d.get("first_ns", 0))    # first event seen of it
        self.new_pod = bool(d.get("new_pod", False))  # a container in a never-seen pod
        self.flags: dict[str, deque[bool]] = {}
        self.m = m
        self.run_start: dict[str, int] = {k: int(v) for k, v in d.get("run_start", {}).items()}
        self.last_alert: dict[str, list] = {k: list(v) for k, v in d.get("last_alert", {}).items()}
        # Its image's programs (image grace): no news to it again; still news to every
        # other workload (what its findings reported: Profile.told).
        self.seen = Novelty(SEEN_MAX, d.get("seen", ()))
        self.rotating: frozenset[int] | None = None   # AnomalyEngine._rotating's
        # [until_ns, {"exes": [...], "dsts": [...], ...}]: what a flagged window saw never
        # seen, held out of the known sets while persistence may still make it a finding
        # (engine._remember), then known if none did.
        self.pending_max = max(PENDING_MAX, m + 1)    # entries live m windows
        self.pending: list[list] = [[int(t), dict(n)] for t, n in d.get("pending", ())][
            -self.pending_max:]

    @property
    def entity(self) -> str:
        return "node" if self.key == "node" else f"cgroup:{self.cgroup}"

    def flag(self, detector: str, flagged: bool, start_ns: int) -> int:
        """Record one window's flag; how many of the last m were flagged."""
        q = self.flags.setdefault(detector, deque(maxlen=self.m))
        q.append(flagged)
        if flagged and detector not in self.run_start:
            self.run_start[detector] = start_ns
        if not any(q):
            self.run_start.pop(detector, None)
        return sum(q)

    def rebase(self, delta: int) -> None:
        self.last_ns += delta
        self.first_ns += delta
        self.run_start = {k: v + delta for k, v in self.run_start.items()}
        for v in self.last_alert.values():
            v[0] += delta
        for entry in self.pending:
            entry[0] += delta

    def dump(self) -> dict[str, Any]:
        return {"cgroup": self.cgroup, "container": self.container, "profile": self.profile,
                "last_ns": self.last_ns, "first_ns": self.first_ns, "new_pod": self.new_pod,
                "run_start": self.run_start,
                "last_alert": self.last_alert, "seen": self.seen.dump(), "pending": self.pending}
