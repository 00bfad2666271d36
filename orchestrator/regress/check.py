"""`bench regress`: does the newest suite run regress against earlier runs of the same work?

For each (config_key, hardware_key) of the candidate suite run (default: the newest one), the
baseline is earlier successful runs of exactly that pair — never another host's hardware, never
another config — chosen by `Baseline` (the last N suite runs, the last D days, one commit, or one
explicit suite run). Each metric the gate checks is tested against the pair's own noise
(orchestrator.regress.stats: run-to-run and night-to-night spread from the history, a calibrated
critical value); a change is a regression only when it is beyond that noise AND beyond the metric's
practical floor (2% by default) in its worse direction. The same in the better direction is an
improvement; beyond the floor but within the noise is "noisy" and does not fail the gate. Every
comparison also says what the gate can see there: the minimum detectable effect (the larger of
the noise's and the floor), and a pair with too little history how many more nights it needs. A
pair whose runs all failed tonight while its baseline ran is a regression too: a gate that passes
when everything crashes is no gate. Rows of bisections (suites ending in `.bisect`) never form a
baseline: they mix good and bad commits.

Exit codes: 0 no regression, 1 regression, 3 not enough data (nothing could be compared, or with
`strict` any pair lacked a baseline); bad input stays 2 (UserError).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable, Literal

import pyarrow as pa

from orchestrator.regress.changepoints import ChangePoint, pair_change_points
from orchestrator.regress.gate import Gate
from orchestrator.regress.metrics import METRICS, Metric
from orchestrator.regress.stats import Change, assess
from orchestrator.results.query import COLUMNS, config_labels, newest_suite_run, to_rows
from orchestrator.results.store import read_results
from worker.errors import UserError

log = logging.getLogger(__name__)

Verdict = Literal["regression", "improvement", "noisy", "ok"]
EXIT_OK, EXIT_REGRESSION, EXIT_NO_DATA = 0, 1, 3
BISECT_SUFFIX = ".bisect"  # suites `bench bisect` writes: runs of good and bad commits mixed, never a baseline


@dataclass(frozen=True)
class Baseline:
    """Which earlier runs form the baseline. `commit` / `suite_run_id` pick explicitly (any time
    before or after, but never the candidate itself); otherwise the last `window` suite runs before
    the candidate, within `days` when given."""

    window: int | None = 14
    days: float | None = None
    commit: str | None = None
    suite_run_id: str | None = None

    def describe(self) -> str:
        if self.suite_run_id:
            return f"suite run {self.suite_run_id}"
        parts = [f"commit {self.commit[:10]}"] if self.commit else []
        if self.window:
            parts.append(f"last {self.window} suite runs")
        if self.days:
            parts.append(f"within {self.days:g} days")
        return ", ".join(parts) or "all earlier runs"


@dataclass(frozen=True)
class Finding:
    """One metric of one (config, hardware) pair."""

    metric: Metric
    threshold: float
    change: Change
    verdict: Verdict

    @property
    def detectable(self) -> float:
        """The smallest relative change this comparison flags (half the time): noise or floor."""
        return max(self.change.mde, self.threshold)

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric.name, "better": self.metric.better, "threshold": self.threshold,
                "verdict": self.verdict, "detectable": self.detectable, **self.change.to_dict()}


@dataclass
class PairCheck:
    """The candidate's runs of one (config_key, hardware_key) against their baseline."""

    config_key: str
    hardware_key: str
    label: str
    status: Literal["checked", "no-baseline", "failed"]
    n_ok: int
    n_failed: int
    baseline_runs: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    needs: int = 0  # more baseline nights before the pair can be checked (0: enough, or checked)

    def of(self, verdict: Verdict) -> list[Finding]:
        return [f for f in self.findings if f.verdict == verdict]

    def to_dict(self) -> dict[str, Any]:
        return {"config_key": self.config_key, "hardware_key": self.hardware_key, "label": self.label,
                "status": self.status, "n_ok": self.n_ok, "n_failed": self.n_failed,
                "baseline_runs": self.baseline_runs, "errors": self.errors, "needs_nights": self.needs,
                "findings": [f.to_dict() for f in self.findings]}


