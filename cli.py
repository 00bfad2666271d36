"""`bench`: benchmark SSD-streaming LLM inference, on one host or a Ray cluster.

Thin Click commands over library functions. Bad input ends with a one-line `error:` message and
exit code 2; user-facing output goes through rich/Click here and nowhere else.
"""

from __future__ import annotations

import json
import logging
import sys

import click
from rich.console import Console
from rich.markup import escape

from worker.cli_options import given, run_options
from worker.errors import UserError
from worker.presets import PRESETS

console = Console(stderr=False)
err_console = Console(stderr=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("-v", "--log-level", default="INFO", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
              help="Log level of the library's messages (stderr).", show_default=True)
def bench(log_level: str) -> None:
    """Benchmark SSD-streaming LLM inference: one host (`bench run`) or a Ray cluster (`bench submit`)."""
    from rich.logging import RichHandler

    logging.basicConfig(level=log_level, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=err_console, show_path=False)], force=True)


# ---------------------------------------------------------------------------------------------
# one host: checkpoints, packs, a single run
# ---------------------------------------------------------------------------------------------


@bench.command("run")
@run_options
def run_cmd(**params) -> None:
    """Run one benchmark on this host (the seed's bench_infer.py) and write its JSON."""
    from worker import bench as runner

    result = runner.run_from_overrides(given(params))
    console.print(run_summary(result))
    if result["config"].get("out_json"):
        console.print(f"results: {result['config']['out_json']}")


def run_summary(result: dict):
    """A short human summary of one run (the seed's printed block)."""
    from rich.table import Table

    m, io = result["metrics"], result["io"]
    t = Table(title=f"{result['model']['name']} · mode {result['config']['stream']['mode']} · "
                    f"{result['system'].get('gpu_name') or result['system']['device']}", show_header=False)
    fmt = lambda v, unit="": "—" if v is None else f"{v:,.2f}{unit}"  # noqa: E731
    t.add_row("TTFT", fmt(m["ttft_ms"], " ms"))
    t.add_row("prefill", fmt(m["prefill_ms"], " ms") + f"  ({m['prompt_tokens']} prompt tokens)")
    t.add_row("decode", fmt(m["decode_ms"], " ms") + f"  ({m['decode_steps']} steps × batch {m['batch_size']})")
    t.add_row("throughput", fmt(m["decode_tok_s"], " tok/s"))
    t.add_row("inter-token p50 / p99", f"{fmt(m['itl_p50_ms'])} / {fmt(m['itl_p99_ms'], ' ms')}")
    t.add_row("end to end", fmt(m["e2e_ms"], " ms"))
    for ch, stats in io.items():
        if stats:
            t.add_row(f"I/O {ch}", f"{stats['bytes'] / 1e9:,.2f} GB at {fmt(stats['gbps'], ' GB/s')}")
    t.add_row("GPU memory alloc / reserved", f"{fmt(m['gpu_max_allocated_gb'])} / {fmt(m['gpu_max_reserved_gb'], ' GB')}")
    t.add_row("host RSS", fmt(m["host_rss_gb"], " GB"))
    roof = result.get("roofline") or {}
    if roof.get("attainment_decode") is not None:
        t.add_row("decode attainment", f"{roof['attainment_decode']:.2f} of the I/O floor")
    return t


# --- synthetic checkpoints and prompts ---


@bench.command("make-model")
@click.argument("out_dir", type=click.Path())
@click.option("--preset", type=click.Choice(list(PRESETS)), default="tiny",
              show_default=True, help="Geometry: tiny (CPU tests) or the real Llama-3.1 8B / 70B shapes.")
@click.option("--layers", type=click.IntRange(min=1), default=None, help="Number of layers [default: the preset's].")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16",
              show_default=True, help="Dtype of the weights.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--tie-embeddings", is_flag=True, help="Tie lm_head to the embeddings (no lm_head tensor).")
@click.option("--shard-max-gb", type=click.FloatRange(min=0, min_open=True), default=5.0, show_default=True,
              help="Largest safetensors shard.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it is not empty.")
def make_model_cmd(out_dir: str, preset: str, layers: int | None, dtype: str, seed: int, tie_embeddings: bool,
                   shard_max_gb: float, force: bool) -> None:
    """Write a random-weight Llama-3.1 checkpoint (HF format + local tokenizer) for tests and benchmarks."""
    from worker.synth import dir_size, make_model

    overrides = {"tie_word_embeddings": True} if tie_embeddings else None
    path = make_model(out_dir, preset=preset, layers=layers, dtype=dtype, seed=seed, overrides=overrides,
                      shard_max_gb=shard_max_gb, force=force)
    console.print(f"{path} ({dir_size(path) / 1e9:.2f} GB)", highlight=False, soft_wrap=True)


