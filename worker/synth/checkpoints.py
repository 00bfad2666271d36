"""`bench make-model`: synthetic Llama-3.1 checkpoints in the real HF format.

Tests and benchmarks need checkpoints without downloads: random weights in HF layout (config.json,
sharded safetensors + index, generation_config.json, a locally built tokenizer), one preset per
geometry that matters (a tiny one for CPU tests, the real 8B and 70B shapes with any layer count).

A 70B-geometry checkpoint does not fit comfortably in RAM, so tensors are generated and written one
at a time: the safetensors header is computed from the shapes up front and each tensor's bytes are
streamed after it, while the next tensor is generated. Generation is split into fixed chunks, each
with its own generator seeded from (seed, tensor name, chunk), so it runs on every core and gives
the same weights whatever the thread count, shard size or layer count.

Scales keep generation non-degenerate (measured: greedy decoding of 32 tokens gives ~32 distinct
tokens from 2 to 80 layers). Every projection reads a normalized input, so weights are
N(0, 1/fan_in) and activations stay O(1); q and k get a gain of 2 (attention logits ~N(0, 4), peaked
like a trained model's, where gain 1 averages all positions alike); the residual branches (o_proj,
down_proj) are divided by sqrt(2 * layers) so the stream stays O(1) through depth. Untied
embeddings are N(0, 1), so the current token stays visible in the residual stream at any depth
(with 1/sqrt(hidden) an 80-layer stack emits one token over and over). Tied embeddings must be
N(0, 1/hidden) instead, or each token's own logit dominates and it repeats; that keeps shallow tied
models lively but deep ones less so. Norm weights are 1 + N(0, 0.05), so using the wrong norm shows
in an equivalence test. Logits come out ~N(0, 1), except the special tokens' (BOS, EOS, ...), whose
output rows are zero: a random model then never stops early at EOS, so every run decodes exactly
`max_new_tokens` tokens (make EOS reachable with an `eos_token_id` override pointing at a regular id).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from worker.errors import UserError
from worker.model.geometry import ModelConfig
from worker.text.tokenizer import build_tokenizer, save_tokenizer, special_layout

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
CHUNK = 1 << 22  # elements per RNG chunk: the unit of parallelism and of determinism
NORM_NOISE = 0.05
QK_GAIN = 2.0

from worker.synth.presets import LLAMA31_COMMON, PRESETS  # noqa: E402  (torch-free, shared with suites)


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: HF name, shape, and the normal distribution its values come from."""

    name: str
    shape: tuple[int, ...]
    mean: float
    std: float
    zero_rows_from: int | None = None  # rows from here on are zero (the special tokens' output rows)

    def nbytes(self, dtype: torch.dtype) -> int:
        return math.prod(self.shape) * dtype.itemsize


