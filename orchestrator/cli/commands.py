"""The cluster commands of `bench`: submit, hosts, results, status, logs, compare, regress, report.

Thin Click commands over the orchestrator's library functions; `cli.py` adds them to the `bench`
group. Output goes through rich here (this is the CLI layer), errors are `UserError`s that the
entry point turns into one line and exit code 2.
"""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console

from worker.errors import UserError

console = Console(stderr=False)
err_console = Console(stderr=True)


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))



RESULT_VIEW = ("finished_at", "suite", "run_id", "status", "host", "nvme_device", "model", "mode", "batch_size",
               "prompt_len", "ttft_ms", "decode_tok_s", "e2e_ms", "attainment_decode", "error")


def address_option(func):
    return click.option("--address", default=None, metavar="ADDR",
                        help="Ray cluster: HOST:PORT, ray://HOST:PORT or auto (for --detach/status/logs: the "
                             "dashboard, http://HEAD:8265). Default: RAY_ADDRESS, else an embedded local Ray.")(func)


def results_option(func):
    return click.option("--results", "results", default=None, metavar="PATH_OR_URI",
                        help="Results dataset: a directory or a pyarrow filesystem URI (s3://, gs://, ...) "
                             "[default: STREAMBENCH_RESULTS, else ./bench-results].")(func)


@click.command("submit")
@click.argument("suite", required=False)
@address_option
@results_option
@click.option("--dry-run", is_flag=True, help="Validate the suite and print the plan; run nothing.")
@click.option("--suite-run-id", default=None, help="Resume or name this suite run (default: generated, printed); "
                                                   "runs already recorded under it are skipped.")
@click.option("--detach", is_flag=True, help="Submit as a Ray Job and return (needs ray[default]); follow it "
                                             "with `bench status` / `bench logs`.")
def submit_cmd(suite: str | None, address: str | None, results: str | None, dry_run: bool,
               suite_run_id: str | None, detach: bool) -> None:
    """Run a benchmark suite (a YAML file or an embedded name; default: smoke) on a Ray cluster.

    One actor per (host, GPU, NVMe device); every finished run is written at once as a row of the
    Parquet dataset. Exit code 1 when a run failed, 130 when interrupted (finished rows are kept).
    """
    from pathlib import Path

    from orchestrator.cluster.progress import render_rows
    from orchestrator.cluster.submit import new_suite_run_id, plan_rows
    from orchestrator.results.store import default_uri
    from orchestrator.suite.load import load_suite

    plan = load_suite(suite)
    results = results or default_uri()
    run_id = suite_run_id or new_suite_run_id(plan.name)
    if dry_run:
        rows = plan_rows(plan)
        console.print(render_rows(rows, columns=tuple(rows[0]) if rows else (),
                                  title=f"plan: suite {plan.name} ({plan.source}): {len(rows)} runs"))
        return
    if detach:
        from orchestrator.cluster.jobs import submit_detached

        path = Path(suite) if suite and Path(suite).is_file() else None
        job = submit_detached(suite or plan.name, path, results, run_id, address)
        console.print(f"submitted job {job}; follow it with `bench status {job}` and `bench logs {job} --follow`",
                      highlight=False, soft_wrap=True)
        return
    console.print(f"suite run id: {run_id}", highlight=False)
    out = _submit_live(plan, results, run_id, address)
    console.print(render_rows(out.rows, title=f"suite {plan.name} · {run_id} · {out.where}"))
    console.print(f"results: {results}  ({len(out.rows)} rows written, {out.failed} failed, "
                  f"{len(out.already_recorded)} already recorded)", highlight=False, soft_wrap=True)
    if out.interrupted:
        err_console.print(f"interrupted: {out.progress.cancelled} runs cancelled; finish them with "
                          f"`bench submit {suite or ''} --suite-run-id {run_id}`".replace("  ", " "),
                          highlight=False, soft_wrap=True)
        sys.exit(130)
    if out.failed:
        sys.exit(1)