@dataclass
class RegressReport:
    suite: str | None
    suite_run_id: str | None
    commits: list[str]
    started_at: datetime | None
    baseline: Baseline
    gate: Gate
    strict: bool = False
    pairs: list[PairCheck] = field(default_factory=list)
    unkeyed_failures: list[dict[str, Any]] = field(default_factory=list)  # failed before reaching a host
    changes: dict[tuple[str, str], list[ChangePoint]] | None = None  # --history: per pair, over all nights

    def findings(self, verdict: Verdict) -> list[tuple[PairCheck, Finding]]:
        return [(p, f) for p in self.pairs for f in p.of(verdict)]

    @property
    def failed_pairs(self) -> list[PairCheck]:
        return [p for p in self.pairs if p.status == "failed"]

    @property
    def exit_code(self) -> int:
        if self.findings("regression") or self.failed_pairs:
            return EXIT_REGRESSION
        checked = [p for p in self.pairs if p.status == "checked"]
        if not checked or (self.strict and len(checked) < len(self.pairs)):
            return EXIT_NO_DATA
        return EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        return {"suite": self.suite, "suite_run_id": self.suite_run_id, "commits": self.commits,
                "started_at": self.started_at, "baseline": self.baseline.describe(), "gate": self.gate.to_dict(),
                "exit_code": self.exit_code, "regressions": len(self.findings("regression")) + len(self.failed_pairs),
                "improvements": len(self.findings("improvement")), "pairs": [p.to_dict() for p in self.pairs],
                "unkeyed_failures": [{k: r[k] for k in ("run_id", "error")} for r in self.unkeyed_failures],
                "change_points": None if self.changes is None else [
                    {"config_key": ck, "hardware_key": hk, **c.to_dict()}
                    for (ck, hk), cs in self.changes.items() for c in cs]}


def regress(uri: str | None, *, suite: str | None = None, suite_run_id: str | None = None,
            baseline: Baseline = Baseline(), gate: Gate | Callable[[str | None], Gate] = Gate(),
            strict: bool = False, history: bool = False) -> RegressReport:
    """Read the dataset at `uri` and check one suite run (default: the newest of `suite`, or overall);
    `history` adds the change points of every checked metric over each of its pairs' whole history.

    `gate` may be a function of the candidate's suite name (its thresholds live in the suite). One
    pass over the dataset: every filter of read_results scans every file anyway, and the baseline
    may come from any suite that ran the same config on the same hardware.
    """
    rows = to_rows(read_results(uri, columns=list(COLUMNS)))
    if suite_run_id is None:
        suite_run_id = newest_suite_run([r for r in rows if suite is None or r["suite"] == suite])
    elif not any(r["suite_run_id"] == suite_run_id for r in rows):
        raise UserError(f"suite run {suite_run_id!r} is not in the results dataset; `bench results` lists them")
    of_suite = next((r["suite"] for r in rows if r["suite_run_id"] == suite_run_id), suite)
    gate = gate(of_suite) if callable(gate) else gate
    if suite_run_id is None:
        return RegressReport(suite, None, [], None, baseline, gate, strict)
    report = check(rows, suite_run_id, baseline=baseline, gate=gate, strict=strict)
    if history:
        pairs = {(p.config_key, p.hardware_key) for p in report.pairs}
        mine = [r for r in rows if (r["config_key"], r["hardware_key"]) in pairs]
        report.changes = pair_change_points(mine, list(gate.thresholds), gate)
    return report


