"""`bench`: benchmark SSD-streaming LLM inference, on one host or a Ray cluster.

Thin Click commands over library functions: the single-host commands here, the cluster commands in
`orchestrator/commands.py`. Bad input ends with a one-line `error:` message and exit code 2;
user-facing output goes through rich/Click in these two modules and nowhere else.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys

import click
from rich.markup import escape

from orchestrator.cli import interrupts
from orchestrator.cli.console import console, echo_json, err_console
from orchestrator.cli.options import given, run_options, weight_options
from worker.errors import UserError
from worker.synth.presets import PRESETS, TRAINED_PRESETS


def _version(ctx: click.Context, _param, value: bool) -> None:
    """`bench --version`: the package version, and the commit when run from a checkout."""
    if not value or ctx.resilient_parsing:
        return
    from worker import __version__
    from worker.host import hostinfo

    commit = hostinfo.git_commit()
    where = f" (commit {commit[:12]}{', uncommitted changes' if hostinfo.git_dirty() else ''})" if commit else ""
    click.echo(f"streambench {hostinfo.engine_version() or __version__}{where}")
    ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_version,
              help="Print the version (and the git commit of a checkout) and exit.")
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
    from worker import run as runner

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
        t.add_row("decode attainment", f"{roof['attainment_decode']:.2f} of the I/O floor"
                  + ("  (floor suspect: see the JSON's warnings)" if roof.get("floor_suspect") else ""))
    if roof.get("floor_ssd_gbps") is not None:
        t.add_row("floor SSD", f"{roof['floor_ssd_gbps']:,.2f} GB/s ({roof.get('floor_ssd_source')}; probe "
                               f"{fmt(roof.get('ssd_gbps'), ' GB/s')})")
    acc = result.get("accuracy") or {}
    if acc.get("positions"):
        t.add_row(f"vs {acc['ref']} (teacher-forced)", f"top-1 agreement {acc['top1_agreement']:.4f}, mean KL "
                  f"{acc['mean_kl']:.3g} nats over {acc['positions']} positions")
    setup = result.get("setup") or {}
    if setup.get("wall_s"):
        t.add_row("wall time", f"{setup['wall_s']:,.2f} s, {setup['measure_s']:,.2f} s of it measured")
    return t


# --- synthetic checkpoints and prompts ---


@bench.command("make-model")
@click.argument("out_dir", type=click.Path())
@click.option("--preset", type=click.Choice([*PRESETS, *TRAINED_PRESETS]), default="tiny", show_default=True,
              help="Geometry: tiny (CPU tests) or the real Llama-3.1 8B / 70B shapes; or recall: a small Llama "
                   "trained on associative recall (the reference model of top-k accuracy).")
@click.option("--layers", type=click.IntRange(min=1), default=None, help="Number of layers [default: the preset's].")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16",
              show_default=True, help="Dtype of the weights.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the random weights (recall: of training).")
@click.option("--tie-embeddings", is_flag=True, help="Tie lm_head to the embeddings (no lm_head tensor).")
@click.option("--shard-max-gb", type=click.FloatRange(min=0, min_open=True), default=5.0, show_default=True,
              help="Largest safetensors shard.")
@click.option("--train-size", type=click.Choice(["cpu", "gpu"]), default=None,
              help="recall only: train this size here with the committed recipe (cpu: minutes on a CPU, to 2k "
                   "tokens; gpu: minutes on an H200, to 32k) instead of copying the committed cpu-size model.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it is not empty.")
def make_model_cmd(out_dir: str, preset: str, layers: int | None, dtype: str, seed: int, tie_embeddings: bool,
                   shard_max_gb: float, train_size: str | None, force: bool) -> None:
    """Write a random-weight Llama-3.1 checkpoint (HF format + local tokenizer) for tests and benchmarks,
    or the trained recall model."""
    from worker.synth.checkpoints import dir_size, make_model

    if preset in TRAINED_PRESETS:
        path = _make_recall(out_dir, layers, tie_embeddings, seed, train_size, force)
    else:
        if train_size is not None:
            raise UserError(f"--train-size applies to the recall preset only (got --preset {preset})")
        overrides = {"tie_word_embeddings": True} if tie_embeddings else None
        path = make_model(out_dir, preset=preset, layers=layers, dtype=dtype, seed=seed, overrides=overrides,
                          shard_max_gb=shard_max_gb, force=force)
    console.print(f"{path} ({dir_size(path) / 1e9:.2f} GB)", highlight=False, soft_wrap=True)


def _make_recall(out_dir: str, layers: int | None, tie: bool, seed: int, train_size: str | None, force: bool):
    from worker.recall.build import copy_reference, make_recall_model

    ctx = click.get_current_context()
    fixed = [f"--{n.replace('_', '-')}" for n in ("layers", "dtype", "tie_embeddings", "shard_max_gb")
             if ctx.get_parameter_source(n) != click.core.ParameterSource.DEFAULT]
    if fixed:
        raise UserError(f"the recall preset is a trained model of a fixed geometry (float32): {', '.join(fixed)} "
                        "does not apply; drop it")
    if train_size is None:
        if ctx.get_parameter_source("seed") != click.core.ParameterSource.DEFAULT:
            raise UserError("--seed needs --train-size: without it the committed recall model is copied")
        return copy_reference(out_dir, force=force)
    return make_recall_model(out_dir, size=train_size, seed=seed, force=force)


@bench.command("make-prompts")
@click.option("--checkpoints", required=True, type=click.Path(), help="Checkpoint whose tokenizer counts tokens.")
@click.option("--n", "n", type=click.IntRange(min=1), default=512, show_default=True, help="Number of prompts.")
@click.option("--len", "length", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Tokens per prompt (exact, without special tokens).")
@click.option("--out", "out_path", required=True, type=click.Path(), help="Prompt file to write (one per line).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the prompt text.")
def make_prompts_cmd(checkpoints: str, n: int, length: int, out_path: str, seed: int) -> None:
    """Write N prompts of exactly LEN tokens each (the seed's prompts_batch512_len2048.txt)."""
    from worker.text.prompts import make_prompts

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
@weight_options
@click.option("--force", is_flag=True, help="Re-pack even if up to date; overwrite a raw device holding a filesystem.")
def pack_cmd(checkpoints: str, out_dir: str | None, raw_device: str | None, manifest: str | None, dtype: str,
             weight_format: str, quant_group_size: int, quantize_head: bool, force: bool) -> None:
    """Pack a checkpoint into an aligned, grouped blob + runtime manifest (what streaming reads)."""
    from worker.pack.blob import Pack
    from worker.pack.cache import ensure_pack
    from worker.pack.packer import pack_checkpoint
    from worker.quant.formats import WeightSpec

    weights = WeightSpec(weight_format, quant_group_size, quantize_head)

    if raw_device and out_dir:
        raise UserError("--raw-device and --out-dir are exclusive: a pack goes to a directory or onto a device")
    if bool(raw_device) != bool(manifest):
        raise UserError("--raw-device and --manifest go together: the manifest records what is on the device")
    if raw_device:
        pack_checkpoint(checkpoints, raw_device, manifest, dtype=None if dtype == "auto" else dtype, force=force,
                        weights=weights)
        pack = Pack.open(manifest)
    else:
        pack = ensure_pack(checkpoints, pack_dir=out_dir, dtype=dtype, repack=force, weights=weights)
    m = pack.manifest
    console.print(f"manifest: {pack.manifest_path}\nblob:     {pack.blob_path} ({m.blob_size / 1e9:.2f} GB, "
                  f"{m.dtype}, {m.weight_format} weights, {len(m.groups)} groups, {len(m.tensors)} tensors)",
                  highlight=False, soft_wrap=True)


@bench.command("dequantize")
@click.option("--checkpoints", type=click.Path(), default=None, help="HF checkpoint whose quantized pack to use.")
@click.option("--manifest", type=click.Path(), default=None, help="Or: the manifest of a quantized pack.")
@click.option("--out", "out_dir", required=True, type=click.Path(), help="New directory for the HF checkpoint.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="Dtype of the written weights (float32 keeps the dequantized values exact).")
@click.option("--pack-dir", type=click.Path(), default=None, help="Pack cache directory (as `bench run --pack-dir`).")
@weight_options
def dequantize_cmd(checkpoints: str | None, manifest: str | None, out_dir: str, dtype: str, pack_dir: str | None,
                   weight_format: str, quant_group_size: int, quantize_head: bool) -> None:
    """Write a quantized pack's weights, dequantized, as a plain HF checkpoint (what HF runs for "exact")."""
    from worker.pack.cache import ensure_pack
    from worker.quant.export import check_out_dir, dequantize_pack
    from worker.quant.formats import WeightSpec

    if bool(checkpoints) == bool(manifest):
        raise UserError("give exactly one of --checkpoints DIR (its pack of --weight-format) or --manifest FILE")
    weights = WeightSpec(weight_format, quant_group_size, quantize_head)
    check_out_dir(out_dir, [p for p in (checkpoints, manifest) if p])  # before any packing
    if manifest:
        from worker.pack.blob import Pack

        pack = Pack.open(manifest)
    else:
        pack = ensure_pack(checkpoints, pack_dir=pack_dir, weights=weights)
    with pack:
        out = dequantize_pack(pack, out_dir, dtype)
    console.print(f"{out} ({pack.manifest.weight_format} → {dtype})", highlight=False, soft_wrap=True)


@bench.command("verify")
@click.option("--manifest", required=True, type=click.Path(), help="Manifest of the pack to check.")
@click.option("--raw-device", type=click.Path(), default=None, help="The blob, if not where the manifest says.")
def verify_cmd(manifest: str, raw_device: str | None) -> None:
    """Check every group of a pack against its checksum; exit 1 listing the bad groups."""
    from worker.pack.blob import Pack
    from worker.pack.verify import verify_pack

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
              help="Disk to measure: a file or raw block device (read only) or a directory (its pack blob is read "
                   "if it holds one, else a scratch file is written there) [default: the cache directory].")
@click.option("--refresh", is_flag=True, help="Measure again even if this host has cached figures.")
@click.option("--quick", is_flag=True, help="A small, fast probe (seconds; rough figures).")
@click.option("--json", "as_json", is_flag=True, help="Print the probe document as JSON.")
def probe_cmd(path: str | None, refresh: bool, quick: bool, as_json: bool) -> None:
    """Measure this host's SSD (O_DIRECT), PCIe H2D/D2H and HBM bandwidth once, and cache it (the roofline)."""
    from rich.table import Table

    from worker.host.probe import cache_path, probe_host

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
              f"{fmt(doc['ssd_gbps'])}  best of {len(ssd['sweep'])} (lowest {min(p['gbps'] for p in ssd['sweep']):,.2f}"
              f"): {ssd['best']['threads']} thread(s) × {ssd['best']['request_mib']:g} MiB · "
              f"{ssd.get('read', doc['ssd_path'])} ({ssd.get('fs_type')})")
    t.add_row("H2D" if doc["hbm_gbps"] is not None else "H2D (host memcpy, no CUDA)", fmt(doc["h2d_gbps"]))
    t.add_row("H2D pageable", fmt(doc["h2d_pageable_gbps"]))
    t.add_row("D2H", fmt(doc["d2h_gbps"]))
    t.add_row("HBM (read + write)", fmt(doc["hbm_gbps"]))
    console.print(t)
    for w in doc.get("warnings", []):
        err_console.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    console.print(f"cached: {cache_path()}" + ("  (quick probe)" if doc.get("quick") else ""),
                  highlight=False, soft_wrap=True)