def _submit_live(plan, results: str, run_id: str, address: str | None):
    """Live progress on a terminal; quiet otherwise."""
    from orchestrator.cluster.progress import render_progress
    from orchestrator.cluster.submit import submit

    if not console.is_terminal:
        return submit(plan, results, run_id, address=address)
    from rich.live import Live

    with Live(console=console, refresh_per_second=4, transient=True) as live:
        return submit(plan, results, run_id, address=address,
                      on_update=lambda p: live.update(render_progress(p, title=f"{plan.name} · {run_id}")))


@click.command("hosts")
@address_option
@click.option("--json", "as_json", is_flag=True, help="Print the hosts as JSON.")
def hosts_cmd(address: str | None, as_json: bool) -> None:
    """List the cluster's hosts: GPUs, NVMe devices, slots, hardware and cached probe figures."""
    from rich.table import Table

    from orchestrator.cluster.connect import ray_session
    from orchestrator.cluster.hosts import describe_hosts

    with ray_session(address):
        hosts = describe_hosts()
    if as_json:
        echo_json(hosts)
        return
    t = Table(title=f"{len(hosts)} hosts")
    for col in ("host", "node", "GPUs", "NVMe", "slots", "CPU / RAM", "probe SSD / H2D / HBM GB/s", "labels"):
        t.add_column(col, overflow="fold")
    for h in hosts:
        fp, probe = h["fingerprint"] or {}, h["probe"] or {}
        gpus = f"{h['gpus']} × {fp.get('gpu_name') or h['accelerator'] or '?'}" if h["gpus"] else "none (CPU host)"
        nvme = "\n".join(f"{d} ({h['nvme_models'].get(d) or 'model unknown'})" for d in h["nvme"]) or "-"
        figures = " / ".join("None" if probe.get(k) is None else f"{probe[k]:.1f}"
                             for k in ("ssd_gbps", "h2d_gbps", "hbm_gbps")) if probe else "None"
        t.add_row(h["host"], h["node_id"][:8], gpus, nvme, str(h["slots"]),
                  f"{fp.get('cpu_model') or '?'} / {fp.get('ram_gb') or '?'} GB", figures,
                  ", ".join(f"{k}={v}" for k, v in h["labels"].items()) or "-")
    console.print(t)


