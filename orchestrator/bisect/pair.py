"""What `bench bisect` bisects, read from the results dataset: the pair, its metric, good and bad.

A pair is one (config_key, hardware_key). Default: the newest regressed pair of the newest suite run
(`bench regress`'s check, orchestrator.regress.check), the metric its regression is in (decode_ms
when that is one of them). The default good and bad commits come from the pair's own suite runs: the
newest suite run is bad; walking back, a suite run whose median is closer to the bad median than to
the baseline's (the runs `bench regress` compared against) is bad too; the first bad suite run's
`git_commit` is bad, the suite run just before it gives good. Rows of `.bisect` suites (what bisect
itself writes) never count: they mix good and bad commits.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Callable

from orchestrator.regress.check import BISECT_SUFFIX, PairCheck, check
from orchestrator.regress.gate import Gate
from orchestrator.regress.metrics import Metric, metric
from orchestrator.results.query import COLUMNS, config_labels, newest_suite_run
from orchestrator.results.store import read_results, require_dataset
from orchestrator.suite.selector import Selector
from orchestrator.suite.spec import ModelSpec
from worker.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_METRIC = "decode_ms"
EXTRA_COLUMNS = ("model_source", "host_selector")


@dataclass(frozen=True)
class Pair:
    """One (config, hardware) and the newest ok row that ran it (config, model and host facts)."""

    config_key: str
    hardware_key: str
    label: str
    row: dict[str, Any]

    @property
    def suite(self) -> str:
        return self.row["suite"]

    @property
    def gpu(self) -> bool:
        return self.row["device"] == "cuda" or bool(self.row["gpu_count"])

    @property
    def nvme(self) -> str | None:
        return self.row["nvme_device"]

    @property
    def model(self) -> ModelSpec:
        try:
            return ModelSpec(name=self.row["model"] or "model", **json.loads(self.row["model_source"] or "null"))
        except (TypeError, ValueError) as e:
            raise UserError(f"pair {self.describe()}: its rows do not say which model ran ({e})") from None

    @property
    def nested_config(self) -> dict[str, Any]:
        try:
            return json.loads(self.row["config_json"] or "null") or {}
        except json.JSONDecodeError:
            raise UserError(f"pair {self.describe()}: its rows hold no readable config_json") from None

    @property
    def selector(self) -> Selector:
        try:
            return Selector(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in json.loads(self.row["host_selector"] or "{}").items()})
        except (TypeError, ValueError):
            return Selector()

    def describe(self) -> str:
        return f"{self.label} @ {self.hardware_key}"


@dataclass(frozen=True)
class Choice:
    pair: Pair
    metric: Metric
    good: str | None  # a commit name as given or read from the rows (resolved against the repo later)
    bad: str | None
    why: str  # how the pair and the commits were chosen, for the user


def load_rows(uri: str | None) -> list[dict[str, Any]]:
    require_dataset(uri)
    return read_results(uri, columns=[*COLUMNS, *EXTRA_COLUMNS]).to_pylist()


def choose(rows: list[dict[str, Any]], gate_for: Callable[[str | None], Gate], *, suite: str | None = None,
           config_key: str | None = None, hardware_key: str | None = None, metric_name: str | None = None,
           good: str | None = None, bad: str | None = None) -> Choice:
    """The pair, metric and commits a bisection of `rows` should use; UserError when there is none."""
    ours = [r for r in rows if not (r["suite"] or "").endswith(BISECT_SUFFIX) and r["config_key"]
            and r["hardware_key"] and (suite is None or r["suite"] == suite)]
    if not ours:
        raise UserError(f"no runs{f' of suite {suite}' if suite else ''} in the results dataset to bisect")
    keys = sorted({(r["config_key"], r["hardware_key"]) for r in ours
                   if r["config_key"].startswith(config_key or "") and r["hardware_key"].startswith(hardware_key or "")})
    if not keys:
        raise UserError(f"no (config, hardware) pair matches --config-key {config_key or '*'} --hardware-key "
                        f"{hardware_key or '*'}; `bench results --columns config_key,hardware_key` lists them")
    by_pair = [r for r in ours if (r["config_key"], r["hardware_key"]) in set(keys)]
    candidate = newest_suite_run(by_pair)
    gate = gate_for(next(r["suite"] for r in ours if r["suite_run_id"] == candidate))
    report = check(rows, candidate, gate=gate, labels=config_labels(ours))
    checks = {(p.config_key, p.hardware_key): p for p in report.pairs}
    regressed = [k for k in keys if k in checks and checks[k].of("regression")]
    if len(keys) == 1:
        key = keys[0]
    elif regressed:
        key = max(regressed, key=lambda k: max(_when(r) for r in by_pair if r["suite_run_id"] == candidate
                                               and (r["config_key"], r["hardware_key"]) == k))
        if len(regressed) > 1:
            log.info("%d pairs regressed in %s; bisecting the newest (pick another with --config-key/--hardware-key)",
                     len(regressed), candidate)
    else:
        raise UserError(f"{len(keys)} pairs match and none regressed in suite run {candidate}: pick one with "
                        "--config-key and --hardware-key (prefixes; `bench regress --format json` shows the keys)")
    pc = checks.get(key)
    rows_of = [r for r in ours if (r["config_key"], r["hardware_key"]) == key]
    newest_ok = [r for r in rows_of if r["status"] == "ok"]
    if not newest_ok:
        raise UserError(f"pair {key[0][:10]} @ {key[1]} has no successful run to take its config from")
    label = config_labels(ours).get(key[0], key[0][:10])
    pair = Pair(key[0], key[1], label, newest_ok[-1])
    m = metric(metric_name) if metric_name else _regressed_metric(pc)
    why = f"pair {pair.describe()}, {m.name} ({m.better} is better)"
    if pc is not None and pc.of("regression"):
        why += f"; regressed in suite run {candidate}"
    if good is None or bad is None:
        auto_good, auto_bad, walk = default_commits(rows_of, pc, m, candidate)
        good, bad = good or auto_good, bad or auto_bad
        why += f"; {walk}"
    return Choice(pair, m, good, bad, why)


def default_commits(rows: list[dict[str, Any]], pc: PairCheck | None, m: Metric,
                    candidate: str) -> tuple[str, str, str]:
    """(good, bad, how they were found) from one pair's rows; see the module docstring."""
    if pc is None or not pc.of("regression") or not any(f.metric.name == m.name for f in pc.of("regression")):
        raise UserError(f"the pair did not regress in {m.name} in its newest suite run {candidate}: give --good and "
                        "--bad (or --metric of a metric that regressed)")
    medians, commits, order = _suite_runs(rows, m.name)
    baseline = [medians[sr] for sr in pc.baseline_runs if sr in medians]
    if candidate not in medians or not baseline:
        raise UserError(f"suite run {candidate} has no {m.name} values to compare: give --good and --bad")
    good_ref, bad_ref = statistics.median(baseline), medians[candidate]
    runs = order[:order.index(candidate) + 1]
    first_bad = len(runs) - 1
    while first_bad > 0 and abs(medians[runs[first_bad - 1]] - bad_ref) < abs(medians[runs[first_bad - 1]] - good_ref):
        first_bad -= 1
    if first_bad == 0:
        raise UserError(f"every suite run of the pair up to {candidate} looks bad in {m.name}: give --good")
    last_good, first = runs[first_bad - 1], runs[first_bad]
    if not commits[last_good] or not commits[first]:
        raise UserError("the pair's rows carry no git_commit: give --good and --bad")
    return commits[last_good], commits[first], (f"last good suite run {last_good} (commit {commits[last_good][:12]}), "
                                                f"first bad {first} (commit {commits[first][:12]})")


