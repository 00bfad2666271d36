"""Decode attention over a cached span, and the KV store of one decode step.

Both caches (`StaticKVCache` and the paged cache's exact path) call these same functions on the same
shapes, which is what keeps an offloading cache bit-identical to the resident one.

Two forms of one attention (column j of row b visible iff j <= pos[b]):
- eager (`sdpa_decode_attention`, CPU and --no-compile): `F.scaled_dot_product_attention` with a
  boolean mask. With grouped KV heads and a mask it runs SDPA's math path, about ten kernels per
  layer; eager code pays per launch, and the written-out form below is no shorter there.
- compiled (`decode_attention`, CUDA): the query heads grouped over their KV head (no copies of K and
  V), the mask derived from the positions inside the function; `torch.compile` turns it into two
  cuBLAS products and one fused masked softmax. HF's eager math: scores in the activation dtype,
  softmax in float32, cast back before the value product. With it (and the step's RoPE tables and
  final norm compiled too) the graphed 8B decode step got faster; a variant written as reductions,
  for Triton to generate everything, computed the scores slower than cuBLAS and was dropped
  (measured: benchmarks/results/README.md).
The forms differ in rounding, as eager and compiled code do anyway; every cache of a process uses
the same form, so weight modes and KV tiers stay bit-identical to each other.

Prefill keeps SDPA (flash kernels, causal, no mask): it is compute-bound and runs once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from worker.model import compiled as compiling

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Store = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """q (B, H, 1, hd) over k, v (B, KV, n, hd), column j visible to row b iff j <= pos[b] → (B, H, 1, hd)."""
    visible = torch.arange(k.shape[2], device=q.device)[None, :] <= pos[:, None]  # (B, n)
    return masked_decode_attention(q, k, v, visible)


def masked_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """`decode_attention` with the visible columns given, visible (B, n) bool (top-k decode attends over
    gathered blocks, whose columns are not in position order); every row sees at least one column."""
    b, h, t, hd = q.shape
    kv = k.shape[1]
    qg = q.reshape(b, kv, (h // kv) * t, hd)  # the query heads sharing a KV head, side by side
    scores = torch.matmul(qg, k.transpose(-1, -2)) * hd ** -0.5  # (B, KV, G, n)
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    return torch.matmul(probs, v).reshape(b, h, t, hd)


def sdpa_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """`decode_attention` through SDPA (the eager form)."""
    visible = torch.arange(k.shape[2], device=q.device)[None, :] <= pos[:, None]  # (B, n)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None, :], enable_gqa=True)


def store_step(kc: torch.Tensor, vc: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
               k: torch.Tensor, v: torch.Tensor) -> None:
    """Write one decode step's k, v (B, KV, 1, hd) into caches (B, KV, S, hd) at each row's position."""
    kc[rows, :, pos] = k[:, :, 0]
    vc[rows, :, pos] = v[:, :, 0]


@functools.cache
def kernels(compiled: bool) -> tuple[Attend, Store]:
    """(attend, store), compiled once per process when asked (CUDA only: on CPU there is no launch
    overhead to remove). One compiled variant per span bucket; the cache of variants is shared by
    every engine in the process, so later runs reuse earlier compilations."""
    if not compiled:
        return sdpa_decode_attention, store_step
    return compiling.compiled(decode_attention), compiling.compiled(store_step)
