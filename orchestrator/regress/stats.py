"""Robust statistics for benchmark samples, and the noise-aware change test of `bench regress`.

A metric of one (config, hardware) pair varies for two reasons, at two scales: from run to run
within a night (the repeats of one suite run: timer, page cache, a neighbour's burst), and from
night to night (a drifting disk, thermals, a reboot). The test estimates both from the history it
reads, as variance components: each night's repeats give the run-to-run spread σ_R (pooled over
all nights and tonight's repeats, as a two-sample test pools its groups: even a short history gives
it many degrees of freedom, and a wildly spread tonight widens its own error bar), and the spread
of the nights' means beyond what σ_R explains gives the night-to-night spread σ_N. Tonight's mean then
differs from the baseline's level by

    z = sign · (m_now − m_base) / sqrt(σ_N² (1 + 1/K) + σ_R² (1/r_now + 1/(K·r_base)))

for K baseline nights of r_base repeats and r_now repeats tonight. With an explicit baseline of one
suite run or commit (`unit="repeat"`) the baseline is one group: σ_N cannot be known, and the test
compares repeats. Means, not medians: with three repeats a night a mean has a third less variance,
and that is what lets a 15% change stand out of 5% run-to-run noise. Robust all the same: a value
beyond a night's median ± 4 σ (a warm page cache, a throttled SSD) is pulled in to that bound, and a
night mean beyond the nights' median ± 2.5 σ_MAD likewise, so one bad repeat or one bad night
cannot hide a change or make one.

Spreads estimated from a handful of nights are themselves noisy, so z is heavy-tailed: the critical
value is calibrated. `critical` simulates the very statistic under Gaussian noise with the same
shape (nights, repeats) and the same ratio of night to run noise as estimated (rounded up to a grid
point, so the calibration never assumes less night noise than measured) and returns its quantile at
the tail probability Φ̄(z): z = 3 means a 0.13% false-alarm rate per comparison at every history
size. The smallest change the test can flag (the minimum detectable effect, at 50% detection) is
`critical · se / |m_base|`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

MAD_TO_SIGMA = 1.4826  # σ of a normal distribution = 1.4826 · MAD
WINSOR = 2.5  # night means, and `summarize`: winsorize at median ± WINSOR · σ_MAD
CLIP = 4.0  # repeats: pull in values beyond their night's median ± CLIP · σ_90
Q90_TO_SIGMA = 1 / 1.6449  # σ of a normal distribution = its 90th percentile of |x| / 1.645
CALIBRATION_DRAWS = 40_000
MAX_CALIBRATED_NIGHTS = 40  # beyond this the statistic is close to its limit; calibrate at 40
LAMBDA_GRID = (0.0, 0.25, 1.0, 4.0, 16.0, math.inf)  # night-to-run variance ratio σ_N² / σ_R²
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
class Noise:
    """What the history says about a metric's noise: its level and the two spreads (absolute)."""

    level: float  # the baseline's level: winsorized mean of its night means
    run: float | None  # σ_R, run to run within a night (None: no night had two repeats)
    night: float  # σ_N, night to night beyond σ_R (with no σ_R: all of the nights' spread)
    nights: int
    repeats: float  # mean repeats per baseline night

    @property
    def ratio(self) -> float:
        """σ_N² / σ_R², the shape the calibration needs (∞ without σ_R): an upper confidence bound
        (90%) rather than the estimate, which from a few nights is often too low, and a calibration
        that assumes less night noise than there is raises the false-alarm rate."""
        if not self.run:
            return math.inf if self.night else 0.0
        if self.nights < 2:
            return 0.0
        between = self.night ** 2 + self.run ** 2 / self.repeats  # what the nights' means varied by
        upper = between * (self.nights - 1) / _chi2_lower(self.nights - 1, 0.10)
        return max(0.0, upper - self.run ** 2 / self.repeats) / self.run ** 2

    def to_dict(self) -> dict[str, float | int | None]:
        return {"level": self.level, "run_sd": self.run, "night_sd": self.night, "nights": self.nights,
                "repeats": self.repeats}


