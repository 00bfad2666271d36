"""History over nights for the report: suite-run medians per config and hardware, and the nights
`bench regress` would have flagged, each judged against its own earlier runs."""

from __future__ import annotations

import html
from collections import defaultdict
from typing import Any

from orchestrator.regress.check import Baseline, check
from orchestrator.regress.gate import Gate
from orchestrator.regress.metrics import METRICS
from orchestrator.regress.stats import summarize
from orchestrator.report import plots
from orchestrator.report.html import section

HISTORY_METRICS = ("decode_tok_s", "ttft_ms", "attainment_decode")


def history_section(rows: list[dict[str, Any]], labels: dict[str, str], order: list[str], gate: Gate,
                    baseline: Baseline) -> str:
    """Suite-run medians over time; every suite run is checked against its own earlier runs."""
    suite_runs = ordered_suite_runs(rows)
    if len(suite_runs) < 2:
        return section("History", "one suite run so far: history starts with the second", "", "")
    flagged = history_flags(rows, suite_runs, labels, baseline, gate)
    points: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["status"] == "ok" and r["hardware_key"]:
            points[(r["config_key"], r["hardware_key"], r["suite_run_id"])].append(r)
    ticks = []
    for sr in suite_runs:
        t = min(r["finished_at"] or r["started_at"] for r in rows if r["suite_run_id"] == sr)
        ticks.append(f"{t:%m-%d}")
    figures = []
    for m in HISTORY_METRICS:
        panels = []
        for ck in labels:
            series = []
            for hk in order:
                pts, regs, imps = [], [], []
                for t, sr in enumerate(suite_runs):
                    got = points.get((ck, hk, sr))
                    s = summarize([r[m] for r in got]) if got else None
                    if s is None:
                        continue
                    pts.append((t, s.median))
                    mark = flagged.get((sr, ck, hk, m))
                    (regs if mark == "regression" else imps if mark == "improvement" else []).append((t, s.median))
                if len(pts) > 0:
                    series.append(plots.Series(hk, pts, regs, imps))
            if series:
                panels.append((labels[ck], series))
        if panels:
            figures.append(f"<h3>{html.escape(METRICS[m].describe())}</h3>"
                           f"<img alt='history {m}' src='{plots.history(panels, METRICS[m].unit or m, order, ticks)}'>")
    note = (f"{len(suite_runs)} suite runs; points are suite-run medians; red ▼ regression, green ▲ improvement as "
            f"`bench regress` judged each night against its own baseline ({baseline.describe()}); at most "
            f"{plots.MAX_PANELS} configs per metric")
    return section("History over nights", note, "", "".join(figures))


def ordered_suite_runs(rows: list[dict[str, Any]]) -> list[str]:
    first: dict[str, Any] = {}
    for r in rows:
        t = r["finished_at"] or r["started_at"]
        if t is not None and (r["suite_run_id"] not in first or t < first[r["suite_run_id"]]):
            first[r["suite_run_id"]] = t
    return sorted(first, key=first.__getitem__)


def history_flags(rows: list[dict[str, Any]], suite_runs: list[str], labels: dict[str, str], baseline: Baseline,
                  gate: Gate) -> dict[tuple[str, str, str, str], str]:
    """(suite run, config key, hardware key, metric) → "regression" | "improvement", judging every
    suite run against its own earlier runs as `bench regress` would have that night."""
    flagged: dict[tuple[str, str, str, str], str] = {}
    for sr in suite_runs[1:]:
        for p in check(rows, sr, baseline=baseline, gate=gate, labels=labels).pairs:
            for f in p.findings:
                if f.verdict in ("regression", "improvement"):
                    flagged[(sr, p.config_key, p.hardware_key, f.metric.name)] = f.verdict
    return flagged
