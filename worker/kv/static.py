"""The plain all-resident KV cache: one (B, kv_heads, max_seq, head_dim) buffer per layer.

The cache is passed into the forward (the model holds no state) and owns the attention over what it
stores, so the paged, offloading or top-k cache (`worker.kv.paged`) replaces this one without
touching the model; this one is the exact reference the paged cache is compared against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.model import attention
from worker.model.geometry import ModelConfig
from worker.model.step import Step


class StaticKVCache:
    def __init__(self, cfg: ModelConfig, batch: int, max_seq: int, device: torch.device, dtype: torch.dtype,
                 compiled: bool = False):
        shape = (batch, cfg.num_key_value_heads, max_seq, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.rows = torch.arange(batch, device=device)
        self.max_seq = max_seq
        self.attention, self.store = attention.kernels(compiled)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step) -> torch.Tensor:
        """Store k, v (B, KV, T, hd) and attend q (B, H, T, hd) over the cached sequence → (B, H, T, hd)."""
        kc, vc = self.k[layer], self.v[layer]
        if step.is_prefill:
            t = q.shape[2]
            kc[:, :, :t] = k
            vc[:, :, :t] = v
            # right padding: a real token never sees a pad, so plain causal attention is exact per row
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        pos = step.positions[:, 0]  # (B,)
        self.store(kc, vc, self.rows, pos, k, v)
        n = step.kv_len
        return self.attention(q, kc[:, :, :n], vc[:, :, :n], pos)