@click.command("results")
@results_option
@click.option("--suite", multiple=True, help="Only this suite (repeatable).")
@click.option("--suite-run-id", multiple=True, help="Only this suite run (repeatable).")
@click.option("--status", type=click.Choice(["ok", "failed"]), default=None, help="Only ok or failed runs.")
@click.option("--since", type=click.DateTime(), default=None, help="Only runs finished at or after (UTC).")
@click.option("--columns", default=None, help="Comma-separated columns [default: a summary; `all` for every one].")
@click.option("--limit", type=int, default=None, help="Only the last N rows.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
def results_cmd(results: str | None, suite: tuple[str, ...], suite_run_id: tuple[str, ...], status: str | None,
                since, columns: str | None, limit: int | None, fmt: str) -> None:
    """Show the results dataset (filtered) as a table, CSV or JSON."""
    from datetime import timezone

    from orchestrator.cluster.progress import render_rows
    from orchestrator.results.store import read_results

    cols = None if columns == "all" else (columns.split(",") if columns else list(RESULT_VIEW))
    table = read_results(results, suite=suite or None, suite_run_id=suite_run_id or None, status=status,
                         since=since.replace(tzinfo=timezone.utc) if since else None, columns=cols)
    if limit is not None:
        table = table.slice(max(0, table.num_rows - limit))
    rows = table.to_pylist()
    if fmt == "json":
        echo_json(rows)
    elif fmt == "csv":
        import csv

        writer = csv.DictWriter(sys.stdout, fieldnames=table.column_names)
        writer.writeheader()
        writer.writerows({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()} for r in rows)
    else:
        console.print(render_rows(rows, columns=tuple(table.column_names), title=f"{len(rows)} runs"))


@click.command("status")
@click.argument("job_id", required=False)
@address_option
@click.option("--json", "as_json", is_flag=True, help="Print the jobs as JSON.")
def status_cmd(job_id: str | None, address: str | None, as_json: bool) -> None:
    """Status of a detached suite (its job id is the suite run id; ID.2, ... when resubmitted), or of all."""
    from orchestrator.cluster.jobs import job_status
    from orchestrator.cluster.progress import render_rows

    rows = job_status(job_id, address)
    if as_json:
        echo_json(rows)
        return
    console.print(render_rows(rows, columns=("job", "status", "message", "start_time", "end_time"),
                              title=f"{len(rows)} detached suites"))


@click.command("logs")
@click.argument("job_id")
@address_option
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the job ends.")
def logs_cmd(job_id: str, address: str | None, follow: bool) -> None:
    """Output of a detached suite."""
    from orchestrator.cluster.jobs import job_logs

    job_logs(job_id, address, follow, emit=lambda text: click.echo(text, nl=False))


# --- comparison, regressions, report ---


def selection_options(func):
    """Which runs compare / report look at (combined with AND; repeatable ones with OR)."""
    options = [
        click.option("--suite", "suites", multiple=True, help="Only this suite (repeatable)."),
        click.option("--suite-run-id", "suite_run_ids", multiple=True, help="Only this suite run (repeatable)."),
        click.option("--since", type=click.DateTime(), default=None, help="Only runs finished at or after (UTC)."),
        click.option("--until", type=click.DateTime(), default=None, help="Only runs finished before (UTC)."),
        click.option("--commit", "commits", multiple=True, metavar="SHA",
                     help="Only runs of this commit (a prefix; repeatable)."),
        click.option("--host", "hosts", multiple=True, metavar="HOST",
                     help="Only these hosts: a host name, a hardware key (prefix) or a GPU model such as h100 "
                          "(repeatable)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _selection(suites, suite_run_ids, since, until, commits, hosts):
    from datetime import timezone

    from orchestrator.results.query import Selection

    utc = lambda t: t.replace(tzinfo=timezone.utc) if t else None  # noqa: E731
    return Selection(tuple(suites), tuple(suite_run_ids), utc(since), utc(until), tuple(commits), tuple(hosts))


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
    from orchestrator.results.store import default_uri

    sel = _selection(suites, suite_run_ids, since, until, commits, hosts)
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
@click.option("--format", "fmt", type=click.Choice(["markdown", "json"]), default="markdown", show_default=True)
def regress_cmd(results: str | None, suite: str | None, suite_run_id: str | None, window: int, days: float | None,
                baseline_commit: str | None, baseline_run: str | None, thresholds_file: str | None,
                overrides: tuple[str, ...], z: float | None, strict: bool, fmt: str) -> None:
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
    report = regress(results, suite=name, suite_run_id=suite_run_id, baseline=baseline, gate=gate_for, strict=strict)
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

    sel = _selection(suites, suite_run_ids, since, until, commits, hosts)
    suite_thr = suite_thresholds(suites[0])[1] if len(suites) == 1 else None
    info = build_report(results, out, sel, gate=resolve_gate(suite_thr, thresholds_file), baseline=Baseline(window),
                        title=title)
    verdict = {None: "no runs", 0: "no regression", 1: "REGRESSION", 3: "not enough data"}[info.exit_code]
    console.print(f"report: {info.path} ({info.rows} runs, {info.failed} failed, {info.suite_runs} suite runs; "
                  f"newest suite run: {verdict})", highlight=False, soft_wrap=True)


COMMANDS = [submit_cmd, hosts_cmd, results_cmd, status_cmd, logs_cmd, compare_cmd, regress_cmd, report_cmd]
