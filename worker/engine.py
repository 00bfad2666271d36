"""Build the streaming engine for a run: a model, its weight source and its KV cache factory.

Modes differ only in the weight source and the cache; the forward is the same object code. The KV
side (`worker.kv`) is validated and its global block tracker created before the model is built, in
the seed's order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from worker.config import RunConfig
from worker.errors import UserError
from worker.host.walltime import Spans
from worker.kv.factory import KVFactory, merge_io, tier_bytes
from worker.kv.tracker import init_global_tracker
from worker.model.geometry import ModelConfig
from worker.model.llama import Llama
from worker.stream.plan import Placement, place
from worker.stream.resident import ResidentWeights
from worker.stream.streamer import WeightStreamer

log = logging.getLogger(__name__)


@dataclass
class Engine:
    cfg: ModelConfig
    model: Llama
    weights: Any
    placement: Placement
    new_cache: Callable[[int, int], Any]  # (batch, max_seq) → cache (a KVFactory)

    def io(self) -> dict[str, Any]:
        stats = getattr(self.weights, "io_stats", None)
        kv = getattr(self.new_cache, "io_stats", None)
        return merge_io(stats() if stats else {}, kv() if kv else {})

    def reset_counters(self) -> None:
        for part in (self.weights, self.new_cache):
            reset = getattr(part, "reset_counters", None)
            if reset:
                reset()

    def kv_step_bytes(self, batch: int, context: int) -> dict[str, int] | None:
        step = getattr(self.new_cache, "step_bytes", None)
        return step(batch, context) if step else None

    device: torch.device | None = None
    build: dict[str, Any] = field(default_factory=dict)  # {"spans": name → s, "upload": stats}: slots_parts

    def close(self) -> None:
        for part in (self.new_cache, self.weights):
            close = getattr(part, "close", None)
            if close:
                close()
        if self.device is not None:
            lift_gpu_memory_limit(self.device)


def build_engine(run: RunConfig, pack, device: torch.device, prompt_tokens: int | None = None,
                 on_host_free: Callable[[], None] | None = None) -> Engine:
    """`prompt_tokens` (the longest prompt fed) sizes the activation workspace; default the longest allowed.
    `on_host_free`: called once the CPU tier's fill no longer needs the host to itself (worker.stream.fill)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cfg = pack.manifest.model_config
    dtype = getattr(torch, pack.manifest.dtype)
    mode = run.stream.mode
    span = Spans()
    limit_gpu_memory(run.stream.gpu_memory_limit_gb, device)
    placement = place(mode, cfg.num_hidden_layers, run.stream)
    tracker = init_global_tracker(max_batch=run.batch_size, layers=cfg.num_hidden_layers,
                                  n_blocks=-(-run.max_seq_len // run.kv.kv_block_tokens))  # before the model
    compiled = compiles(run, device)
    weights = None
    try:
        with span("kv"):
            kv = KVFactory(cfg, run.kv, device, dtype, run.max_seq_len, run.batch_size, tracker,
                           spill_dir=pack.manifest_path.parent, compiled=compiled)
        if mode == "gpu":
            weights = ResidentWeights.from_pack(pack, device, run.stream, span)
        else:
            weights = WeightStreamer(pack, placement, run.stream, device,
                                     reserve_bytes=workspace_bytes(run, cfg, prompt_tokens), on_host_free=on_host_free)
            span.seconds.update(weights.build_spans.seconds)
        log.info("engine: mode=%s device=%s dtype=%s layers=%d", mode, device, dtype, cfg.num_hidden_layers)
        with span("model"):
            model = Llama(cfg, weights, device, compile=compiled)
        with span("upload_wait"):  # the device-resident groups' load, started in the weights' build, ran behind
            weights.finish()
    except torch.cuda.OutOfMemoryError:
        _abandon(weights, device)
        raise UserError(f"mode {mode}: the weights placed on the GPU do not fit in its memory"
                        f"{_limit_note(run)}; lower --gpu-max-groups / --gpu-cached-layers or use a "
                        "streaming mode") from None
    except BaseException:
        _abandon(weights, device)
        raise
    span.log(log, "engine build")
    return Engine(cfg, model, weights, placement, kv, device, {"spans": span.seconds, "upload": weights.upload})


def _abandon(weights, device: torch.device) -> None:
    """A build that failed: the weights' loads stopped, and the memory cap lifted (it is process-wide)."""
    if weights is not None:
        weights.close()
    lift_gpu_memory_limit(device)


def compiles(run: RunConfig, device: torch.device) -> bool:
    """Whether the engine torch.compiles its math: on CUDA, unless --no-compile."""
    return run.compile and device.type == "cuda"


def limit_gpu_memory(limit_gb: float | None, device: torch.device) -> None:
    """Make a big card act as a small one: cap what the caching allocator may hand out."""
    if limit_gb is None or device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    if limit_gb * 1e9 > total:
        raise UserError(f"gpu_memory_limit_gb={limit_gb} is more than the card's {total / 1e9:.1f} GB")
    torch.cuda.set_per_process_memory_fraction(limit_gb * 1e9 / total, device)


def lift_gpu_memory_limit(device: torch.device) -> None:
    """Undo `limit_gpu_memory`: the fraction is process-wide, and a worker process runs many runs."""
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def _limit_note(run: RunConfig) -> str:
    lim = run.stream.gpu_memory_limit_gb
    return f" (capped at {lim} GB by --gpu-memory-limit-gb)" if lim else ""


HEADROOM_BYTES = 256 << 20  # allocator fragmentation, cuBLAS workspace, compiled kernels' scratch


def workspace_bytes(run: RunConfig, cfg: ModelConfig, prompt_tokens: int | None = None) -> int:
    """What a run needs on the GPU besides weights: the KV cache, the largest activations (the layer's
    tensors in the activation dtype plus the norms' float32 copies) and a fixed headroom. An estimate
    used only to size the streaming slots under --gpu-memory-limit-gb; without the headroom a 70B
    2048-token prefill under 6 GiB was given two slots per kind and ran out of memory
    (measured: benchmarks/results/README.md)."""
    item = 4 if run.dtype == "float32" or cfg.dtype == "float32" else 2
    kv = tier_bytes(run.kv, cfg, run.batch_size, run.max_seq_len, item)["gpu"]
    tokens = run.batch_size * (prompt_tokens or run.max_prompt_tokens)
    act = tokens * ((6 * cfg.hidden_size + 3 * cfg.intermediate_size) * item + 2 * cfg.hidden_size * 4)
    return kv + act + run.batch_size * cfg.vocab_size * 4 + HEADROOM_BYTES + dequant_scratch_bytes(run, cfg, item)


def dequant_scratch_bytes(run: RunConfig, cfg: ModelConfig, item: int) -> int:
    """A quantized pack's dense weights of one group, alive while its matmuls run (worker.quant.dequant);
    twice that for the per-projection pieces an eager concatenation (q|k|v, gate|up) holds at once."""
    if run.weight_format == "native":
        return 0
    h, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    group = max((q + 2 * kv) * h + h * q, 3 * h * f)
    head = cfg.vocab_size * h if run.quantize_head and not cfg.tie_word_embeddings else 0
    return 2 * item * max(group, head)
