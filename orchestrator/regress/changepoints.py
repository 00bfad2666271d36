"""When did it change: change points over the whole history of a (config, hardware) pair.

A night-to-night gate sees tonight against its window; a slow drift, or a step that the window has
already absorbed, it cannot date. Change points can: over every night of the pair, where does the
level move to a new one, and which suite run (and commit) does the new level begin with?

Candidates come from a well-kept library, ruptures (BSD, releases through 2025): PELT over the
nights' means with a linear kernel (`KernelCPD(kernel="linear")`, a change in mean), on the series
standardised by its own night-to-night noise, estimated from successive differences (which a step
barely moves) with a BIC-like penalty. The approach follows the E-Divisive work of MongoDB's and
Apache Otava's performance CI, but neither of their packages installs cleanly next to this project's
stack: apache-otava 0.8 pins numpy 2.2 and scipy < 1.17 and pulls BigQuery, Postgres and Slack
clients; MongoDB's signal-processing-algorithms needs numpy < 2 and a C build. On synthetic nights (a
3% step at 0.2% noise, 15% at 5%) ruptures found the same steps as Otava's E-Divisive. A candidate is
kept only when the nights after it differ from the nights before it beyond the gate's own noise test
and the metric's practical floor (orchestrator.regress.stats), so a change point means what a
regression means, in either direction.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from orchestrator.regress.gate import Gate
from orchestrator.regress.metrics import METRICS
from orchestrator.regress.stats import assess

PENALTY = 3.0  # × log(nights), on the series in units of its night-to-night noise
MIN_SEGMENT = 2  # nights: one odd night is an outlier, not a new level


@dataclass(frozen=True)
class ChangePoint:
    """The level of `metric` changed from `before` to `after`, beginning with `suite_run_id`."""

    metric: str
    index: int  # the first night (0-based, oldest first) of the new level
    suite_run_id: str
    started_at: datetime | None
    commit: str | None
    before: float
    after: float
    rel: float
    worse: bool
    z: float
    critical: float

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "index": self.index, "suite_run_id": self.suite_run_id,
                "started_at": self.started_at, "commit": self.commit, "before": self.before, "after": self.after,
                "rel": self.rel, "worse": self.worse, "z": self.z, "critical": self.critical}


@dataclass(frozen=True)
class Night:
    suite_run_id: str
    started_at: datetime | None
    commit: str | None
    values: list[float]


def nights_of(rows: list[dict[str, Any]], metric: str) -> list[Night]:
    """The pair's ok runs of `metric` by suite run, oldest first (rows of one pair)."""
    by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["status"] == "ok" and r.get(metric) is not None and math.isfinite(r[metric]):
            by_run[r["suite_run_id"]].append(r)
    out = []
    for sr, rs in by_run.items():
        t = min((r["started_at"] or r["finished_at"] for r in rs if r["started_at"] or r["finished_at"]), default=None)
        commits = sorted({r["git_commit"] for r in rs if r["git_commit"]})
        out.append(Night(sr, t, commits[0] if len(commits) == 1 else None, [float(r[metric]) for r in rs]))
    return sorted(out, key=lambda n: (n.started_at is None, n.started_at or datetime.min, n.suite_run_id))


def change_points(rows: list[dict[str, Any]], metric: str, gate: Gate = Gate()) -> list[ChangePoint]:
    """Change points of `metric` over the rows of one (config, hardware) pair (see the module docstring)."""
    nights = nights_of(rows, metric)
    if len(nights) < 2 * MIN_SEGMENT:
        return []
    means = np.array([np.mean(n.values) for n in nights])
    cuts = _candidates(means)
    m = METRICS[metric]
    floor = gate.thresholds.get(metric, 0.0)
    out, bounds = [], [0, *cuts, len(nights)]
    for prev, cut, nxt in zip(bounds, bounds[1:], bounds[2:]):
        change = assess([n.values for n in nights[prev:cut]], [v for n in nights[cut:nxt] for v in n.values],
                        m.sign, z=gate.z, min_runs=MIN_SEGMENT, noise_floor=gate.noise_floor)
        if change is None or abs(change.rel) <= floor or abs(change.z) <= change.critical:
            continue
        first = nights[cut]
        out.append(ChangePoint(metric, cut, first.suite_run_id, first.started_at, first.commit, change.base_level,
                               change.now_level, change.rel, change.worse > 0, change.z, change.critical))
    return out


def _candidates(means: np.ndarray) -> list[int]:
    """Indices where a new level begins, by ruptures' PELT on the standardised series."""
    import ruptures

    scale = 1.4826 * float(np.median(np.abs(np.diff(means)))) / math.sqrt(2)
    if not scale or not math.isfinite(scale):
        scale = float(np.std(means)) or 1.0
    x = ((means - np.median(means)) / scale).reshape(-1, 1)
    algo = ruptures.KernelCPD(kernel="linear", min_size=MIN_SEGMENT).fit(x)
    return [int(b) for b in algo.predict(pen=PENALTY * math.log(len(means)))[:-1]]


def pair_change_points(rows: list[dict[str, Any]], metrics: list[str], gate: Gate = Gate()
                       ) -> dict[tuple[str, str], list[ChangePoint]]:
    """(config_key, hardware_key) → its change points over `metrics`, for every pair in `rows`."""
    by_pair: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["hardware_key"] and not (r["suite"] or "").endswith(".bisect"):
            by_pair[(r["config_key"], r["hardware_key"])].append(r)
    return {pair: [c for m in metrics for c in change_points(rs, m, gate)] for pair, rs in by_pair.items()}
