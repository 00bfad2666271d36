"""Robust statistics for benchmark samples: median and MAD summaries, and a noise-aware change test.

Why median/MAD: benchmark samples are small (a few repeats, a few nights) and have outliers (a page
cache that was warm, a neighbour job, a throttled SSD). One wild value moves a mean and inflates a
standard deviation enough to hide a real change; it barely moves a median or a MAD.

The change test (`assess`) is a robust z-score. The unit of replication is the suite run (a night):
repeats inside one night share that night's conditions, so nights vary more than repeats do, and a
test that pooled repeats would call ordinary night-to-night drift significant. With at least
`min_runs` baseline suite runs:

    base  = median of the baseline runs' medians        σ = 1.4826 · MAD of those run medians
    z     = (median(current) − base) / (σ · √(1 + c/k))   k baseline runs, c = π/2 (k ≥ 3)

(c/k is the variance of a median of k values relative to one value.) With fewer baseline runs — an
explicit single baseline run, or the first nights of a new config — it falls back to the repeats:
σ is the larger of the baseline's and the current run's MAD-σ, and the denominator is
σ · √(c/n_current + c/n_baseline). Either way σ is floored at `noise_floor` × |base| so that
identical values (a deterministic metric, a quantised timer) do not make any change "significant".
z is oriented so that positive means worse for the metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

MAD_TO_SIGMA = 1.4826  # σ of a normal distribution = 1.4826 · MAD
MEDIAN_VARIANCE = math.pi / 2  # var(median of n) ≈ (π/2) σ²/n for normal data, n ≥ 3


@dataclass(frozen=True)
class Summary:
    """Median, robust σ (1.4826 · MAD), range and count of a sample."""

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
    unit: Literal["run", "repeat"]
    noise: float  # the σ the z-score used
    rel: float  # (current − base) / |base|, as measured
    worse: float  # rel, signed so that > 0 is worse
    z: float  # robust z-score, signed so that > 0 is worse

    def to_dict(self) -> dict[str, object]:
        return {"baseline": self.baseline.to_dict(), "current": self.current.to_dict(), "unit": self.unit,
                "noise": self.noise, "rel": self.rel, "worse": self.worse, "z": self.z}


def summarize(values: Sequence[float]) -> Summary | None:
    """Summary of the finite values; None when there are none."""
    x = _finite(values)
    if x.size == 0:
        return None
    med = float(np.median(x))
    return Summary(int(x.size), med, MAD_TO_SIGMA * float(np.median(np.abs(x - med))), float(x.min()), float(x.max()))


def assess(baseline_runs: Sequence[Sequence[float]], current: Sequence[float], sign: int, *, min_runs: int = 3,
           min_values: int = 3, noise_floor: float = 0.005) -> Change | None:
    """Robust z-test of `current` (one run's repeats) against earlier runs; None without enough data.

    `baseline_runs` holds one list of values per baseline suite run; `sign` is +1 when a rise is worse
    and -1 when a fall is worse. See the module docstring for the method.
    """
    cur = summarize(current)
    runs = [s for s in (summarize(r) for r in baseline_runs) if s is not None]
    if cur is None or not runs:
        return None
    if len(runs) >= min_runs:
        base = summarize([s.median for s in runs])
        assert base is not None
        unit: Literal["run", "repeat"] = "run"
        noise = max(base.sigma, noise_floor * abs(base.median))
        se = noise * math.sqrt(1 + _c(base.n) / base.n)
    else:
        pooled = [v for r in baseline_runs for v in _finite(r)]
        base = summarize(pooled)
        if base is None or base.n < min_values:
            return None
        unit = "repeat"
        noise = max(base.sigma, cur.sigma if cur.n >= 3 else 0.0, noise_floor * abs(base.median))
        se = noise * math.sqrt(_c(cur.n) / cur.n + _c(base.n) / base.n)
    diff = cur.median - base.median
    rel = diff / abs(base.median) if base.median else math.copysign(math.inf, diff) if diff else 0.0
    z = sign * diff / se if se > 0 else (math.copysign(math.inf, sign * diff) if diff else 0.0)
    return Change(base, cur, unit, noise, rel, sign * rel, z)


def _c(n: int) -> float:
    """Variance factor of a median of n values (the mean's is 1): exact for n ≤ 2, asymptotic above."""
    return 1.0 if n <= 2 else MEDIAN_VARIANCE


def _finite(values: Sequence[float]) -> np.ndarray:
    x = np.asarray([v for v in values if v is not None], dtype=float)
    return x[np.isfinite(x)]
