"""The cluster commands of `bench`: submit, hosts, results, status, logs.

Thin Click commands over the orchestrator's library functions; `cli.py` adds them to the `bench`
group. Output goes through rich here (this is the CLI layer), errors are `UserError`s that the
entry point turns into one line and exit code 2.
"""

from __future__ import annotations

import json
import sys

import click

from orchestrator.cli.console import console, echo_json, err_console
from orchestrator.cli.options import address_option, results_option, selection, selection_options

RESULT_VIEW = ("finished_at", "suite", "run_id", "status", "host", "nvme_device", "model", "mode", "batch_size",
               "prompt_len", "ttft_ms", "decode_tok_s", "e2e_ms", "attainment_decode", "error")


@click.command("submit")
@click.argument("suite", required=False)
@address_option
@results_option
@click.option("--dry-run", is_flag=True, help="Validate the suite and print the plan; run nothing.")
@click.option("--suite-run-id", default=None, help="Resume or name this suite run (default: generated, printed); "
                                                   "runs already recorded under it are skipped.")
@click.option("--detach", is_flag=True, help="Submit as a Ray Job and return (needs ray[default]); follow it "
                                             "with `bench status` / `bench logs`.")
@click.option("--wide", is_flag=True, help="Show every column of the summary, full run ids.")
def submit_cmd(suite: str | None, address: str | None, results: str | None, dry_run: bool,
               suite_run_id: str | None, detach: bool, wide: bool) -> None:
    """Run a benchmark suite (a YAML file or an embedded name; default: smoke) on a Ray cluster.

    One actor per (host, GPU, NVMe device); every finished run is written at once as a row of the
    Parquet dataset. Exit code 1 when a run failed, 130 when interrupted (finished rows are kept).
    """
    from pathlib import Path

    from orchestrator.cluster.progress import render_rows, time_share
    from orchestrator.cluster.submit import new_suite_run_id, plan_rows
    from orchestrator.results.store import check_writable, default_uri
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
    check_writable(results)  # before Ray starts: a store that cannot take a row fails now, not after a run
    console.print(f"suite run id: {run_id}", highlight=False)
    out = _submit_live(plan, results, run_id, address)
    console.print(render_rows(out.rows, title=f"suite {plan.name} · {run_id} · {out.where}", wide=wide))
    share = time_share(out.rows)
    if share:
        console.print(share, highlight=False, soft_wrap=True)
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
        slots = str(h["slots"]) + (f" ({h['idle_gpus']} GPU idle)" if h["idle_gpus"] else "") + (
            f" ({', '.join(h['unused_nvme'])} unused)" if h["unused_nvme"] else "")
        t.add_row(h["host"], h["node_id"][:8], gpus, nvme, slots,
                  f"{fp.get('cpu_model') or '?'} / {fp.get('ram_gb') or '?'} GB", figures,
                  ", ".join(f"{k}={v}" for k, v in h["labels"].items()) or "-")
    console.print(t)


@click.command("results")
@results_option
@selection_options
@click.option("--status", type=click.Choice(["ok", "failed"]), default=None, help="Only ok or failed runs.")
@click.option("--columns", default=None, help="Comma-separated columns [default: a summary; `all` for every one].")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the last N rows.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--wide", is_flag=True, help="Table: every requested column and full run ids (default: what fits "
                                           "the terminal).")
def results_cmd(results: str | None, suites, suite_run_ids, since, until, commits, hosts, status: str | None,
                columns: str | None, limit: int | None, fmt: str, wide: bool) -> None:
    """Show the results dataset (filtered) as a table, CSV or JSON."""
    from orchestrator.cluster.progress import render_rows
    from orchestrator.results.query import select_table
    from orchestrator.results.store import require_dataset

    cols = None if columns == "all" else (columns.split(",") if columns else list(RESULT_VIEW))
    sel = selection(suites, suite_run_ids, since, until, commits, hosts, status)
    require_dataset(results)
    table = select_table(results, sel, cols)
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
        console.print(render_rows(rows, columns=tuple(table.column_names), title=f"{len(rows)} runs",
                                  wide=wide or columns is not None))


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



COMMANDS = [submit_cmd, hosts_cmd, results_cmd, status_cmd, logs_cmd]
