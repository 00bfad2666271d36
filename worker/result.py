"""The run's result document (schema `streambench.run/1`): what one run measured, nothing invented.

Keys are stable (the orchestrator maps them onto its Arrow schema); a value the run cannot know is
None. Written as temp file + rename so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any

import psutil
import torch

from worker import __version__, envs
from worker.config import RunConfig
from worker.files import write_atomic
from worker.generate import Generation
from worker.units import GB

RESULT_SCHEMA = "streambench.run/1"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def system_info(device: torch.device) -> dict[str, Any]:
    """The host as the run saw it; the GPU fields (name, index, UUID, CUDA_VISIBLE_DEVICES) are those
    of the run's own device, so two runs on one multi-GPU host say which card each had."""
    try:
        from worker.host.hostinfo import host_fingerprint

        fp = host_fingerprint(None, device.index if device.type == "cuda" else None)
    except ImportError:
        fp = {"hostname": platform.node()}
    return {**fp, "device": device.type, "torch_version": str(torch.__version__), "engine_version": __version__}


def memory(device: torch.device, pinned_bytes: int | None) -> dict[str, Any]:
    cuda = device.type == "cuda"
    return {
        "gpu_max_allocated_gb": torch.cuda.max_memory_allocated(device) / GB if cuda else None,
        "gpu_max_reserved_gb": torch.cuda.max_memory_reserved(device) / GB if cuda else None,
        "host_rss_gb": psutil.Process().memory_info().rss / GB,
        "pinned_host_gb": None if pinned_bytes is None else pinned_bytes / GB,
    }


def kv_tiers(io: dict[str, Any]) -> dict[str, Any]:
    """The KV cache's bytes per tier (GPU, pinned CPU, SSD spill) and its write-back throttling; the
    top-k budget (tokens as asked, blocks per row and layer; 0 = exact) and what decode fetched from
    the host tier: mean blocks per (row, layer) step and KV bytes per decode step (every row and layer)."""
    tiers, throttle, step = io.get("kv_bytes") or {}, io.get("kv_throttle") or {}, io.get("kv_step") or {}
    return {**{f"kv_{t}_gb": tiers[t] / GB if t in tiers else None for t in ("gpu", "cpu", "ssd")},
            "kv_write_backoffs": throttle.get("backoffs"),
            "topk_budget_tokens": step.get("topk_budget_tokens"), "topk_blocks": step.get("topk_blocks"),
            "kv_blocks_read_per_step": step.get("blocks_read_per_step"),
            "kv_bytes_per_step": step.get("bytes_per_step")}


def build_result(cfg: RunConfig, engine, pack, device: torch.device, gen: Generation,
                 prompt_ids: list[list[int]], tok, base_env: dict[str, str], locks=None) -> dict[str, Any]:
    mc = engine.cfg
    model = {
        "name": Path(cfg.checkpoints).name,
        "n_layers": mc.num_hidden_layers,
        "dtype": pack.manifest.dtype,
        "hidden_size": mc.hidden_size,
        "n_params": pack.n_params(),
        "weight_bytes": sum(t.nbytes for t in pack.manifest.tensors),
        "weight_format": pack.manifest.weight_format,
    }
    return assemble_result(cfg, model, device, gen, prompt_ids, tok, base_env, engine.io(), locks, pack)


def pack_record(pack=None) -> dict[str, Any]:
    """Which pack the run read and how it was checked before use (worker.pack.verify); all None for
    the peer, which reads the checkpoint itself."""
    check = (pack.check if pack is not None else None) or {}
    return {"manifest": str(pack.manifest_path) if pack is not None else None,
            "blob": str(pack.blob_path) if pack is not None else None,
            "check": check.get("check"), "verified_at": check.get("verified_at")}


def assemble_result(cfg: RunConfig, model: dict[str, Any], device: torch.device, gen: Generation,
                    prompt_ids: list[list[int]], tok, base_env: dict[str, str],
                    io: dict[str, Any], locks=None, pack=None) -> dict[str, Any]:
    """The document around one measured generation; shared by the streaming engine and the peer.

    `io` is the engine's `io()` dict (channels, pinned_host_bytes, roofline, warnings, the weight
    streamer's `gpu_slots` {attn, ffn}, and the KV cache's bytes per tier `kv_bytes` {gpu, cpu, ssd},
    write throttle `kv_throttle` and top-k budget and fetches `kv_step`); missing channels are None
    (the accelerate peer exposes none).
    """
    bsz = len(prompt_ids)
    decode_s = gen.decode_ms / 1e3
    metrics = {
        "ttft_ms": gen.ttft_ms,
        "prefill_ms": gen.prefill_ms,
        "decode_ms": gen.decode_ms,
        "decode_tok_s": bsz * gen.decode_steps / decode_s if decode_s > 0 else None,
        "e2e_ms": gen.e2e_ms,
        "itl_ms": gen.itl_ms,
        "itl_p50_ms": percentile(gen.itl_ms, 50),
        "itl_p90_ms": percentile(gen.itl_ms, 90),
        "itl_p99_ms": percentile(gen.itl_ms, 99),
        "batch_size": bsz,
        "prompt_len": max(len(p) for p in prompt_ids),
        "prompt_tokens": sum(len(p) for p in prompt_ids),
        "generated_tokens": sum(len(t) for t in gen.token_ids),
        "decode_steps": gen.decode_steps,
        **memory(device, io.get("pinned_host_bytes")),
        **kv_tiers(io),
        "gpu_slots": io.get("gpu_slots"),  # streamed weight slots per group kind; None when nothing streams
    }
    return {
        "schema": RESULT_SCHEMA,
        "status": "ok",
        "config": cfg.to_dict(),
        "environment": {"applied_defaults": base_env, "variables": envs.snapshot()},
        "model": model,
        "system": system_info(device),
        "metrics": metrics,
        "io": {ch: io.get(ch) for ch in ("ssd_read", "weight_h2d", "kv_h2d", "kv_d2h", "kv_ssd")
               if ch != "kv_ssd" or io.get(ch) is not None},  # kv_ssd only when the KV cache spilled
        "roofline": io.get("roofline"),
        "locks": locks.to_dict() if locks is not None else None,  # the devices held, and the wait for them
        "pack": pack_record(pack),
        "warnings": io.get("warnings", []),
        "accuracy": None,  # worker.run fills it when accuracy_ref is set (worker.quant.accuracy)
        "setup": None,  # worker.run fills it last: each phase's host time (worker.host.walltime)
        "outputs": [
            {"prompt_token_ids": p, "token_ids": t, "text": tok.decode(t, skip_special_tokens=True)}
            for p, t in zip(prompt_ids, gen.token_ids)
        ],
    }


def write_json(doc: dict[str, Any], path: str | os.PathLike) -> None:
    write_atomic(path, json.dumps(doc, indent=2), "result JSON")