@bench.command("make-prompts")
@click.option("--checkpoints", required=True, type=click.Path(), help="Checkpoint whose tokenizer counts tokens.")
@click.option("--n", "n", type=click.IntRange(min=1), default=512, show_default=True, help="Number of prompts.")
@click.option("--len", "length", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Tokens per prompt (exact, without special tokens).")
@click.option("--out", "out_path", required=True, type=click.Path(), help="Prompt file to write (one per line).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the prompt text.")
def make_prompts_cmd(checkpoints: str, n: int, length: int, out_path: str, seed: int) -> None:
    """Write N prompts of exactly LEN tokens each (the seed's prompts_batch512_len2048.txt)."""
    from worker.prompts import make_prompts

    path = make_prompts(checkpoints, n, length, out_path, seed=seed)
    console.print(f"{path} ({n} prompts × {length} tokens)", highlight=False, soft_wrap=True)


# --- packs ---


@bench.command("pack")
@click.option("--checkpoints", required=True, type=click.Path(), help="HF checkpoint directory to pack.")
@click.option("--out-dir", type=click.Path(), default=None,
              help="Pack directory (default: <checkpoints>/.streambench-pack, the one `bench run` uses).")
@click.option("--raw-device", type=click.Path(), default=None,
              help="Write the blob onto this block device or file instead (needs --manifest).")
@click.option("--manifest", type=click.Path(), default=None, help="Where the manifest goes (with --raw-device).")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto",
              show_default=True, help="Dtype of the packed weights; auto = the checkpoint's.")
@click.option("--force", is_flag=True, help="Re-pack even if up to date; overwrite a raw device holding a filesystem.")
def pack_cmd(checkpoints: str, out_dir: str | None, raw_device: str | None, manifest: str | None, dtype: str,
             force: bool) -> None:
    """Pack a checkpoint into an aligned, grouped blob + runtime manifest (what streaming reads)."""
    from worker.blob import Pack
    from worker.pack import pack_checkpoint
    from worker.pack_cache import ensure_pack

    if raw_device and out_dir:
        raise UserError("--raw-device and --out-dir are exclusive: a pack goes to a directory or onto a device")
    if bool(raw_device) != bool(manifest):
        raise UserError("--raw-device and --manifest go together: the manifest records what is on the device")
    if raw_device:
        pack_checkpoint(checkpoints, raw_device, manifest, dtype=None if dtype == "auto" else dtype, force=force)
        pack = Pack.open(manifest)
    else:
        pack = ensure_pack(checkpoints, pack_dir=out_dir, dtype=dtype, repack=force)
    m = pack.manifest
    console.print(f"manifest: {pack.manifest_path}\nblob:     {pack.blob_path} ({m.blob_size / 1e9:.2f} GB, "
                  f"{m.dtype}, {len(m.groups)} groups, {len(m.tensors)} tensors)", highlight=False, soft_wrap=True)


@bench.command("verify")
@click.option("--manifest", required=True, type=click.Path(), help="Manifest of the pack to check.")
@click.option("--raw-device", type=click.Path(), default=None, help="The blob, if not where the manifest says.")
def verify_cmd(manifest: str, raw_device: str | None) -> None:
    """Check every group of a pack against its checksum; exit 1 listing the bad groups."""
    from worker.blob import Pack
    from worker.pack_cache import verify_pack

    with Pack.open(manifest, blob_path=raw_device) as pack:
        bad = verify_pack(pack)
    if bad:
        err_console.print(f"{len(bad)} of {len(pack.manifest.groups)} groups fail their checksum: "
                          f"{', '.join(bad)}", highlight=False, soft_wrap=True)
        sys.exit(1)
    console.print(f"ok: {len(pack.manifest.groups)} groups match their checksums", highlight=False, soft_wrap=True)


# --- probe ---


@bench.command("probe")
@click.option("--path", type=click.Path(), default=None,
              help="Disk to measure: a file or raw block device (read only) or a directory (a scratch file is "
                   "written there) [default: the cache directory].")
@click.option("--refresh", is_flag=True, help="Measure again even if this host has cached figures.")
@click.option("--quick", is_flag=True, help="A small, fast probe (seconds; rough figures).")
@click.option("--json", "as_json", is_flag=True, help="Print the probe document as JSON.")
def probe_cmd(path: str | None, refresh: bool, quick: bool, as_json: bool) -> None:
    """Measure this host's SSD (O_DIRECT), PCIe H2D/D2H and HBM bandwidth once, and cache it (the roofline)."""
    from rich.table import Table

    from worker.probe import cache_path, probe_host

    doc = probe_host(path, refresh=refresh, quick=quick)
    if as_json:
        echo_json(doc)
        return
    d = doc["details"]
    fmt = lambda v: "—" if v is None else f"{v:,.2f} GB/s"  # noqa: E731
    ssd = d["ssd"]
    t = Table(title=f"probe · {doc['hostname']} · {d.get('device')} · {doc['measured_at']}", show_header=False)
    how = ("O_DIRECT" if doc["ssd_direct"] else "buffered") + ("" if ssd.get("reliable") else ", unreliable")
    t.add_row(f"SSD read ({how})",
              f"{fmt(doc['ssd_gbps'])}  best of {len(ssd['sweep'])}: {ssd['best']['threads']} thread(s) × "
              f"{ssd['best']['request_mib']:g} MiB · {doc['ssd_path']} ({ssd.get('fs_type')})")
    t.add_row("H2D" if doc["hbm_gbps"] is not None else "H2D (host memcpy, no CUDA)", fmt(doc["h2d_gbps"]))
    t.add_row("H2D pageable", fmt(doc["h2d_pageable_gbps"]))
    t.add_row("D2H", fmt(doc["d2h_gbps"]))
    t.add_row("HBM (read + write)", fmt(doc["hbm_gbps"]))
    console.print(t)
    for w in doc.get("warnings", []):
        err_console.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    console.print(f"cached: {cache_path()}" + ("  (quick probe)" if doc.get("quick") else ""),
                  highlight=False, soft_wrap=True)

