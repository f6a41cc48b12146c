"""The streaming detectors, over scaled feature vectors (features.scale: [0, 1] each).

- Stats: per-feature EWMA mean and EWMA absolute deviation. It is the `zscore` baseline
  (score: the largest robust z), the baseline values drivers are measured against, and
  the frozen reference of anomaly.drift.
- HalfSpaceTrees (Tan, Ting, Liu 2011): random axis-aligned trees over the unit cube whose
  node masses count where recent windows fell; a window landing where the reference mass
  is thin scores high. Constant time and memory per window, adapts by swapping the
  reference every `window` windows. The trees' splits come from a seed, so the state is
  the masses only (stored sparse).
- RobustMahalanobis: exponentially weighted mean and covariance with Huber weights (a far
  point moves them little); score: the squared Mahalanobis distance. Catches windows that
  are ordinary feature by feature but not together (many connections and no execs).

Every detector scores, learns (only windows the engine did not flag) and dumps/loads its
state as JSON-able data. Drivers (`drivers()`) are counterfactual: how much the score
drops when one feature is put back at its baseline, most important first."""
from __future__ import annotations

import math
import random
from typing import Any, Callable

from agent.detect.anomaly.features import DIM, FLOORS, NAMES, unscale


class Stats:
    def __init__(self, d: dict[str, Any] | None = None, halflife: float = 200.0):
        d = d or {}
        self.n = int(d.get("n", 0))
        self.mean = list(d.get("mean", [0.0] * DIM))
        self.dev = list(d.get("dev", [0.0] * DIM))
        self.alpha_min = 1.0 - 0.5 ** (1.0 / halflife)

    def learn(self, x: list[float]) -> None:
        self.n += 1
        a = max(1.0 / self.n, self.alpha_min)
        for i, v in enumerate(x):
            self.dev[i] += a * (abs(v - self.mean[i]) - self.dev[i])
            self.mean[i] += a * (v - self.mean[i])

    def z(self, x: list[float]) -> list[float]:
        # The spread never under the feature's floor: a feature that never moved is not
        # infinitely surprising when it moves by a hair.
        return [abs(v - m) / max(1.4826 * s, f) for v, m, s, f in zip(x, self.mean, self.dev, FLOORS)]

    def score(self, x: list[float]) -> float:
        return max(self.z(x))

    def dump(self) -> dict[str, Any]:
        return {"n": self.n, "mean": _r(self.mean), "dev": _r(self.dev)}


class HalfSpaceTrees:
    _shapes: dict[tuple[int, int, int], list] = {}   # (seed, trees, depth) -> splits

    def __init__(self, trees: int, depth: int, window: int, seed: int,
                 d: dict[str, Any] | None = None):
        self.trees, self.depth, self.window, self.seed = trees, depth, window, seed
        self.size = (1 << (depth + 1)) - 1
        self.splits = self._shape(seed, trees, depth)
        d = d or {}
        self.ref = _masses(d.get("ref"), trees, self.size)
        self.latest = _masses(d.get("latest"), trees, self.size)
        self.count = int(d.get("count", 0))
        self.ref_n = int(d.get("ref_n", 0))
        self.limit = max(1, int(0.1 * window))

    @classmethod
    def _shape(cls, seed: int, trees: int, depth: int) -> list:
        key = (seed, trees, depth)
        if key not in cls._shapes:
            rng = random.Random(seed * 7919 + trees * 31 + depth)
            shapes = []
            for _ in range(trees):
                lo, hi = [], []
                for _ in range(DIM):
                    s = rng.random()
                    r = 2.0 * max(s, 1.0 - s)
                    lo.append(s - r)
                    hi.append(s + r)
                nodes: list[tuple[int, float]] = [(0, 0.0)] * ((1 << depth) - 1)
                _build(rng, nodes, 0, lo, hi, depth)
                shapes.append(nodes)
            cls._shapes[key] = shapes
        return cls._shapes[key]

    def _path(self, t: int, x: list[float]):
        node, nodes = 0, self.splits[t]
        for _ in range(self.depth):
            yield node
            q, v = nodes[node]
            node = 2 * node + (1 if x[q] < v else 2)
        yield node

    def score(self, x: list[float]) -> float:
        mass, n = (self.ref, self.ref_n) if self.ref_n else (self.latest, max(self.count, 1))
        limit = max(1, int(0.1 * n))
        total = 0.0
        for t in range(self.trees):
            m = mass[t]
            for k, node in enumerate(self._path(t, x)):
                c = m.get(node, 0)
                if c < limit or k == self.depth:
                    total += c * (1 << k)
                    break
        top = self.trees * n * (1 << self.depth)
        return math.log(top + 1.0) - math.log(total + 1.0)

    def learn(self, x: list[float]) -> None:
        for t in range(self.trees):
            m = self.latest[t]
            for node in self._path(t, x):
                m[node] = m.get(node, 0) + 1
        self.count += 1
        if self.count >= self.window:
            self.ref, self.ref_n = self.latest, self.count
            self.latest = [{} for _ in range(self.trees)]
            self.count = 0

    def dump(self) -> dict[str, Any]:
        return {"ref": _sparse(self.ref), "latest": _sparse(self.latest),
                "count": self.count, "ref_n": self.ref_n}