@dataclass(frozen=True)
class Change:
    """Current against baseline for one metric; `worse` and `z` are positive when it got worse."""

    baseline: Summary  # over the baseline's night means (unit "run") or its repeats (unit "repeat")
    current: Summary  # over the current repeats
    unit: Unit
    noise: float  # the standard error of the difference the z-score used
    rel: float  # (current − base) / |base| of the robust means, as measured
    worse: float  # rel, signed so that > 0 is worse
    z: float  # z-score, signed so that > 0 is worse
    critical: float  # |z| beyond this is beyond the noise (calibrated for these sample sizes)
    spreads: Noise | None = None
    base_level: float = 0.0
    now_level: float = 0.0

    @property
    def mde(self) -> float:
        """The smallest relative change this comparison flags half the time: critical · se / |base|."""
        return self.critical * self.noise / abs(self.base_level) if self.base_level else math.inf

    def to_dict(self) -> dict[str, object]:
        return {"baseline": self.baseline.to_dict(), "current": self.current.to_dict(), "unit": self.unit,
                "noise": self.noise, "rel": self.rel, "worse": self.worse, "z": self.z, "critical": self.critical,
                "mde": self.mde, "base_level": self.base_level, "now_level": self.now_level,
                "spreads": self.spreads.to_dict() if self.spreads else None}


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


# ---- the variance components ---------------------------------------------------------------------


def _clip_nights(nights: list[np.ndarray]) -> tuple[list[np.ndarray], float | None, float]:
    """Each night's repeats pulled in to its median ± CLIP σ_90, and the pooled run-to-run SD of the
    result (None when no night has two repeats). σ_90 comes from the 90th percentile of the pooled
    residuals, not their median: a rare wild repeat (under a tenth of them) is pulled in, while slow
    runs that happen often (a step stalled in a quarter of the runs) are part of the noise, and the
    SD keeps them; treating them as outliers would understate the noise and raise false alarms."""
    meds = [np.median(n) for n in nights]  # once per night: a nightly gate assesses thousands of these
    resid = np.concatenate([n - m for n, m in zip(nights, meds) if n.size >= 2] or [np.empty(0)])
    if resid.size == 0:
        return nights, None, math.inf
    bound = CLIP * Q90_TO_SIGMA * float(np.quantile(np.abs(resid), 0.9))
    clipped = [np.clip(n, m - bound, m + bound) for n, m in zip(nights, meds)]
    df = sum(n.size - 1 for n in clipped if n.size >= 2)
    ss = sum(float(((n - n.mean()) ** 2).sum()) for n in clipped if n.size >= 2)
    return clipped, math.sqrt(ss / df), bound


def noise_of(baseline_runs: Sequence[Sequence[float | None]],
             current: Sequence[float] = ()) -> tuple[Noise, float] | None:
    """The level and spreads of a baseline (one list of repeats per night; `current`'s repeats join
    the pooled run-to-run spread), and tonight's clipped mean; None without data."""
    nights = [np.array([v for v in r if v is not None and math.isfinite(v)], dtype=float) for r in baseline_runs]
    nights = [n for n in nights if n.size]
    if not nights:
        return None
    cur = np.array(list(current), dtype=float)
    clipped, run, bound = _clip_nights(nights + ([cur] if cur.size else []))
    if cur.size:
        mid = np.median(cur)
        now = float(np.clip(cur, mid - bound, mid + bound).mean())
    else:
        now = math.nan
    clipped = clipped[:len(nights)]
    means = np.array([n.mean() for n in clipped])
    level, between = _winsorized(means)
    inv_r = float(np.mean([1 / n.size for n in clipped]))
    night = math.sqrt(max(0.0, between ** 2 - (run ** 2 * inv_r if run else 0.0)))
    return Noise(level, run, night, len(nights), float(np.mean([n.size for n in clipped]))), now


def _winsorized(x: np.ndarray) -> tuple[float, float]:
    """Winsorized mean and SD of a 1-D sample (SD 0 for one value)."""
    if x.size < 2:
        return float(x.mean()), 0.0
    med = np.median(x)
    bound = WINSOR * MAD_TO_SIGMA * np.median(np.abs(x - med))
    w = np.clip(x, med - bound, med + bound)
    return float(w.mean()), float(w.std(ddof=1))


