"""The analysis commands of `bench`: compare, regress, report (over the results dataset; no Ray).

Thin Click commands over orchestrator.regress and orchestrator.report; errors are `UserError`s that
the entry point turns into one line and exit code 2.
"""

from __future__ import annotations

import sys

import click

from orchestrator.cli.console import console, echo_json
from orchestrator.cli.options import results_option, selection, selection_options
from worker.errors import UserError


@click.command("compare")
@results_option
@selection_options
@click.option("--metric", "metrics", multiple=True, metavar="METRIC",
              help="Metric to tabulate (repeatable; `all` for every one) [default: decode_tok_s, ttft_ms, e2e_ms, "
                   "attainment_decode].")
@click.option("--by", type=click.Choice(["hardware", "commit"]), default="hardware", show_default=True,
              help="Columns: hardware keys, or commits side by side (rows are then config @ hardware).")
@click.option("--ref", default=None, metavar="COLUMN",
              help="Reference column for ratios: a hardware key (prefix), host name or GPU model; with --by commit "
                   "a commit prefix [default: the first column; for commits the oldest].")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "markdown"]), default="table",
              show_default=True)
def compare_cmd(results: str | None, suites, suite_run_ids, since, until, commits, hosts, metrics: tuple[str, ...],
                by: str, ref: str | None, fmt: str) -> None:
    """Compare runs across hosts or commits: one table per metric, configs as rows.

    A cell is the median over repeats with its robust spread and n, and the ratio to the reference
    column. Only successful runs are tabulated.
    """
    from orchestrator.regress import compare as cmp
    from orchestrator.regress.metrics import DEFAULT_COMPARE, METRICS
    from orchestrator.results.query import select
    from orchestrator.results.store import default_uri, require_dataset

    sel = selection(suites, suite_run_ids, since, until, commits, hosts)
    require_dataset(results)
    rows = select(results, sel)
    if not any(r["status"] == "ok" for r in rows):
        raise UserError(f"no successful runs match ({sel.describe()}) in {results or default_uri()}; "
                        "`bench results` shows what is there")
    chosen = list(METRICS) if "all" in metrics else list(metrics or DEFAULT_COMPARE)
    comp = cmp.compare(rows, chosen, by=by, ref=ref, selection=sel.describe())
    if fmt == "json":
        echo_json({"selection": comp.selection, "by": by, "cells": comp.records(),
                   "hardware": {k: vars(h) for k, h in comp.hardware.items()}})
    elif fmt == "csv":
        click.echo(cmp.to_csv(comp), nl=False)
    elif fmt == "markdown":
        click.echo(cmp.to_markdown(comp), nl=False)
    else:
        console.print(f"{comp.n_ok} ok runs, {comp.n_failed} failed · {comp.selection}", highlight=False)
        for note in comp.notes:
            console.print(note, style="dim", highlight=False)
        for table in cmp.to_rich(comp):
            console.print(table)


@click.command("regress")
@results_option
@click.option("--suite", default=None, metavar="SUITE",
              help="Check this suite's newest run; a suite YAML or embedded name also brings its `thresholds:` "
                   "[default: the suite of the newest run in the dataset].")
@click.option("--suite-run-id", default=None, help="Check this suite run instead of the newest.")
@click.option("--window", type=click.IntRange(min=1), default=14, show_default=True,
              help="Baseline: the last N earlier suite runs of each (config, hardware).")
