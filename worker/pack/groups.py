"""Streaming groups: which checkpoint tensors travel together.

A group is the unit the streamer moves: per layer an `attn` group (input norm, q, k, v, o) and an
`ffn` group (post-attention norm, gate, up, down), plus one `resident` group (embeddings, final
norm, lm_head). Checkpoint (HF) names are kept end to end; the forward addresses a group's tensors
by their short name (`q_proj`, `input_layernorm`, ...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from worker.model.geometry import ModelConfig

RESIDENT = "resident"
KINDS = ("attn", "ffn")

# short name → HF name suffix under `model.layers.{i}.`
LAYER_TENSORS: dict[str, dict[str, str]] = {
    "attn": {
        "input_layernorm": "input_layernorm.weight",
        "q_proj": "self_attn.q_proj.weight",
        "k_proj": "self_attn.k_proj.weight",
        "v_proj": "self_attn.v_proj.weight",
        "o_proj": "self_attn.o_proj.weight",
    },
    "ffn": {
        "post_attention_layernorm": "post_attention_layernorm.weight",
        "gate_proj": "mlp.gate_proj.weight",
        "up_proj": "mlp.up_proj.weight",
        "down_proj": "mlp.down_proj.weight",
    },
}

# short name → HF name; lm_head is absent when embeddings are tied.
RESIDENT_TENSORS = {
    "embed_tokens": "model.embed_tokens.weight",
    "norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
}


class GroupKey(NamedTuple):
    layer: int | None  # None for the resident group
    kind: str  # "attn", "ffn" or "resident"

    @property
    def name(self) -> str:
        return RESIDENT if self.layer is None else f"layers.{self.layer}.{self.kind}"

    @classmethod
    def parse(cls, name: str) -> GroupKey:
        if name == RESIDENT:
            return cls(None, RESIDENT)
        _, layer, kind = name.split(".")
        return cls(int(layer), kind)


def group_tensors(key: GroupKey, tie_word_embeddings: bool = False) -> dict[str, str]:
    """Short name → HF tensor name for one group, in pack order."""
    if key.layer is None:
        return {k: v for k, v in RESIDENT_TENSORS.items() if not (tie_word_embeddings and k == "lm_head")}
    return {short: f"model.layers.{key.layer}.{suffix}" for short, suffix in LAYER_TENSORS[key.kind].items()}


def all_groups(n_layers: int) -> list[GroupKey]:
    """Every group in pack (and forward) order: resident first, then attn/ffn per layer."""
    keys = [GroupKey(None, RESIDENT)]
    for i in range(n_layers):
        keys.extend(GroupKey(i, kind) for kind in KINDS)
    return keys


# Projections that read the same input and sit back to back in a packed group: one GEMM over a view
# spanning them replaces three (or two), with no copy. Order matters: it is the pack order.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def fused(group: dict) -> dict:
    """Add zero-copy fused views where a group's projections are adjacent in memory (packed groups)."""
    for name, parts in FUSED.items():
        ts = [group.get(p) for p in parts]
        if any(t is None for t in ts) or not all(t.is_contiguous() for t in ts):
            continue
        adjacent = all(b.data_ptr() == a.data_ptr() + a.numel() * a.element_size() for a, b in zip(ts, ts[1:]))
        if adjacent and len({t.shape[1] for t in ts}) == 1:
            rows = sum(t.shape[0] for t in ts)
            group[name] = ts[0].as_strided((rows, ts[0].shape[1]), (ts[0].shape[1], 1))  # (rows, in)
    return group


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Short name → shape config.json implies (HF Linear weights are (out, in))."""
    h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return {"embed_tokens": (v, h), "norm": (h,), "lm_head": (v, h), "input_layernorm": (h,),
            "q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "post_attention_layernorm": (h,), "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}
