"""The Llama geometry, read from a checkpoint's `config.json`.

Accepts both spellings seen in the wild: Llama-3.1 checkpoints (top-level `rope_theta`,
`rope_scaling`, `torch_dtype`) and transformers 5 (`rope_parameters` with `rope_theta` inside,
`dtype`). Anything that is not a Llama causal LM is refused with a message that says so.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from worker.errors import UserError

LLAMA_ARCHS = {"LlamaForCausalLM"}


@dataclass(frozen=True)
class RopeScaling:
    """`llama3` frequency scaling (Llama 3.1); absent means plain RoPE."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(f"config.json: num_attention_heads ({self.num_attention_heads}) must be a multiple "
                            f"of num_key_value_heads ({self.num_key_value_heads})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        if d.get("rope_scaling"):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)

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
        except json.JSONDecodeError as e:
            raise UserError(f"{cfg_file} is not valid JSON ({e.msg} at line {e.lineno})") from None
        return cls.from_hf(raw, source=str(cfg_file))

    @classmethod
    def from_hf(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        archs = raw.get("architectures") or []
        if raw.get("model_type") != "llama" or (archs and not set(archs) & LLAMA_ARCHS):
            raise UserError(f"{source}: model_type={raw.get('model_type')!r}, architectures={archs}; only Llama "
                            "causal LMs (model_type 'llama', LlamaForCausalLM) are supported")
        for key in ("mlp_bias", "attention_bias"):
            if raw.get(key):
                raise UserError(f"{source}: {key}=true is not supported (Llama 3 has no biases)")
        if raw.get("hidden_act", "silu") != "silu":
            raise UserError(f"{source}: hidden_act={raw['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
        try:
            heads = int(raw["num_attention_heads"])
            hidden = int(raw["hidden_size"])
            rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
            theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
            return cls(
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_hidden_layers=int(raw["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
                vocab_size=int(raw["vocab_size"]),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta),
                rope_scaling=_rope_scaling(rope, source),
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=_as_tuple(raw.get("eos_token_id")),
            )
        except KeyError as e:
            raise UserError(f"{source}: required key {e.args[0]!r} is missing") from None
        except (TypeError, ValueError) as e:
            raise UserError(f"{source}: {e}") from None


def _as_tuple(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else (int(v),)


def _rope_scaling(rope: dict[str, Any], source: str) -> RopeScaling | None:
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "default":
        return None
    if kind != "llama3":
        raise UserError(f"{source}: rope type {kind!r} is not supported; use 'llama3' or none")
    return RopeScaling(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
    )
