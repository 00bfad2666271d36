"""KV cache: storage for keys/values and the attention over them.

The cache is passed into the forward (the model holds no state) and owns the attention over what it
stores, so a paged, offloading or top-k cache can replace this one without touching the model.
This one is the plain all-resident cache: one (B, kv_heads, max_seq, head_dim) buffer per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from worker import attention
from worker.model_config import ModelConfig


@dataclass
class Step:
    """Where one forward's tokens sit in their sequences.

    positions: (B, T) on the compute device. A prefill (T > 1) starts every row at position 0 (rows are
    right-padded); a decode step (T == 1) has each row at its own position. kv_len (host int) is the
    number of cache positions the step's attention must cover: max position + 1, known on the host so
    no device sync is needed.

    lens (optional, prefill only): each row's real prompt length on the host. A paged cache with a
    host tier plans block moves from host-known positions; given lens it never reads positions back,
    otherwise it reads them once, at the first decode step.
    """

    positions: torch.Tensor
    kv_len: int
    lens: tuple[int, ...] | None = None

    @property
    def is_prefill(self) -> bool:
        return self.positions.shape[1] > 1


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
