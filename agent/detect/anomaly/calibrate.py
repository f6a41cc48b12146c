"""Score -> per-window tail probability, so a threshold is a false-alarm rate.

SPOT (Siffer et al., KDD 2017): below an initial threshold t (the `level` empirical
quantile of the scores) the empirical distribution answers; above it the excesses follow a
generalised Pareto distribution fitted on the peaks, which extrapolates to rates far below
what a bounded sample holds (1e-5 per 10 s window is one window in 11.6 days). Only
windows that were not flagged feed it (an ongoing attack must not raise its own bar). The
sample is a bounded reservoir (uniform over the history) and the peaks a bounded list, so
the state is a few KB; the fit is redone every `refit` new scores.

GPD fit: Grimshaw's profile likelihood is replaced by a grid over the shape gamma in
[0, 1] with the scale's maximum-likelihood value for each (robust, no solver), the
best log-likelihood kept."""
from __future__ import annotations

import bisect
import math
from typing import Any

LEVEL = 0.96          # initial threshold: this empirical quantile (8 peaks from 200 windows)
RESERVOIR = 2000
PEAKS = 600
REFIT = 64
# Shapes below 0 (a bounded tail) are not fitted: with a few hundred peaks they are
# mostly noise, and a wrongly short tail is what turns into false alarms at 1e-5.
_GAMMAS = [g / 40 for g in range(0, 41)]   # 0 .. 1.0


class Calibrator:
    def __init__(self, d: dict[str, Any] | None = None):
        d = d or {}
        self.n = int(d.get("n", 0))                  # scores seen (unflagged)
        self.sample: list[float] = sorted(d.get("sample", []))
        self.peaks: list[float] = list(d.get("peaks", []))   # scores above t when seen
        self.rng = int(d.get("rng", 0x2545F491))
        self.t = d.get("t")
        self.fit: tuple[float, float] | None = tuple(d["fit"]) if d.get("fit") else None
        self.since_fit = 0

    def add(self, score: float) -> None:
        self.n += 1
        if len(self.sample) < RESERVOIR:
            bisect.insort(self.sample, score)
        else:
            j = self._rand() % self.n
            if j < RESERVOIR:   # Vitter's algorithm R: replace a uniformly chosen member
                del self.sample[self._rand() % RESERVOIR]
                bisect.insort(self.sample, score)
        if self.t is not None and score > self.t:
            self.peaks.append(score)
            if len(self.peaks) > PEAKS:
                del self.peaks[self._rand() % len(self.peaks)]
        self.since_fit += 1
        if self.since_fit >= REFIT or self.t is None and len(self.sample) >= 50:
            self.refit()

    def _rand(self) -> int:
        x = self.rng          # xorshift32: the state is one int in the snapshot
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        self.rng = x
        return x

    def refit(self) -> None:
        self.since_fit = 0
        if len(self.sample) < 50:
            return
        t = _quantile(self.sample, LEVEL)
        if self.t is None or abs(t - self.t) > 1e-12:
            # Peaks above the new t: the old ones still above it plus the sample's tail.
            self.peaks = [p for p in self.peaks if p > t]
            tail = [s for s in self.sample if s > t]
            if len(tail) > len(self.peaks):
                self.peaks = tail
            self.t = t
        excess = [p - t for p in self.peaks if p > t]
        self.fit = _fit_gpd(excess) if len(excess) >= 8 else None

    def tail(self, score: float) -> float:
        """P(score >= s) for a normal window (1.0 when there is too little to say)."""
        if self.t is None or len(self.sample) < 50:
            return 1.0
        if score <= self.t or self.fit is None:
            k = len(self.sample) - bisect.bisect_left(self.sample, score)
            return max(k, 0.5) / len(self.sample) if score > self.t else \
                max(k, 1) / len(self.sample)
        gamma, sigma = self.fit
        y = score - self.t
        p_t = 1.0 - LEVEL
        if abs(gamma) < 1e-9:
            return p_t * math.exp(-y / sigma)
        base = 1.0 + gamma * y / sigma
        if base <= 0:
            return 0.0
        return p_t * base ** (-1.0 / gamma)

    def threshold(self, rate: float) -> float | None:
        """The score whose tail probability is `rate`."""
        if self.t is None or len(self.sample) < 50:
            return None
        p_t = 1.0 - LEVEL
        if rate >= p_t or self.fit is None:
            return _quantile(self.sample, 1.0 - rate)
        gamma, sigma = self.fit
        r = rate / p_t
        if abs(gamma) < 1e-9:
            return self.t - sigma * math.log(r)
        return self.t + sigma / gamma * (r ** (-gamma) - 1.0)

    def dump(self) -> dict[str, Any]:
        return {"n": self.n, "sample": [round(s, 6) for s in self.sample],
                "peaks": [round(p, 6) for p in self.peaks], "rng": self.rng, "t": self.t,
                "fit": list(self.fit) if self.fit else None}


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    i = min(len(sorted_values) - 1, max(0, int(math.ceil(q * len(sorted_values))) - 1))
    return sorted_values[i]


def _fit_gpd(y: list[float]) -> tuple[float, float] | None:
    """(gamma, sigma) of a generalised Pareto for the excesses y >= 0."""
    n = len(y)
    mean = sum(y) / n
    if mean <= 0:
        return None
    best: tuple[float, float, float] | None = None
    ymax = max(y)
    for g in _GAMMAS:
        sigma = _sigma_for(y, g, mean)
        if sigma <= 0 or (g < 0 and ymax >= -sigma / g):
            continue
        if abs(g) < 1e-9:
            ll = -n * math.log(sigma) - sum(y) / sigma
        else:
            s = 0.0
            for v in y:
                s += math.log1p(g * v / sigma)
            ll = -n * math.log(sigma) - (1.0 + 1.0 / g) * s
        if best is None or ll > best[0]:
            best = (ll, g, sigma)
    return (best[1], best[2]) if best else None


def _sigma_for(y: list[float], g: float, mean: float) -> float:
    """The scale's ML value for a fixed shape, by a few fixed-point steps from the
    moment estimate."""
    sigma = mean * (1.0 - g) if g < 1 else mean
    if abs(g) < 1e-9:
        return mean
    for _ in range(20):
        # d/dsigma of the log-likelihood = 0  <=>  sigma = (1+g)/n * sum(y / (1 + g y/sigma))
        if any(1.0 + g * v / sigma <= 0 for v in y):
            return -1.0
        new = (1.0 + g) / len(y) * sum(v / (1.0 + g * v / sigma) for v in y)
        if abs(new - sigma) < 1e-9 * max(sigma, 1e-12):
            return new
        sigma = new
    return sigma