def _build(rng: random.Random, nodes: list, node: int, lo: list[float], hi: list[float],
           depth: int) -> None:
    if depth == 0:
        return
    q = rng.randrange(DIM)
    mid = (lo[q] + hi[q]) / 2.0
    nodes[node] = (q, mid)
    left_hi = hi.copy()
    left_hi[q] = mid
    right_lo = lo.copy()
    right_lo[q] = mid
    _build(rng, nodes, 2 * node + 1, lo, left_hi, depth - 1)
    _build(rng, nodes, 2 * node + 2, right_lo, hi, depth - 1)


class RobustMahalanobis:
    HUBER = 3.0          # distances beyond this pull the estimate with weight HUBER/d

    def __init__(self, halflife: float = 500.0, d: dict[str, Any] | None = None):
        d = d or {}
        self.n = int(d.get("n", 0))
        self.mean = list(d.get("mean", [0.0] * DIM))
        self.cov = [list(r) for r in d.get("cov", [[0.0] * DIM for _ in range(DIM)])]
        self.alpha_min = 1.0 - 0.5 ** (1.0 / halflife)
        self._inv: list[list[float]] | None = None

    def _inverse(self) -> list[list[float]]:
        if self._inv is None:
            # Each feature's floor (features.FLOORS) added to its variance: a feature that
            # never varied stays invertible and a move of a few counts stays ordinary.
            a = [[self.cov[i][j] + (FLOORS[i] ** 2 if i == j else 0.0) for j in range(DIM)]
                 for i in range(DIM)]
            self._inv = _invert(a)
        return self._inv

    def score(self, x: list[float]) -> float:
        inv = self._inverse()
        d = [v - m for v, m in zip(x, self.mean)]
        return sum(d[i] * sum(inv[i][j] * d[j] for j in range(DIM)) for i in range(DIM))

    def learn(self, x: list[float]) -> None:
        dist = math.sqrt(max(self.score(x), 0.0)) if self.n > DIM else 0.0
        w = 1.0 if dist <= self.HUBER else self.HUBER / dist
        self.n += 1
        a = max(1.0 / self.n, self.alpha_min) * w
        d = [v - m for v, m in zip(x, self.mean)]
        for i in range(DIM):
            self.mean[i] += a * d[i]
        for i in range(DIM):
            row, di = self.cov[i], d[i]
            for j in range(DIM):
                row[j] = (1.0 - a) * (row[j] + a * di * d[j])
        self._inv = None

    def dump(self) -> dict[str, Any]:
        return {"n": self.n, "mean": _r(self.mean), "cov": [_r(r) for r in self.cov]}


def drivers(score: Callable[[list[float]], float], x: list[float], baseline: list[float],
            top: int = 5) -> list[dict[str, Any]]:
    """Features whose return to the baseline lowers the score most, with their share."""
    s = score(x)
    gains = []
    for i in range(DIM):
        if abs(x[i] - baseline[i]) < 1e-9:
            continue
        y = x.copy()
        y[i] = baseline[i]
        gains.append((s - score(y), i))
    positive = [(g, i) for g, i in gains if g > 0]
    total = sum(g for g, _ in positive) or 1.0
    positive.sort(reverse=True)
    return [{"feature": NAMES[i], "value": round(unscale(i, x[i]), 3),
             "baseline": round(unscale(i, baseline[i]), 3), "contribution": round(g / total, 3)}
            for g, i in positive[:top]]


