"""Block geometry: how positions of one (batch row, layer) map onto blocks, and the reshapes.

A block is `bt` consecutive positions of one row and layer, keys and values together:
(2, kv_heads, bt, head_dim), contiguous, so moving a block between tiers is one contiguous copy.
Block j of a row holds positions [j * bt, (j + 1) * bt). Host-side buffers may pad each block to
`ext` bytes (the SSD tier needs 4 KiB multiples for O_DIRECT); `typed` views such a byte buffer as
blocks and skips the padding.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from worker.model.geometry import ModelConfig
from worker.units import PAGE


@dataclass(frozen=True)
class Geometry:
    """The derived sizes are computed once per geometry (the decode step reads them every layer-step)."""

    batch: int
    layers: int
    kv_heads: int
    head_dim: int
    block_tokens: int
    max_seq: int
    dtype: torch.dtype

    @classmethod
    def of(cls, cfg: ModelConfig, batch: int, max_seq: int, block_tokens: int, dtype: torch.dtype) -> Geometry:
        return cls(batch, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, block_tokens, max_seq, dtype)

    @functools.cached_property
    def n_blocks(self) -> int:
        """Blocks per (row, layer) that cover max_seq positions."""
        return math.ceil(self.max_seq / self.block_tokens)

    @functools.cached_property
    def item(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @functools.cached_property
    def block_shape(self) -> tuple[int, int, int, int]:
        return (2, self.kv_heads, self.block_tokens, self.head_dim)

    @functools.cached_property
    def block_bytes(self) -> int:
        return math.prod(self.block_shape) * self.item

    @functools.cached_property
    def token_bytes(self) -> int:
        """K and V bytes of one position of one row in one layer."""
        return 2 * self.kv_heads * self.head_dim * self.item

    def padded_block_bytes(self) -> int:
        return -(-self.block_bytes // PAGE) * PAGE


def to_blocks(k: torch.Tensor, v: torch.Tensor, bt: int) -> torch.Tensor:
    """k, v (B, KV, T, hd) → (B, ceil(T/bt), 2, KV, bt, hd), contiguous; the tail of the last block is 0."""
    b, kv, t, hd = k.shape
    j = -(-t // bt)
    both = torch.stack((k, v), 1)  # (B, 2, KV, T, hd)
    if j * bt != t:
        both = F.pad(both, (0, 0, 0, j * bt - t))
    return both.view(b, 2, kv, j, bt, hd).permute(0, 3, 1, 2, 4, 5).contiguous()


def block_view(seq: torch.Tensor, bt: int) -> torch.Tensor:
    """A (B, KV, J * bt, hd) buffer seen as blocks (B, J, KV, bt, hd) (a view: writes go through)."""
    b, kv, s, hd = seq.shape
    return seq.view(b, kv, s // bt, bt, hd).permute(0, 2, 1, 3, 4)


def typed(raw: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """A uint8 (..., ext) buffer of padded blocks → typed blocks (..., 2, KV, bt, hd) (a view)."""
    return raw[..., :geo.block_bytes].view(geo.dtype).unflatten(-1, geo.block_shape)


def raw_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """Contiguous typed blocks (..., 2, KV, bt, hd) → their bytes (..., block_bytes) (a view)."""
    return blocks.flatten(-4).view(torch.uint8)