# ---------------------------------------------------------------------------------------------


def _add_cluster_commands() -> None:
    from orchestrator.cli import analysis, bisect, commands

    for command in commands.COMMANDS + analysis.COMMANDS + bisect.COMMANDS:
        bench.add_command(command)


_add_cluster_commands()


def _interrupted(what: str) -> None:
    """Exit 130 for Ctrl-C; a second Ctrl-C while the process winds down (atexit handlers, Ray's
    shutdown) must not turn that into a death by signal."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    err_console.print(what)
    sys.exit(130)


def main() -> None:
    """Console entry point: user errors are one line and exit 2, as is a full disk (the fix is the user's:
    free space or write elsewhere); bugs keep their traceback."""
    try:
        from worker.host.bytecode import use_bytecode_cache

        use_bytecode_cache()  # before anything imports torch (see worker/host/bytecode.py)
        interrupts.install()
        bench.main(standalone_mode=False)
    except UserError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Abort:
        _interrupted("aborted")
    except click.UsageError as e:  # one line, like every other bad input
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx else ""
        err_console.print(f"[bold red]error:[/] {escape(e.format_message())}{hint}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        _interrupted("interrupted")
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise  # any other I/O failure keeps its traceback: it may be a bug
        where = f" writing {e.filename}" if e.filename else ""
        command = next((a for a in sys.argv[1:] if a in bench.commands), "")
        err_console.print(f"[bold red]error:[/] {escape(os.strerror(e.errno).lower())}{escape(where)} during "
                          f"`bench {escape(command)}`: free space on that disk or point the command's output "
                          "elsewhere", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