@click.option("--days", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Baseline: only runs of the last D days before the checked run.")
@click.option("--baseline-commit", default=None, metavar="SHA", help="Baseline: the runs of this commit (prefix).")
@click.option("--baseline-run", default=None, metavar="SUITE_RUN_ID", help="Baseline: this suite run.")
@click.option("--thresholds", "thresholds_file", type=click.Path(), default=None,
              help="Thresholds file (YAML; see configs/thresholds/default.yaml).")
@click.option("--threshold", "overrides", multiple=True, metavar="METRIC=FRACTION",
              help="Relative threshold of one metric, e.g. decode_tok_s=0.1 or 10%; `off` stops checking it "
                   "(repeatable).")
@click.option("--z", type=float, default=None,
              help="Noise test: nominal z (3 = a 0.13% false-alarm rate per comparison) [default: 3].")
@click.option("--strict", is_flag=True, help="Exit 3 when any (config, hardware) of the run has no baseline.")
@click.option("--history", is_flag=True, help="Also list the change points of every checked metric over each "
                                              "pair's whole history: the suite run and commit each new level "
                                              "begins with.")
@click.option("--format", "fmt", type=click.Choice(["markdown", "json"]), default="markdown", show_default=True)
def regress_cmd(results: str | None, suite: str | None, suite_run_id: str | None, window: int, days: float | None,
                baseline_commit: str | None, baseline_run: str | None, thresholds_file: str | None,
                overrides: tuple[str, ...], z: float | None, strict: bool, history: bool, fmt: str) -> None:
    """Check the newest suite run against earlier runs of the same config on the same hardware.

    A metric regresses when it is beyond its threshold in its worse direction and beyond the
    baseline's noise (a calibrated robust z-score). Prints a markdown summary. Exit code 0: no
    regression; 1: regression (or a config that failed in every repeat but ran before); 3: not
    enough data; 2: bad input.
    """
    from orchestrator.regress.check import Baseline, regress
    from orchestrator.regress.gate import parse_override, resolve_gate, suite_thresholds
    from orchestrator.regress.render import regress_markdown

    if baseline_commit and baseline_run:
        raise UserError("--baseline-commit and --baseline-run are exclusive: pick one baseline")
    name, from_suite = suite_thresholds(suite)
    extra = dict(parse_override(t) for t in overrides)
    gate_for = lambda found: resolve_gate(from_suite if suite else suite_thresholds(found)[1],  # noqa: E731
                                          thresholds_file, extra, z)
    gate_for(name)  # validate the thresholds before reading any data
    baseline = Baseline(window=window, days=days, commit=baseline_commit, suite_run_id=baseline_run)
    report = regress(results, suite=name, suite_run_id=suite_run_id, baseline=baseline, gate=gate_for, strict=strict,
                     history=history)
    if fmt == "json":
        echo_json(report.to_dict())
    else:
        click.echo(regress_markdown(report), nl=False)
    sys.exit(report.exit_code)


@click.command("report")
@results_option
@selection_options
@click.option("--out", default="report.html", show_default=True, type=click.Path(dir_okay=False),
              help="The HTML file to write (self-contained: opens offline).")
@click.option("--title", default=None, help="Page title [default: streambench report].")
@click.option("--window", type=click.IntRange(min=1), default=14, show_default=True,
              help="Regression markers: baseline of the last N earlier suite runs.")
@click.option("--thresholds", "thresholds_file", type=click.Path(), default=None,
              help="Thresholds file for the regression markers (as for bench regress).")
def report_cmd(results: str | None, suites, suite_run_ids, since, until, commits, hosts, out: str,
               title: str | None, window: int, thresholds_file: str | None) -> None:
    """Write an HTML report: throughput, attainment, latency breakdown, I/O against the probe,
    history with regression markers, failed runs."""
    from orchestrator.regress.check import Baseline
    from orchestrator.regress.gate import resolve_gate, suite_thresholds
    from orchestrator.report.build import build_report

    sel = selection(suites, suite_run_ids, since, until, commits, hosts)
    suite_thr = suite_thresholds(suites[0])[1] if len(suites) == 1 else None
    info = build_report(results, out, sel, gate=resolve_gate(suite_thr, thresholds_file), baseline=Baseline(window),
                        title=title)
    verdict = {None: "no runs", 0: "no regression", 1: "REGRESSION", 3: "not enough data"}[info.exit_code]
    console.print(f"report: {info.path} ({info.rows} runs, {info.failed} failed, {info.suite_runs} suite runs; "
                  f"newest suite run: {verdict})", highlight=False, soft_wrap=True)


COMMANDS = [compare_cmd, regress_cmd, report_cmd]
