"""One benchmark run on this host: the seed's `bench_infer.py` as a library function.

`run(cfg)` is what `bench run` and the Ray actors call. It resolves the device, packs the checkpoint
on first use, builds the engine for the mode, runs untimed warm-up rounds and one measured round,
and returns the result dict (schema `streambench.run/1`), also written to `cfg.out_json`. A run that
streams from the SSD measures the disk just before its engine is built and just after it is closed
(`worker.host.adjacent`) for its floor; every phase's host time goes in the result's `setup` section
(`worker.host.walltime`). With `accuracy_ref`, the engine's agreement with the native weights is
computed after the measured round's numbers are taken, before the engine closes (`worker.quant.accuracy`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Callable

import torch

from worker import envs
from worker.config import RunConfig
from worker.errors import UserError
from worker.files import check_output_file
from worker.generate import Generation, decode_spans, generate, measure
from worker.host import adjacent, devlock
from worker.host.cudactx import EarlyContext
from worker.host.interp import quiet_interpreter
from worker.host.reuse import EngineCache, engine_key
from worker.host.reuse import record as reuse_record
from worker.host.walltime import RunClock
from worker.model.geometry import ModelConfig
from worker.result import build_result, write_json
from worker.text.prompts import eos_ids, pad_id, prompt_ids_for
from worker.units import MiB

log = logging.getLogger(__name__)

Phase = Callable[[str], None]


def resolve_config(flat: dict[str, Any], where: str = "bench run") -> RunConfig:
    """Defaults < WSM_* environment < explicit values."""
    cfg = RunConfig.from_flat({**envs.wsm_overrides(), **flat}, where=where)
    if not cfg.checkpoints:
        raise UserError("--checkpoints is required: a HF checkpoint directory "
                        "(make a synthetic one with `bench make-model DIR`)")
    return cfg


def run_from_overrides(flat: dict[str, Any]) -> dict[str, Any]:
    return run(resolve_config(flat))


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is visible; use --device auto or cpu")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def run(cfg: RunConfig, on_phase: Phase | None = None, reuse: EngineCache | None = None) -> dict[str, Any]:
    """`reuse`: a worker's `EngineCache` when its suite says `reuse: weights` (worker.host.reuse)."""
    clock = RunClock()  # first: process_s ends here
    host_free = threading.Event()  # the CPU tier's fill no longer needs the host to itself (compile_cache)
    try:
        return _run(cfg, on_phase or (lambda name: None), clock, reuse, host_free)
    finally:
        host_free.set()  # on every way out: the compiler's import never waits on a run that is over
        clock.close()