def assess(baseline_runs: Sequence[Sequence[float | None]], current: Sequence[float | None], sign: int, *,
           z: float = 3.0, unit: Unit = "run", min_runs: int = 5, min_values: int = 3,
           noise_floor: float = 0.0005) -> Change | None:
    """The change test of `current` (one night's repeats) against `baseline_runs` (one list per earlier
    night); None without enough data: fewer than `min_runs` nights for unit "run", fewer than
    `min_values` values for unit "repeat" (the baseline is then one group). `sign` is +1 when a rise is
    worse, -1 when a fall is. The standard error is at least `noise_floor` of the baseline level, so
    identical values do not make every change significant."""
    cur_values = [v for v in current if v is not None and math.isfinite(v)]
    if not cur_values:
        return None
    if unit == "repeat":
        baseline_runs = [[v for r in baseline_runs for v in r]]
    found = noise_of(baseline_runs, cur_values)
    if found is None:
        return None
    spreads, now = found
    if unit == "run" and spreads.nights < min_runs:
        return None
    if unit == "repeat" and sum(1 for r in baseline_runs for v in r if v is not None) < min_values:
        return None
    k, r_base, r_now = spreads.nights, max(1, round(spreads.repeats)), len(cur_values)
    se = _standard_error(spreads, k, r_now, unit)
    se = max(se, noise_floor * abs(spreads.level))
    diff = now - spreads.level
    rel = diff / abs(spreads.level) if spreads.level else (math.copysign(math.inf, diff) if diff else 0.0)
    score = sign * diff / se if se > 0 else (math.copysign(math.inf, sign * diff) if diff else 0.0)
    crit = critical(z, unit, k if unit == "run" else r_base, r_now, r_base=r_base, ratio=spreads.ratio)
    base_summary = summarize(baseline_runs[0]) if unit == "repeat" else summarize(
        [float(np.mean([v for v in r if v is not None])) for r in baseline_runs if any(v is not None for v in r)])
    return Change(base_summary, summarize(cur_values), unit, se, rel, sign * rel, score, crit, spreads,
                  spreads.level, now)


def _standard_error(s: Noise, k: int, r_now: int, unit: Unit) -> float:
    if unit == "repeat" or s.run is None:
        if s.run is None:  # single runs per night: the nights' whole spread, for tonight and the level
            return s.night * math.sqrt(1 + 1 / k)
        return s.run * math.sqrt(1 / r_now + 1 / (k * s.repeats))
    return math.sqrt(s.night ** 2 * (1 + 1 / k) + s.run ** 2 * (1 / r_now + 1 / (k * s.repeats)))


# ---- calibration ---------------------------------------------------------------------------------


def critical(z: float, unit: Unit, n_base: int, n_cur: int, r_base: int = 1, ratio: float = math.inf) -> float:
    """The value |z| exceeds with probability 2 Φ̄(z) under Gaussian noise, for this shape: `n_base`
    baseline nights of `r_base` repeats (unit "repeat": one group of `n_base` values), `n_cur`
    repeats tonight, night-to-run variance `ratio` (rounded up to the grid: never assume less night
    noise than measured)."""
    if unit == "repeat":
        n_base, r_base, ratio = 1, max(1, n_base), 0.0
    grid = next(g for g in LAMBDA_GRID if g >= ratio - 1e-12) if r_base > 1 else math.inf
    return _critical(round(z, 4), unit, min(n_base, MAX_CALIBRATED_NIGHTS), min(n_cur, 12), min(r_base, 12), grid)


