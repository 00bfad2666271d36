"""History over nights, as plain data for the report: suite-run medians per config and hardware, the
nights `bench regress` would have flagged, each judged against its own earlier runs, and the change
points of each pair over its whole history (orchestrator.regress.changepoints).

The x axis is the suite runs in the order they started (`suite_run_starts`), evenly spaced: nights
are what a reader compares, and a night that ran late should not look like a gap.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from orchestrator.regress.changepoints import ChangePoint, pair_change_points
from orchestrator.regress.check import Baseline, check
from orchestrator.regress.gate import Gate
from orchestrator.regress.stats import summarize

HISTORY_METRICS = ("decode_tok_s", "ttft_ms", "attainment_decode")

# (suite run, config key, hardware key, metric) → "regression" | "improvement"
Flags = dict[tuple[str, str, str, str], str]


@dataclass(frozen=True)
class Series:
    """One line of a history panel: (suite-run index, median) points of one hardware key, with the
    points `bench regress` flagged."""

    hardware: str
    points: list[tuple[int, float]]
    regressions: list[tuple[int, float]]
    improvements: list[tuple[int, float]]
    changes: list[tuple[int, bool]] = ()  # change points: (suite-run index of the new level, worse?)


@dataclass(frozen=True)
class History:
    """Everything the report draws for history: one panel per config per metric."""

    starts: dict[str, datetime]  # suite run id → its first timestamp, oldest first
    panels: dict[str, list[tuple[str, list[Series]]]]  # metric → (config key, a series per hardware key)
    changes: dict[tuple[str, str], list[ChangePoint]]  # (config key, hardware key) → over the history metrics


def collect_history(rows: list[dict[str, Any]], labels: dict[str, str], order: list[str], gate: Gate,
                    baseline: Baseline) -> History:
    """The history of `rows`: configs in `labels` order, hardware keys in `order`."""
    starts = suite_run_starts(rows)
    suite_runs = list(starts)
    flags = history_flags(rows, suite_runs, labels, baseline, gate)
    changes = pair_change_points(rows, list(HISTORY_METRICS), gate)
    panels = {m: metric_panels(m, suite_run_medians(rows, m), suite_runs, flags, list(labels), order, changes)
              for m in HISTORY_METRICS}
    return History(starts, panels, changes)


def suite_run_starts(rows: list[dict[str, Any]]) -> dict[str, datetime]:
    """Suite run id → its earliest timestamp, oldest first (rows without one are left out)."""
    first: dict[str, datetime] = {}
    for r in rows:
        t = r["finished_at"] or r["started_at"]
        if t is not None and (r["suite_run_id"] not in first or t < first[r["suite_run_id"]]):
            first[r["suite_run_id"]] = t
    return dict(sorted(first.items(), key=lambda kv: kv[1]))


def history_flags(rows: list[dict[str, Any]], suite_runs: list[str], labels: dict[str, str], baseline: Baseline,
                  gate: Gate) -> Flags:
    """(suite run, config key, hardware key, metric) → "regression" | "improvement", judging every
    suite run against its own earlier runs as `bench regress` would have that night."""
    flagged: Flags = {}
    for sr in suite_runs[1:]:
        for p in check(rows, sr, baseline=baseline, gate=gate, labels=labels).pairs:
            flagged.update({(sr, p.config_key, p.hardware_key, f.metric.name): f.verdict for f in p.findings
                            if f.verdict in ("regression", "improvement")})
    return flagged


def suite_run_medians(rows: list[dict[str, Any]], metric: str) -> dict[tuple[str, str], dict[str, float]]:
    """(config key, hardware key) → suite run id → the median of `metric` over that suite run's ok rows."""
    values: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in rows:
        if r["status"] == "ok" and r["hardware_key"]:
            values[(r["config_key"], r["hardware_key"], r["suite_run_id"])].append(r[metric])
    medians: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for (ck, hk, sr), vs in values.items():
        s = summarize(vs)
        if s is not None:
            medians[(ck, hk)][sr] = s.median
    return medians


def metric_panels(metric: str, medians: dict[tuple[str, str], dict[str, float]], suite_runs: list[str],
                  flags: Flags, configs: list[str], order: list[str],
                  changes: dict[tuple[str, str], list[ChangePoint]] | None = None) -> list[tuple[str, list[Series]]]:
    """One panel per config with a median of `metric`: (config key, a series per hardware key)."""
    panels, index = [], {sr: t for t, sr in enumerate(suite_runs)}
    for ck in configs:
        lines = [series(ck, hk, metric, medians.get((ck, hk), {}), suite_runs, flags,
                        [(index[c.suite_run_id], c.worse) for c in (changes or {}).get((ck, hk), [])
                         if c.metric == metric and c.suite_run_id in index]) for hk in order]
        if any(s.points for s in lines):
            panels.append((ck, [s for s in lines if s.points]))
    return panels


def series(config: str, hardware: str, metric: str, medians: dict[str, float], suite_runs: list[str],
           flags: Flags, changes: list[tuple[int, bool]] = ()) -> Series:
    """One hardware key's line: its suite-run medians at their suite run's index, those flagged, and
    where its level changed."""
    points = [(t, medians[sr]) for t, sr in enumerate(suite_runs) if sr in medians]
    verdicts = [flags.get((suite_runs[t], config, hardware, metric)) for t, _ in points]
    return Series(hardware, points, [p for p, v in zip(points, verdicts) if v == "regression"],
                  [p for p, v in zip(points, verdicts) if v == "improvement"], list(changes))
