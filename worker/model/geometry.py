"""The Llama geometry, read from a checkpoint's `config.json` and validated whole where it is read.

Accepts both spellings seen in the wild: Llama-3.1 checkpoints (top-level `rope_theta`,
`rope_scaling`, `torch_dtype`) and transformers 5 (`rope_parameters` with `rope_theta` inside,
`dtype`). Anything that is not a Llama causal LM is refused with a message that says so, and so is
a geometry no forward can run (zero or negative sizes, heads that do not divide into KV heads, an
odd head dimension RoPE cannot rotate, token ids outside the vocabulary): pydantic checks every
field, so a bad config.json is one line naming the key, never a ZeroDivisionError mid-run or a
"-2-layer" benchmark.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from worker.errors import UserError, one_line

LLAMA_ARCHS = {"LlamaForCausalLM"}
QUANT_METHODS = ("awq", "compressed-tensors")  # pre-quantized checkpoints read as they are (worker.quant.published)
Size = Annotated[int, Field(ge=1)]
Rate = Annotated[float, Field(gt=0)]
TokenId = Annotated[int, Field(ge=0)]


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class RopeScaling:
    """`llama3` frequency scaling (Llama 3.1); absent means plain RoPE."""

    factor: Rate
    low_freq_factor: Rate
    high_freq_factor: Rate
    original_max_position_embeddings: Size

    def __post_init__(self) -> None:
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"rope_scaling: high_freq_factor ({self.high_freq_factor}) must be above "
                             f"low_freq_factor ({self.low_freq_factor})")


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class ModelConfig:
    hidden_size: Size
    intermediate_size: Size
    num_hidden_layers: Size
    num_attention_heads: Size
    num_key_value_heads: Size
    vocab_size: Size
    head_dim: Size
    rms_norm_eps: Rate = 1e-5
    rope_theta: Rate = 500000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: Size = 131072
    tie_word_embeddings: bool = False
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    bos_token_id: TokenId | None = None
    eos_token_ids: tuple[TokenId, ...] = ()

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even: RoPE rotates pairs of channels")
        for name, ids in (("bos_token_id", (self.bos_token_id,)), ("eos_token_id", self.eos_token_ids)):
            bad = [i for i in ids if i is not None and i >= self.vocab_size]
            if bad:
                raise ValueError(f"{name} {bad[0]} is outside the vocabulary (vocab_size {self.vocab_size})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "model_config") -> ModelConfig:
        """From `to_dict()`'s output (a manifest's `model_config`)."""
        return _validate(dict(d), source)

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        cfg_file = path / "config.json"
        if not path.is_dir():
            raise UserError(f"checkpoint directory {str(path)!r} does not exist; pass --checkpoints DIR "
                            "(make one with `bench make-model`)")
        if not cfg_file.is_file():
            raise UserError(f"{cfg_file} is missing: --checkpoints must point at a HF checkpoint directory")
        try:
            raw = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{cfg_file} is not valid JSON ({e}); fix it or re-download the checkpoint") from None
        return cls.from_hf(raw, source=str(cfg_file))

    @classmethod
    def from_hf(cls, raw: Any, source: str = "config.json") -> ModelConfig:
        if not isinstance(raw, dict):
            raise UserError(f"{source}: a config.json is a JSON object of the model's settings, not a "
                            f"{type(raw).__name__}")
        _check_family(raw, source)
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise UserError(f"{source}: rope_scaling must be an object or null (got {rope!r})")
        heads, hidden = raw.get("num_attention_heads"), raw.get("hidden_size")
        derived = hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 else None
        fields = {
            "hidden_size": hidden, "intermediate_size": raw.get("intermediate_size"),
            "num_hidden_layers": raw.get("num_hidden_layers"), "num_attention_heads": heads,
            "num_key_value_heads": raw.get("num_key_value_heads") or heads, "vocab_size": raw.get("vocab_size"),
            "head_dim": raw.get("head_dim") or derived, "rms_norm_eps": raw.get("rms_norm_eps", 1e-6),
            "rope_theta": rope.get("rope_theta", raw.get("rope_theta", 10000.0)),
            "rope_scaling": _rope_scaling(rope, source),
            "max_position_embeddings": raw.get("max_position_embeddings", 2048),
            "tie_word_embeddings": raw.get("tie_word_embeddings", False),
            "dtype": raw.get("dtype") or raw.get("torch_dtype") or "float32",
            "bos_token_id": raw.get("bos_token_id"), "eos_token_ids": _as_tuple(raw.get("eos_token_id")),
        }
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "vocab_size") if fields[k] is None]
        if missing:
            raise UserError(f"{source}: required key {missing[0]!r} is missing")
        return _validate(fields, source)


_ADAPTER: TypeAdapter | None = None


def _validate(fields: dict[str, Any], source: str) -> ModelConfig:
    global _ADAPTER
    _ADAPTER = _ADAPTER or TypeAdapter(ModelConfig)
    try:
        return _ADAPTER.validate_python(fields)
    except ValidationError as e:
        msg = one_line(e, leaf=True).replace("eos_token_ids", "eos_token_id")
        raise UserError(f"{source}: {msg}") from None


def _check_family(raw: dict[str, Any], source: str) -> None:
    archs = raw.get("architectures") or []
    if raw.get("model_type") != "llama" or (archs and not set(archs) & LLAMA_ARCHS):
        raise UserError(f"{source}: model_type={raw.get('model_type')!r}, architectures={archs}; only Llama "
                        "causal LMs (model_type 'llama', LlamaForCausalLM) are supported")
    for key in ("mlp_bias", "attention_bias"):
        if raw.get(key):
            raise UserError(f"{source}: {key}=true is not supported (Llama 3 has no biases)")
    if raw.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: hidden_act={raw['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
    quant = raw.get("quantization_config")
    if quant is not None:  # the supported ones are read by worker.quant.published
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        if method not in QUANT_METHODS:
            raise UserError(f"{source}: quantization_config.quant_method {method!r} is not supported (supported: "
                            f"{', '.join(map(repr, QUANT_METHODS))}); use the unquantized checkpoint and pack it "
                            "with --weight-format int8 or int4")


def _as_tuple(v: Any) -> Any:
    """eos_token_id may be one id or a list; anything else is left for validation to name."""
    if v is None:
        return ()
    return tuple(v) if isinstance(v, list) else (v,)


def _rope_scaling(rope: dict[str, Any], source: str) -> dict[str, Any] | None:
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "default":
        return None
    if kind != "llama3":
        raise UserError(f"{source}: rope type {kind!r} is not supported; use 'llama3' or none")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in rope]
    if missing:
        raise UserError(f"{source}: rope_scaling of type llama3 needs {missing[0]!r}")
    return {k: rope[k] for k in keys}