def _run(cfg: RunConfig, phase: Phase, clock: RunClock, reuse: EngineCache | None,
         host_free: threading.Event) -> dict[str, Any]:
    applied = envs.apply_base_process_env()
    if envs.omp_threads():
        torch.set_num_threads(envs.omp_threads())
    if cfg.verbose:
        logging.getLogger("worker").setLevel(logging.DEBUG)
    device = pick_device(cfg.device)
    if cfg.out_json:
        check_output_file(cfg.out_json, "--out-json")  # before any work: a run whose result cannot land is lost
    if cfg.engine == "accelerate":
        if reuse is not None:
            reuse.close()  # the peer loads its own copy: a kept engine's memory and locks must go first
        with clock.phase("imports"):
            from worker.peer import run_peer

        return run_peer(cfg, device, phase, base_env=applied, clock=clock)

    with clock.phase("imports"):
        from worker.engine import build_engine, compiles
        from worker.model import aot, compile_cache
        from worker.pack.cache import ensure_pack
        from worker.stream.plan import place
        from worker.text.checkpoint import load_tokenizer

    compiled_since = compile_cache.counters()  # this run's compiles: the process may have done others before
    if not cfg.manifest:
        ModelConfig.from_hf_dir(cfg.checkpoints)  # a missing or non-Llama checkpoint is the first error
    if cfg.accuracy_ref:
        from worker.quant.accuracy import check_reference

        check_reference(cfg.checkpoints)
    # beside tokenizer..upload; after the checks above, so a run refused there exits at once instead of
    # waiting for the compiler's import (the side thread is not a daemon)
    compiling = compiles(cfg, device)
    if compiling:
        aot.enabled()  # a bad STREAMBENCH_COMPILE_WHOLE fails here, before any work
    ahead = cfg.compile_ahead and compiling and compile_cache.prepare_ahead(after=host_free)
    context = EarlyContext(device)  # before the fill's first registration needs it (worker.host.cudactx)
    with clock.phase("tokenizer"):
        tok = reuse.tokenizer(cfg.checkpoints, load_tokenizer) if reuse is not None else load_tokenizer(cfg.checkpoints)
        prompt_ids = prompt_ids_for(tok, cfg)  # bad prompts fail before anything is packed
    phase("pack")
    with clock.phase("pack"):
        pack = ensure_pack(cfg.checkpoints, pack_dir=cfg.pack_dir, manifest=cfg.manifest, raw_device=cfg.raw_device,
                           dtype=None if cfg.dtype == "auto" else cfg.dtype, verify_days=cfg.pack_verify_days,
                           weights=cfg.weights)
    phase("load")
    placement = place(cfg.stream.mode, pack.manifest.model_config.num_hidden_layers, cfg.stream)
    extents = adjacent.ssd_extents(pack.manifest, placement)
    prompt_tokens = max(len(p) for p in prompt_ids)
    key = engine_key(cfg, pack, device, prompt_tokens) if reuse is not None else None
    kept = reuse.take(key) if reuse is not None else None
    reused = kept is not None
    if reused or not placement.layers("cpu") or cfg.stream.fill_behind:
        host_free.set()  # no fill, or one behind the build: nothing to keep the host for
    locks = contextlib.ExitStack()  # a fresh engine's device locks (a kept engine's are the cache's)
    try:
        held = kept.held if reused else locks.enter_context(
            devlock.hold([devlock.device_key(device), devlock.disk_key(pack.blob_path)], cfg.device_wait_s))
        clock.overlapped("cuda_context", context.wait())
        before = _ssd_window(cfg, pack, extents, device, clock, "before")  # the disk, just before the engine
        if reused:
            engine = kept.engine
        else:
            with clock.phase("slots"):
                engine = build_engine(cfg, pack, device, prompt_tokens=prompt_tokens, on_host_free=host_free.set)
            clock.cpu_fill(getattr(engine.weights, "cpu_fill", None))  # read off the build: no stats, no sync
            clock.build_parts(engine.build.get("spans", {}), engine.build.get("upload"))
            clock.overlapped("compile_prepare", compile_cache.prepare().get("prepare_s") if ahead else None)
            if reuse is not None:
                kept = reuse.keep(key, engine, held, locks.pop_all())  # the cache owns engine and locks now
        if _done_with_disk(cfg, pack, extents):
            held.release(devlock.disk_key(pack.blob_path))
        try:
            gen = _measure(engine, cfg, prompt_ids, tok, device, phase, clock)
            result = build_result(cfg, engine, pack, device, gen, prompt_ids, tok, base_env=applied, locks=held)
            placement = engine.placement
            kv_step = engine.kv_step_bytes(result["metrics"]["batch_size"],
                                           result["metrics"]["prompt_len"] + gen.decode_steps // 2)
            compiled = compile_cache.report(compiled_since)  # the run's compiles, not the accuracy check's
            if cfg.accuracy_ref:
                result["accuracy"] = _accuracy(engine, cfg, pack, prompt_ids, gen, device, clock)
                if "error" in result["accuracy"]:
                    result["warnings"].append(result["accuracy"]["error"])
        finally:
            if kept is None:
                with clock.phase("close"):
                    engine.close()
        after = _ssd_window(cfg, pack, extents, device, clock, "after")  # and just after it is gone (or idle)
        if cfg.roofline:
            with clock.phase("probe"):
                result["roofline"] = _roofline(pack, placement, result["metrics"], gen, kv_step, before, after, cfg)
    except BaseException:
        if reuse is not None:
            reuse.drop()  # a failed run leaves the engine in an unknown state
        raise
    finally:
        locks.close()
    result["reuse"] = reuse_record("weights" if reuse is not None else "none", reused, key,
                                   kept.runs + 1 if kept is not None else 1)
    result["locks"] = held.to_dict()  # with the release time: the devices were the run's until then
    roof = result["roofline"] or {}
    if roof.get("floor_suspect"):
        from worker.host.roofline import suspect_warning

        result["warnings"].append(suspect_warning(roof))
        log.warning("%s", result["warnings"][-1])
    result["setup"] = clock.report()
    result["compile_cache"] = compiled
    if cfg.out_json:
        write_json(result, cfg.out_json)
    phase("done")
    return result


def _measure(engine, cfg: RunConfig, prompt_ids, tok, device, phase: Phase, clock: RunClock) -> Generation:
    cache = engine.new_cache(len(prompt_ids), cfg.max_seq_len)  # reused: every round starts with a prefill
    graphs = _graphs(engine, cfg, cache, len(prompt_ids), device)

    def once(new_tokens: int) -> Generation:
        return generate(engine.model, cache, prompt_ids, new_tokens, cfg.sampling.temperature,
                        cfg.sampling.top_p, cfg.sampling.seed, engine.cfg.eos_token_ids or eos_ids(tok),
                        pad_id(tok), device, decode=graphs, capacity=cfg.max_seq_len)

    def prepare() -> None:  # capture every span the measured round will use, outside its timing
        settle = getattr(engine.weights, "settle_fill", None)  # a CPU tier filled behind the warm-up ends first
        t = time.perf_counter()
        if settle is not None and (stats := settle()) is not None:
            clock.add("fill", time.perf_counter() - t)
            clock.fill_behind(stats)
        if graphs is not None:
            with clock.phase("warmup"):
                graphs.prepare(decode_spans(max(len(p) for p in prompt_ids), cfg.max_new_tokens, cfg.max_seq_len))

    def start() -> dict[str, int]:
        engine.reset_counters()
        return getattr(engine.weights, "prefetched", dict)()

    with quiet_interpreter(cfg.gc_freeze, cfg.switch_interval_us):
        return measure(clock.rounds_of(once, cfg.warmup_rounds), cfg.warmup_rounds, cfg.max_new_tokens, device,
                       phase, prepare=prepare, start=start)


def _accuracy(engine, cfg: RunConfig, pack, prompt_ids, gen: Generation, device: torch.device,
              clock: RunClock) -> dict[str, Any]:
    """After `build_result` took every measured number (times, bytes, peak memory, counters), so the
    extra forwards change none of them; timed as the `accuracy` setup phase. A reference that does not
    fit in memory costs the comparison, not the measured run: an `error` and a warning."""
    from worker.quant.accuracy import measure_accuracy

    with clock.phase("accuracy"):
        try:
            return measure_accuracy(engine, cfg.checkpoints, prompt_ids, gen.token_ids, cfg.max_seq_len,
                                    getattr(torch, pack.manifest.dtype), device)
        except torch.OutOfMemoryError as e:
            msg = f"accuracy vs {cfg.accuracy_ref} skipped: the reference did not fit ({str(e).splitlines()[0]})"
            log.warning("%s", msg)
            return {"ref": cfg.accuracy_ref, "error": msg}


def _graphs(engine, cfg: RunConfig, cache, batch: int, device: torch.device):
    """CUDA-graphed decode for all-resident weights on CUDA, with the plain cache or a paged one whose
    steady top-k steps need no host (`PagedKVCache.can_graph`), else None (eager)."""
    from worker.kv.static import StaticKVCache
    from worker.model.graphs import GraphedDecode
    from worker.stream.resident import ResidentWeights

    if not (cfg.cuda_graphs and device.type == "cuda" and isinstance(engine.weights, ResidentWeights)):
        return None
    if isinstance(cache, StaticKVCache) or (hasattr(cache, "can_graph") and cache.can_graph()):
        return GraphedDecode(engine.model, cache, batch, device)
    return None


def _probe_path(pack) -> str:
    return str(pack.blob_path.parent if pack.blob_path.is_file() else pack.blob_path)


def _done_with_disk(cfg: RunConfig, pack, extents: list) -> bool:
    """Whether the built engine never reads its disk again: weights all in memory, no KV spilled to the
    SSD, and no host probe still to measure it. Then the disk's lock goes back before the measured
    round, so another GPU's engine can fill from the same disk meanwhile (its fill is not spoiled:
    this engine reads nothing from it), and engines on one disk run in parallel, not in turn."""
    if extents or cfg.kv.kv_offload == "ssd":
        return False
    from worker.host.probe import cached_for

    return not cfg.roofline or cached_for(_probe_path(pack), quick=True) is not None


def _ssd_window(cfg: RunConfig, pack, extents: list[tuple[int, int]], device: torch.device, clock: RunClock,
                when: str) -> dict[str, Any] | None:
    """One adjacent SSD window (worker.host.adjacent) for a run that streams from the SSD and reports
    a floor; None otherwise (nothing is read)."""
    if not (cfg.roofline and extents and cfg.floor_window_s > 0):
        return None
    with clock.phase("probe"):
        window = adjacent.measure(str(pack.blob_path), extents, cfg.stream.ssd_readers, cfg.stream.staging_mb * MiB,
                                  cfg.floor_window_s, device)
    log.info("floor: SSD %s the run: %s", when, adjacent.describe(window))
    return window


def _roofline(pack, placement, metrics: dict[str, Any], gen: Generation, kv_step, before, after,
              cfg: RunConfig) -> dict[str, Any] | None:
    from worker.host.probe import probe_host
    from worker.host.roofline import roofline

    probe = probe_host(path=_probe_path(pack), quick=True)
    roof = roofline(pack.manifest, placement, probe, metrics["batch_size"], metrics["prompt_len"],
                    gen.prefill_ms, gen.decode_ms, gen.decode_steps, credit=gen.prefetched, kv_step=kv_step,
                    ssd_gbps=adjacent.floor_ssd(before, after))
    if roof is not None and (before or after):
        roof["ssd_adjacent"] = adjacent.record(before, after, cfg.floor_window_s, cfg.stream.ssd_readers,
                                               cfg.stream.staging_mb * MiB)
    return roof