def check(rows: list[dict[str, Any]] | pa.Table, suite_run_id: str, *, baseline: Baseline = Baseline(),
          gate: Gate = Gate(), strict: bool = False, labels: dict[str, str] | None = None) -> RegressReport:
    """Check suite run `suite_run_id` against the other rows of `rows` (no I/O)."""
    if isinstance(rows, pa.Table):
        rows = to_rows(rows)
    candidate = [r for r in rows if r["suite_run_id"] == suite_run_id]
    if not candidate:
        raise UserError(f"suite run {suite_run_id!r} has no rows")
    starts = [r["started_at"] or r["finished_at"] for r in candidate if (r["started_at"] or r["finished_at"])]
    start = min(starts) if starts else None
    commits = sorted({r["git_commit"] for r in candidate if r["git_commit"]})
    report = RegressReport(candidate[0]["suite"], suite_run_id, commits, start, baseline, gate, strict)
    labels = labels or config_labels(candidate)
    pool = _baseline_pool(rows, suite_run_id, start, baseline)
    by_pair: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in candidate:
        if r["hardware_key"] is None:
            report.unkeyed_failures.append(r)
        else:
            by_pair[(r["config_key"], r["hardware_key"])].append(r)
    for (ck, hk), runs in sorted(by_pair.items(), key=lambda kv: (labels.get(kv[0][0], ""), kv[0][1])):
        report.pairs.append(_check_pair(ck, hk, labels.get(ck, ck), runs, pool.get((ck, hk), []), baseline, gate))
    return report


def _baseline_pool(rows: list[dict[str, Any]], candidate: str, start: datetime | None,
                   baseline: Baseline) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Ok rows that may form a baseline, by (config_key, hardware_key)."""
    explicit = baseline.suite_run_id or baseline.commit
    pool: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["status"] != "ok" or r["suite_run_id"] == candidate or not r["hardware_key"]:
            continue
        if (r.get("suite") or "").endswith(BISECT_SUFFIX):
            continue
        t = r["finished_at"] or r["started_at"]
        if baseline.suite_run_id and r["suite_run_id"] != baseline.suite_run_id:
            continue
        if baseline.commit and not (r["git_commit"] or "").startswith(baseline.commit):
            continue
        if not explicit and (start is None or t is None or t >= start):
            continue
        if baseline.days and start is not None and (t is None or t < start - timedelta(days=baseline.days)):
            continue
        pool[(r["config_key"], r["hardware_key"])].append(r)
    return pool


def _check_pair(ck: str, hk: str, label: str, runs: list[dict[str, Any]], pool: list[dict[str, Any]],
                baseline: Baseline, gate: Gate) -> PairCheck:
    ok = [r for r in runs if r["status"] == "ok"]
    failed = [r for r in runs if r["status"] != "ok"]
    by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in pool:
        by_run[r["suite_run_id"]].append(r)
    order = sorted(by_run, key=lambda s: max(r["finished_at"] or r["started_at"] for r in by_run[s]))
    if baseline.window and not baseline.suite_run_id:
        order = order[-baseline.window:]
    pc = PairCheck(ck, hk, label, "no-baseline", len(ok), len(failed), order,
                   errors=sorted({r["error"] or "failed (no reason recorded)" for r in failed}))
    if not ok:
        pc.status = "failed" if order else "no-baseline"
        return pc
    # nights are the unit; an explicit baseline of fewer runs than a night-level test needs: its repeats
    explicit = baseline.suite_run_id or baseline.commit
    unit = "repeat" if explicit and len(order) < gate.min_runs else "run"
    for name, threshold in gate.thresholds.items():
        m = METRICS[name]
        change = assess([[r[name] for r in by_run[s]] for s in order], [r[name] for r in ok], m.sign, z=gate.z,
                        unit=unit, min_runs=gate.min_runs, min_values=gate.min_values, noise_floor=gate.noise_floor)
        if change is not None:
            pc.findings.append(Finding(m, threshold, change, verdict(change, threshold)))
    if pc.findings:
        pc.status = "checked"
    elif unit == "run":
        pc.needs = max(0, gate.min_runs - len(order))
    return pc


def verdict(change: Change, threshold: float) -> Verdict:
    """Both conditions, in the same direction: beyond the relative threshold and beyond the noise."""
    if change.worse > threshold and change.z > change.critical:
        return "regression"
    if -change.worse > threshold and -change.z > change.critical:
        return "improvement"
    if abs(change.worse) > threshold:
        return "noisy"
    return "ok"