def _invert(a: list[list[float]]) -> list[list[float]]:
    """Gauss-Jordan with partial pivoting on a small symmetric positive definite matrix."""
    n = len(a)
    m = [row[:] + [1.0 if i == j else 0.0 for j in range(n)] for i, row in enumerate(a)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        m[c], m[p] = m[p], m[c]
        piv = m[c][c] or 1e-12
        m[c] = [v / piv for v in m[c]]
        for r in range(n):
            if r != c and m[r][c]:
                f = m[r][c]
                rc = m[c]
                m[r] = [v - f * w for v, w in zip(m[r], rc)]
    return [row[n:] for row in m]


def _r(values: list[float]) -> list[float]:
    return [round(v, 7) for v in values]


def _sparse(mass: list[dict[int, int]]) -> list[dict[str, int]]:
    return [{str(i): c for i, c in m.items() if c} for m in mass]


def _masses(d: Any, trees: int, size: int) -> list[dict[int, int]]:
    """Node masses, sparse (a tree of depth 12 has 8191 nodes; windows visit few)."""
    out: list[dict[int, int]] = [{} for _ in range(trees)]
    if isinstance(d, list) and len(d) == trees:
        for t, m in enumerate(d):
            for k, c in m.items():
                i = int(k)
                if 0 <= i < size and int(c) > 0:
                    out[t][i] = int(c)
    return out


class Loda:
    """LODA (Pevny 2016): `k` sparse random projections (about sqrt(d) features each),
    a histogram of each projection (fixed bin width, bins in a dict: only the visited ones
    exist); score: the mean of -log of the window's bin frequency. Adapts like
    HalfSpaceTrees: the histograms of the last `window` windows become the reference."""
    WIDTH = 0.05

    def __init__(self, k: int, window: int, seed: int, d: dict[str, Any] | None = None):
        self.k, self.window = k, window
        rng = random.Random(seed * 104729 + k)
        nz = max(1, int(math.ceil(math.sqrt(DIM))))
        self.proj = []
        for _ in range(k):
            dims = rng.sample(range(DIM), nz)
            self.proj.append([(i, rng.gauss(0.0, 1.0)) for i in dims])
        d = d or {}
        self.ref = _bins(d.get("ref"), k)
        self.latest = _bins(d.get("latest"), k)
        self.count = int(d.get("count", 0))
        self.ref_n = int(d.get("ref_n", 0))

    def _bin(self, j: int, x: list[float]) -> int:
        return math.floor(sum(w * x[i] for i, w in self.proj[j]) / self.WIDTH)

    def score(self, x: list[float]) -> float:
        hist, n = (self.ref, self.ref_n) if self.ref_n else (self.latest, max(self.count, 1))
        s = 0.0
        for j in range(self.k):
            s -= math.log((hist[j].get(self._bin(j, x), 0) + 0.5) / (n + 1.0))
        return s / self.k

    def learn(self, x: list[float]) -> None:
        for j in range(self.k):
            b = self._bin(j, x)
            h = self.latest[j]
            h[b] = h.get(b, 0) + 1
        self.count += 1
        if self.count >= self.window:
            self.ref, self.ref_n = self.latest, self.count
            self.latest = [{} for _ in range(self.k)]
            self.count = 0

    def dump(self) -> dict[str, Any]:
        return {"ref": _sparse(self.ref), "latest": _sparse(self.latest), "count": self.count,
                "ref_n": self.ref_n}


def _bins(d: Any, k: int) -> list[dict[int, int]]:
    out: list[dict[int, int]] = [{} for _ in range(k)]
    if isinstance(d, list) and len(d) == k:
        for j, m in enumerate(d):
            out[j] = {int(b): int(c) for b, c in m.items() if int(c) > 0}
    return out