@functools.lru_cache(maxsize=512)
def _critical(z: float, unit: Unit, k: int, r_now: int, r_base: int, ratio: float) -> float:
    rng = np.random.default_rng(20261201 + 1009 * k + 101 * r_now + 11 * r_base)
    night_sd, run_sd = (1.0, 0.0) if math.isinf(ratio) else (math.sqrt(ratio), 1.0)
    n = CALIBRATION_DRAWS
    base = rng.standard_normal((n, k, 1)) * night_sd + rng.standard_normal((n, k, r_base)) * run_sd
    cur = rng.standard_normal((n, 1)) * night_sd + rng.standard_normal((n, r_now)) * run_sd
    stat = np.abs(_statistic(base, cur, unit))
    stat = np.where(np.isfinite(stat), stat, np.inf)
    return float(np.quantile(stat, 1 - 2 * tail(z)))


def _statistic(base: np.ndarray, cur: np.ndarray, unit: Unit) -> np.ndarray:
    """`assess`'s z for many draws at once: base (N, K, r_base), cur (N, r_now) → (N,)."""
    n, k, r = base.shape
    if unit == "repeat":
        base = base.reshape(n, 1, k * r)
        k, r = 1, k * r
    r_now = cur.shape[1]
    med = np.median(base, axis=2, keepdims=True)  # (N, K, 1)
    cmed = np.median(cur, axis=1, keepdims=True)  # (N, 1)
    run = None
    if r >= 2 or r_now >= 2:  # the pooled run-to-run spread: every group with two values or more
        resid = [np.abs(base - med).reshape(n, -1)] if r >= 2 else []
        resid += [np.abs(cur - cmed)] if r_now >= 2 else []
        bound = CLIP * Q90_TO_SIGMA * np.quantile(np.concatenate(resid, axis=1), 0.9, axis=1)  # (N,)
        base = np.clip(base, med - bound[:, None, None], med + bound[:, None, None])
        cur = np.clip(cur, cmed - bound[:, None], cmed + bound[:, None])
        ss = ((base - base.mean(axis=2, keepdims=True)) ** 2).sum(axis=(1, 2)) if r >= 2 else 0.0
        ss = ss + (((cur - cur.mean(axis=1, keepdims=True)) ** 2).sum(axis=1) if r_now >= 2 else 0.0)
        run = np.sqrt(ss / (k * (r - 1) + max(r_now - 1, 0)))  # (N,)
    means = base.mean(axis=2)  # (N, K)
    if k >= 2:
        mmed = np.median(means, axis=1, keepdims=True)
        mb = WINSOR * MAD_TO_SIGMA * np.median(np.abs(means - mmed), axis=1, keepdims=True)
        w = np.clip(means, mmed - mb, mmed + mb)
        level, between = w.mean(axis=1), w.std(axis=1, ddof=1)
    else:
        level, between = means[:, 0], np.zeros(n)
    now = cur.mean(axis=1)
    if run is None:
        se = between * math.sqrt(1 + 1 / k)
    elif unit == "repeat":
        se = run * math.sqrt(1 / r_now + 1 / (k * r))
    else:
        night2 = np.maximum(0.0, between ** 2 - run ** 2 / r)  # r = 1 nights: all of it may be night noise
        se = np.sqrt(night2 * (1 + 1 / k) + run ** 2 * (1 / r_now + 1 / (k * r)))
    with np.errstate(divide="ignore", invalid="ignore"):
        return (now - level) / se


def _chi2_lower(df: int, p: float) -> float:
    """The p-quantile of χ²(df) (Wilson–Hilferty; within a few percent from df = 2 on)."""
    zp = -1.2815515655446004 if p == 0.10 else _normal_quantile(p)
    c = 2 / (9 * df)
    return max(df * (1 - c + zp * math.sqrt(c)) ** 3, 1e-9)


def _normal_quantile(p: float) -> float:
    lo, hi = -10.0, 10.0
    for _ in range(80):  # bisection on Φ: no scipy for one number
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 1 - tail(mid) < p else (lo, mid)
    return (lo + hi) / 2


def tail(z: float) -> float:
    """One-sided Gaussian tail probability Φ̄(z) (scipy.stats would cost half a second of import)."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def _median(x: list[float]) -> float:
    """Median of a sorted list."""
    mid = len(x) // 2
    return x[mid] if len(x) % 2 else (x[mid - 1] + x[mid]) / 2
