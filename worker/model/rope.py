"""Rotary position embeddings, including Llama 3.1's `llama3` frequency scaling.

Computed exactly as HF transformers does (inverse frequencies and cos/sin in float32, cast to the
activation dtype, `rotate_half` formulation), so logits match it to float32 rounding.
"""

from __future__ import annotations

import math

import torch

from worker.model.geometry import ModelConfig


def inv_freq(cfg: ModelConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """Inverse frequencies, (head_dim // 2,) float32."""
    dim = cfg.head_dim
    exps = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    freq = 1.0 / (cfg.rope_theta ** exps)
    s = cfg.rope_scaling
    if s is None:
        return freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / freq
    scaled = torch.where(wavelen > low_wavelen, freq / s.factor, freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def cos_sin(freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin for `positions` (B, T) → each (B, 1, T, head_dim) in `dtype`, ready to broadcast over heads."""
    angles = positions[..., None].float() * freq  # (B, T, head_dim/2)
    emb = torch.cat((angles, angles), dim=-1)  # (B, T, head_dim)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, head_dim) by the position angles."""
    return x * cos + _rotate_half(x) * sin
