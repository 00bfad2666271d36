"""Robust statistics for benchmark samples, and the noise-aware change test of `bench regress`.

Why robust: samples are small (a few repeats, a few nights) and have outliers (a warm page cache, a
neighbour job, a throttled SSD). One wild value moves a mean and inflates a standard deviation
enough to hide a real change. Centres here are medians; the spread is a winsorized standard
deviation: values beyond median ± 2.5 σ_MAD (σ_MAD = 1.4826 · MAD) are pulled in to that bound
before the SD is taken. One outlier night among seven then inflates the spread ~1.5× (a plain SD:
~8×), while small samples lose less power than with the MAD itself (at 7 baseline nights the
smallest change detectable at the same false-alarm rate is 6.3 σ instead of 9.4 σ).

The test (`assess`) is a robust z-score. The unit of replication is the suite run (a night): repeats
of one night share its conditions, so nights vary more than repeats, and pooling repeats would call
ordinary night-to-night drift significant. With k baseline runs:

    z = sign · (median(current) − median(run medians)) / (s · √(1 + c/k))

s = the spread of the k run medians, c = π/2 (variance of a median of k values, relative to one).
An explicit baseline of fewer runs (one baseline suite run, one commit) compares repeats instead:
s = the larger spread of baseline and current repeats, denominator s · √(c/n_cur + c/n_base).
Either way s ≥ `noise_floor` · |baseline| so identical values do not make any change significant.

A spread estimated from a handful of values is itself noisy, so z is heavy-tailed: with 7 baseline
nights, z > 3 happens ~2% of the time on pure Gaussian noise instead of the textbook 0.13%. The
critical value is therefore calibrated: `critical(z, ...)` simulates the statistic for the same
sample sizes under Gaussian noise (fixed seed, cached) and returns its quantile at the tail
probability Φ̄(z). "z = 3" thus means a 0.13% one-sided false-alarm rate per comparison at every
baseline size; small baselines get a large critical value (≈ 16 at k = 5, ≈ 7 at k = 7, ≈ 4 at
k = 14, → 3 as k grows), which is the honest price of little history.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

MAD_TO_SIGMA = 1.4826  # σ of a normal distribution = 1.4826 · MAD
MEDIAN_VARIANCE = math.pi / 2  # var(median of n) ≈ (π/2) σ²/n for normal data, n ≥ 3
WINSOR = 2.5  # winsorize at median ± WINSOR · σ_MAD
CALIBRATION_DRAWS = 100_000
MAX_CALIBRATED_N = 40  # beyond this the statistic is close to its limit; calibrate at 40
Unit = Literal["run", "repeat"]


@dataclass(frozen=True)
class Summary:
    """Median, robust spread (winsorized SD), range and count of a sample."""

    n: int
    median: float
    sigma: float
    lo: float
    hi: float

    @property
    def spread(self) -> float:
        """Robust coefficient of variation: σ / |median| (0 for a zero median)."""
        return self.sigma / abs(self.median) if self.median else 0.0

    def to_dict(self) -> dict[str, float | int]:
        return {"n": self.n, "median": self.median, "sigma": self.sigma, "spread": self.spread, "min": self.lo,
                "max": self.hi}


@dataclass(frozen=True)
class Change:
    """Current against baseline for one metric; `worse` and `z` are positive when it got worse."""

    baseline: Summary  # over baseline run medians (unit "run") or baseline repeats (unit "repeat")
    current: Summary  # over the current repeats
    unit: Unit
    noise: float  # the spread s the z-score used
    rel: float  # (current − base) / |base|, as measured
    worse: float  # rel, signed so that > 0 is worse
    z: float  # robust z-score, signed so that > 0 is worse
    critical: float  # |z| beyond this is beyond the noise (calibrated for these sample sizes)

    def to_dict(self) -> dict[str, object]:
        return {"baseline": self.baseline.to_dict(), "current": self.current.to_dict(), "unit": self.unit,
                "noise": self.noise, "rel": self.rel, "worse": self.worse, "z": self.z, "critical": self.critical}


def summarize(values: Sequence[float | None]) -> Summary | None:
    """Summary of the finite values; None when there are none. (Plain Python: samples are small and
    this runs for every metric of every pair, where numpy's per-call overhead dominates.)"""
    x = sorted(v for v in values if v is not None and math.isfinite(v))
    if not x:
        return None
    med = _median(x)
    sigma = 0.0
    if len(x) >= 2:
        bound = WINSOR * MAD_TO_SIGMA * _median(sorted(abs(v - med) for v in x))
        w = [min(max(v, med - bound), med + bound) for v in x]
        mean = sum(w) / len(w)
        sigma = math.sqrt(sum((v - mean) ** 2 for v in w) / (len(w) - 1))
    return Summary(len(x), med, sigma, x[0], x[-1])


def spread(x: np.ndarray) -> np.ndarray:
    """Winsorized SD of each row of `x` (n, k); 0 for k < 2 (the vectorized twin of `summarize`'s)."""
    if x.shape[1] < 2:
        return np.zeros(x.shape[0])
    med = np.median(x, axis=1, keepdims=True)
    bound = WINSOR * MAD_TO_SIGMA * np.median(np.abs(x - med), axis=1, keepdims=True)
    return np.clip(x, med - bound, med + bound).std(axis=1, ddof=1)


def assess(baseline_runs: Sequence[Sequence[float | None]], current: Sequence[float | None], sign: int, *,
           z: float = 3.0, unit: Unit = "run", min_runs: int = 5, min_values: int = 3,
           noise_floor: float = 0.005) -> Change | None:
    """Robust z-test of `current` (one run's repeats) against `baseline_runs` (one list per earlier
    suite run); None without enough data: fewer than `min_runs` runs for unit "run", fewer than
    `min_values` values for unit "repeat". `sign` is +1 when a rise is worse, -1 when a fall is."""
    cur = summarize(current)
    if cur is None:
        return None
    if unit == "run":
        runs = [s.median for s in (summarize(r) for r in baseline_runs) if s is not None]
        base = summarize(runs)
        if base is None or base.n < min_runs:
            return None
        noise = max(base.sigma, noise_floor * abs(base.median))
        se = noise * math.sqrt(1 + _c(base.n) / base.n)
        crit = critical(z, "run", base.n, 1)
    else:
        base = summarize([v for r in baseline_runs for v in r])
        if base is None or base.n < min_values:
            return None
        noise = max(base.sigma, cur.sigma, noise_floor * abs(base.median))
        se = noise * math.sqrt(_c(cur.n) / cur.n + _c(base.n) / base.n)
        crit = critical(z, "repeat", base.n, cur.n)
    diff = cur.median - base.median
    rel = diff / abs(base.median) if base.median else (math.copysign(math.inf, diff) if diff else 0.0)
    score = sign * diff / se if se > 0 else (math.copysign(math.inf, sign * diff) if diff else 0.0)
    return Change(base, cur, unit, noise, rel, sign * rel, score, crit)


@functools.lru_cache(maxsize=512)
def critical(z: float, unit: Unit, n_base: int, n_cur: int) -> float:
    """The value |z| exceeds with probability Φ̄(z) under Gaussian noise, for these sample sizes.

    Simulated with the exact statistic of `assess` (without the noise floor, which only lowers z).
    """
    n_base, n_cur = min(n_base, MAX_CALIBRATED_N), min(n_cur, MAX_CALIBRATED_N)
    rng = np.random.default_rng(20261126 + 1000 * n_base + n_cur)
    base = rng.standard_normal((CALIBRATION_DRAWS, n_base))
    cur = rng.standard_normal((CALIBRATION_DRAWS, n_cur))
    diff = np.median(cur, axis=1) - np.median(base, axis=1)
    if unit == "run":
        se = spread(base) * math.sqrt(1 + _c(n_base) / n_base)
    else:
        se = np.maximum(spread(base), spread(cur)) * math.sqrt(_c(n_cur) / n_cur + _c(n_base) / n_base)
    with np.errstate(divide="ignore", invalid="ignore"):
        stat = np.abs(diff) / se
    stat = np.where(np.isfinite(stat), stat, np.inf)
    return float(np.quantile(stat, 1 - 2 * tail(z)))


def tail(z: float) -> float:
    """One-sided Gaussian tail probability Φ̄(z) (scipy.stats would cost half a second of import)."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def _c(n: int) -> float:
    """Variance factor of a median of n values (the mean's is 1): exact for n ≤ 2, asymptotic above."""
    return 1.0 if n <= 2 else MEDIAN_VARIANCE


def _median(x: list[float]) -> float:
    """Median of a sorted list."""
    mid = len(x) // 2
    return x[mid] if len(x) % 2 else (x[mid - 1] + x[mid]) / 2
