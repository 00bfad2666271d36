"""Build the streaming engine for a run: a model, its weight source and its KV cache factory.

Modes differ only in the weight source (and, later, the cache); the forward is the same object code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from worker.config import RunConfig
from worker.errors import UserError
from worker.kvcache import StaticKVCache
from worker.model import Llama
from worker.model_config import ModelConfig
from worker.stream.plan import Placement, place
from worker.stream.streamer import WeightStreamer
from worker.weights import ResidentWeights

log = logging.getLogger(__name__)


@dataclass
class Engine:
    cfg: ModelConfig
    model: Llama
    weights: Any
    placement: Placement
    new_cache: Callable[[int, int], Any]  # (batch, max_seq) → cache

    def io(self) -> dict[str, Any]:
        stats = getattr(self.weights, "io_stats", None)
        return stats() if stats else {}

    def close(self) -> None:
        close = getattr(self.weights, "close", None)
        if close:
            close()


def build_engine(run: RunConfig, pack, device: torch.device, prompt_tokens: int | None = None) -> Engine:
    """`prompt_tokens` (the longest prompt fed) sizes the activation workspace; default the longest allowed."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cfg = pack.manifest.model_config
    dtype = getattr(torch, pack.manifest.dtype)
    mode = run.stream.mode
    limit_gpu_memory(run.stream.gpu_memory_limit_gb, device)
    placement = place(mode, cfg.num_hidden_layers, run.stream)
    try:
        if mode == "gpu":
            weights = ResidentWeights.from_pack(pack, device)
        else:
            weights = WeightStreamer(pack, placement, run.stream, device, reserve_bytes=workspace_bytes(run, cfg, prompt_tokens))
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"mode {mode}: the weights placed on the GPU do not fit in its memory"
                        f"{_limit_note(run)}; lower --gpu-max-groups / --gpu-cached-layers or use a "
                        "streaming mode") from None
    log.info("engine: mode=%s device=%s dtype=%s layers=%d", mode, device, dtype, cfg.num_hidden_layers)
    model = Llama(cfg, weights, device)
    return Engine(cfg, model, weights, placement, lambda b, s: StaticKVCache(cfg, b, s, device, dtype))


def limit_gpu_memory(limit_gb: float | None, device: torch.device) -> None:
    """Make a big card act as a small one: cap what the caching allocator may hand out."""
    if limit_gb is None or device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    if limit_gb * 1e9 > total:
        raise UserError(f"gpu_memory_limit_gb={limit_gb} is more than the card's {total / 1e9:.1f} GB")
    torch.cuda.set_per_process_memory_fraction(limit_gb * 1e9 / total, device)


def _limit_note(run: RunConfig) -> str:
    lim = run.stream.gpu_memory_limit_gb
    return f" (capped at {lim} GB by --gpu-memory-limit-gb)" if lim else ""


def workspace_bytes(run: RunConfig, cfg: ModelConfig, prompt_tokens: int | None = None) -> int:
    """What a run needs on the GPU besides weights: the KV cache and the largest activations (an
    estimate used only to size the streaming slots under --gpu-memory-limit-gb)."""
    item = 4 if run.dtype == "float32" or cfg.dtype == "float32" else 2
    kv = 2 * cfg.num_hidden_layers * run.batch_size * cfg.num_key_value_heads * cfg.head_dim * run.max_seq_len * item
    tokens = run.batch_size * (prompt_tokens or run.max_prompt_tokens)
    act = tokens * (6 * cfg.hidden_size + 3 * cfg.intermediate_size) * item + run.batch_size * cfg.vocab_size * 4
    return kv + act