def build_config(preset: str = "tiny", layers: int | None = None, dtype: str = "bfloat16",
                 overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json for a preset, in the Llama-3.1 layout, validated like a real checkpoint's."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    if layers is not None and layers < 1:
        raise UserError(f"--layers must be >= 1 (got {layers})")
    overrides = dict(overrides or {})
    cfg = {**LLAMA31_COMMON, **PRESETS[preset]}
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    cfg.update(overrides)
    cfg["torch_dtype"] = dtype
    try:
        vocab, hidden, heads = int(cfg["vocab_size"]), int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    except (TypeError, ValueError) as e:
        raise UserError(f"make-model: bad geometry override: {e}") from None
    layout = special_layout(vocab)
    cfg.setdefault("bos_token_id", layout.bos_id)
    cfg.setdefault("eos_token_id", layout.eos_ids)
    if cfg.get("head_dim") is None:
        if heads < 1 or hidden % heads:
            raise UserError(f"hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads}), "
                            "or give head_dim")
        cfg["head_dim"] = hidden // heads
    ModelConfig.from_hf(cfg, source="make-model config")  # same checks as a loaded checkpoint
    return dict(sorted(cfg.items()))


def tensor_specs(cfg: dict[str, Any]) -> list[TensorSpec]:
    """Every tensor of the checkpoint in HF order (embeddings, layers, final norm, lm_head)."""
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    n_layers, hd = cfg["num_hidden_layers"], cfg["head_dim"]
    q_out, kv_out = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    branch = 1.0 / math.sqrt(2 * n_layers)  # residual branches: keep the stream O(1) through depth
    tied = bool(cfg.get("tie_word_embeddings"))
    specials = special_layout(v).first  # output rows of the special tokens are zero

    def linear(name: str, out: int, fan_in: int, scale: float = 1.0) -> TensorSpec:
        return TensorSpec(name, (out, fan_in), 0.0, scale / math.sqrt(fan_in))

    def norm(name: str) -> TensorSpec:
        return TensorSpec(name, (h,), 1.0, NORM_NOISE)

    specs = [TensorSpec("model.embed_tokens.weight", (v, h), 0.0, 1.0 / math.sqrt(h) if tied else 1.0,
                        specials if tied else None)]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        specs += [
            norm(p + "input_layernorm.weight"),
            linear(p + "self_attn.q_proj.weight", q_out, h, QK_GAIN),
            linear(p + "self_attn.k_proj.weight", kv_out, h, QK_GAIN),
            linear(p + "self_attn.v_proj.weight", kv_out, h),
            linear(p + "self_attn.o_proj.weight", h, q_out, branch),
            norm(p + "post_attention_layernorm.weight"),
            linear(p + "mlp.gate_proj.weight", f, h),
            linear(p + "mlp.up_proj.weight", f, h),
            linear(p + "mlp.down_proj.weight", h, f, branch),
        ]
    specs.append(norm("model.norm.weight"))
    if not tied:
        specs.append(TensorSpec("lm_head.weight", (v, h), 0.0, 1.0 / math.sqrt(h), specials))
    return specs


def plan_shards(specs: list[TensorSpec], dtype: torch.dtype, shard_max_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive tensors into shards of at most `shard_max_bytes` (a larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        n = spec.nbytes(dtype)
        if shards[-1] and size + n > shard_max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    return shards


def _chunk_seed(seed: int, name: str, chunk: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds are < 2**64; keep it signed-safe


def generate(spec: TensorSpec, dtype: torch.dtype, seed: int, pool: ThreadPoolExecutor) -> torch.Tensor:
    """The tensor's values, chunk-parallel; identical for any pool size."""
    out = torch.empty(spec.shape, dtype=dtype)
    flat = out.view(-1)  # (numel,)
    n = flat.numel()

    def fill(start: int) -> None:
        g = torch.Generator().manual_seed(_chunk_seed(seed, spec.name, start // CHUNK))
        buf = torch.empty(min(CHUNK, n - start), dtype=torch.float32)
        buf.normal_(spec.mean, spec.std, generator=g)
        flat[start:start + buf.numel()].copy_(buf)

    list(pool.map(fill, range(0, n, CHUNK)))
    if spec.zero_rows_from is not None:
        out[spec.zero_rows_from:] = 0
    return out


def _st_header(specs: list[TensorSpec], dtype: torch.dtype) -> bytes:
    """A safetensors header (length-prefixed JSON, padded to 8 bytes) for tensors in this order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        n = spec.nbytes(dtype)
        header[spec.name] = {"dtype": ST_DTYPES[dtype], "shape": list(spec.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _tensors(specs: list[TensorSpec], dtype: torch.dtype, seed: int) -> Iterator[torch.Tensor]:
    """Tensors in order, the next one generated while the caller writes the current one."""
    workers = max(1, min(32, len(os.sched_getaffinity(0))))
    with ThreadPoolExecutor(workers) as pool, ThreadPoolExecutor(1) as ahead:
        pending = ahead.submit(generate, specs[0], dtype, seed, pool) if specs else None
        for i in range(len(specs)):
            tensor = pending.result()
            if i + 1 < len(specs):
                pending = ahead.submit(generate, specs[i + 1], dtype, seed, pool)
            yield tensor


def write_weights(out_dir: Path, specs: list[TensorSpec], dtype: torch.dtype, seed: int,
                  shard_max_bytes: int) -> int:
    """Write the safetensors shards and index; returns the total tensor bytes."""
    shards = plan_shards(specs, dtype, shard_max_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    total = sum(s.nbytes(dtype) for s in specs)
    log.info("writing %d tensors, %.2f GB in %d shard(s) to %s", len(specs), total / 1e9, len(shards), out_dir)
    tensors = _tensors(specs, dtype, seed)
    t0, done = time.perf_counter(), 0
    for name, shard in zip(names, shards):
        with open(out_dir / name, "wb") as fh:
            fh.write(_st_header(shard, dtype))
            for spec in shard:
                t = next(tensors)
                fh.write(t.view(-1).view(torch.uint8).numpy().data)
                done += spec.nbytes(dtype)
        dt = time.perf_counter() - t0
        log.info("%s: %.2f / %.2f GB (%.2f GB/s)", name, done / 1e9, total / 1e9, done / 1e9 / max(dt, 1e-9))
    index = {"metadata": {"total_size": total},
             "weight_map": dict(sorted((s.name, n) for n, shard in zip(names, shards) for s in shard))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def _generation_config(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
            "do_sample": True, "temperature": 0.6, "top_p": 0.9, "transformers_version": "4.43.0.dev0"}


def check_target(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output {str(out)!r} exists and is not a directory; choose another OUT_DIR")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"output directory {str(out)!r} is not empty; pass --force to replace it or choose "
                        "another OUT_DIR")


def make_model(out_dir: str | Path, preset: str = "tiny", layers: int | None = None, dtype: str = "bfloat16",
               seed: int = 0, overrides: dict[str, Any] | None = None, shard_max_gb: float = 5.0,
               force: bool = False) -> Path:
    """Write a random-weight Llama checkpoint that `LlamaForCausalLM.from_pretrained` loads.

    Everything goes to a temporary directory next to `out_dir`, renamed into place at the end, so a
    failure leaves nothing half-written (and a replaced checkpoint stays intact until then).
    """
    out = Path(out_dir).absolute()
    cfg = build_config(preset, layers, dtype, overrides)
    check_target(out, force)
    if shard_max_gb <= 0:
        raise UserError(f"shard_max_gb must be > 0 (got {shard_max_gb})")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        t0 = time.perf_counter()
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(_generation_config(cfg), indent=2) + "\n")
        save_tokenizer(build_tokenizer(cfg["vocab_size"]), tmp, cfg["max_position_embeddings"])
        total = write_weights(tmp, tensor_specs(cfg), DTYPES[dtype], seed, int(shard_max_gb * 1e9))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("made %s (%s, %d layers, %s, %.2f GB) in %.1f s", out, preset, cfg["num_hidden_layers"], dtype,
             total / 1e9, time.perf_counter() - t0)
    return out


def replace_dir(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`; an existing `dst` is moved aside first and removed only afterwards."""
    old = None
    if dst.is_dir():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        os.rename(dst, old)
    os.rename(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def dir_size(path: str | Path) -> int:
    """Bytes of all files under `path` (what `bench make-model` reports)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