# --- the cluster ---

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


@bench.command("submit")
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

    from orchestrator.progress import render_rows
    from orchestrator.results import default_uri
    from orchestrator.submit import new_suite_run_id, plan_rows
    from orchestrator.suite import load_suite

    plan = load_suite(suite)
    results = results or default_uri()
    run_id = suite_run_id or new_suite_run_id(plan.name)
    if dry_run:
        rows = plan_rows(plan)
        console.print(render_rows(rows, columns=tuple(rows[0]) if rows else (),
                                  title=f"plan: suite {plan.name} ({plan.source}): {len(rows)} runs"))
        return
    if detach:
        from orchestrator.jobs import submit_detached

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
    from orchestrator.progress import render_progress
    from orchestrator.submit import submit

    if not console.is_terminal:
        return submit(plan, results, run_id, address=address)
    from rich.live import Live

    with Live(console=console, refresh_per_second=4, transient=True) as live:
        return submit(plan, results, run_id, address=address,
                      on_update=lambda p: live.update(render_progress(p, title=f"{plan.name} · {run_id}")))


@bench.command("hosts")
@address_option
@click.option("--json", "as_json", is_flag=True, help="Print the hosts as JSON.")
def hosts_cmd(address: str | None, as_json: bool) -> None:
    """List the cluster's hosts: GPUs, NVMe devices, slots, hardware and cached probe figures."""
    from rich.table import Table

    from orchestrator.cluster import ray_session
    from orchestrator.hosts import describe_hosts

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


@bench.command("results")
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

    from orchestrator.progress import render_rows
    from orchestrator.results import read_results

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


@bench.command("status")
@click.argument("job_id", required=False)
@address_option
@click.option("--json", "as_json", is_flag=True, help="Print the jobs as JSON.")
def status_cmd(job_id: str | None, address: str | None, as_json: bool) -> None:
    """Status of a detached suite (its job id is the suite run id; ID.2, ... when resubmitted), or of all."""
    from orchestrator.jobs import job_status
    from orchestrator.progress import render_rows

    rows = job_status(job_id, address)
    if as_json:
        echo_json(rows)
        return
    console.print(render_rows(rows, columns=("job", "status", "message", "start_time", "end_time"),
                              title=f"{len(rows)} detached suites"))


@bench.command("logs")
@click.argument("job_id")
@address_option
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the job ends.")
def logs_cmd(job_id: str, address: str | None, follow: bool) -> None:
    """Output of a detached suite."""
    from orchestrator.jobs import job_logs

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

    from orchestrator.selection import Selection

    utc = lambda t: t.replace(tzinfo=timezone.utc) if t else None  # noqa: E731
    return Selection(tuple(suites), tuple(suite_run_ids), utc(since), utc(until), tuple(commits), tuple(hosts))


@bench.command("compare")
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
    from orchestrator import compare as cmp
    from orchestrator.metrics import DEFAULT_COMPARE, METRICS
    from orchestrator.results import default_uri
    from orchestrator.selection import select

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


@bench.command("regress")
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
    from orchestrator.regress import Baseline, regress
    from orchestrator.render import regress_markdown
    from orchestrator.thresholds import parse_override, resolve_gate, suite_thresholds

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


@bench.command("report")
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
    from orchestrator.regress import Baseline
    from orchestrator.report import build_report
    from orchestrator.thresholds import resolve_gate, suite_thresholds

    sel = _selection(suites, suite_run_ids, since, until, commits, hosts)
    suite_thr = suite_thresholds(suites[0])[1] if len(suites) == 1 else None
    info = build_report(results, out, sel, gate=resolve_gate(suite_thr, thresholds_file), baseline=Baseline(window),
                        title=title)
    verdict = {None: "no runs", 0: "no regression", 1: "REGRESSION", 3: "not enough data"}[info.exit_code]
    console.print(f"report: {info.path} ({info.rows} runs, {info.failed} failed, {info.suite_runs} suite runs; "
                  f"newest suite run: {verdict})", highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------


def main() -> None:
    """Console entry point: user errors are one line and exit 2; bugs keep their traceback."""
    try:
        bench.main(standalone_mode=False)
    except UserError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except click.UsageError as e:  # one line, like every other bad input
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx else ""
        err_console.print(f"[bold red]error:[/] {escape(e.format_message())}{hint}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


if __name__ == "__main__":
    main()