def _suite_runs(rows: list[dict[str, Any]], name: str) -> tuple[dict[str, float], dict[str, str | None], list[str]]:
    """Per suite run of one pair: the median of `name`, the commit most of its rows ran; oldest first."""
    values: dict[str, list[float]] = defaultdict(list)
    commits: dict[str, Counter] = defaultdict(Counter)
    start: dict[str, Any] = {}
    for r in rows:
        if r["status"] != "ok" or r[name] is None:
            continue
        values[r["suite_run_id"]].append(r[name])
        commits[r["suite_run_id"]][r["git_commit"]] += 1
        start[r["suite_run_id"]] = min(start.get(r["suite_run_id"], _when(r)), _when(r))
    order = sorted(values, key=start.__getitem__)
    return ({sr: statistics.median(v) for sr, v in values.items()},
            {sr: commits[sr].most_common(1)[0][0] for sr in order}, order)


def _regressed_metric(pc: PairCheck | None) -> Metric:
    found = pc.of("regression") if pc is not None else []
    names = [f.metric.name for f in found]
    if not found or DEFAULT_METRIC in names:
        return metric(DEFAULT_METRIC)
    return max(found, key=lambda f: f.change.z / f.change.critical if f.change.critical else f.change.z).metric


def _when(r: dict[str, Any]):
    return r["finished_at"] or r["started_at"]
