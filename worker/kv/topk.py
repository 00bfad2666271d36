"""Top-k block selection: score every block by a cheap bound on q·k, keep the k best.

Each block keeps the per-channel minimum and maximum of its keys, (KV, hd) each. For a query q the
largest q·k any key of the block can reach is sum_c max(q_c * max_c, q_c * min_c), an upper bound
(Quest-style) computed in O(hd) per block instead of O(bt * hd). Per query head the bounds are
turned into log-softmax estimates over the row's blocks, and a block's score is its best estimate
over heads: a block that matters to any head is kept. The first block (attention sink) and the most
recent block(s) are always kept.

Everything here is device code with static shapes (no host reads, no data-dependent shapes), so it
traces into the compiled decode step (`kv.kernels`). Selection is one defined function of the
scores on every device: `order_key` breaks ties toward the lower block id, so a brute-force
reference (tests/test_kv_topk_device.py) picks the very same blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INF = float("inf")


def recent_blocks(k: int) -> int:
    """Most recent blocks always kept: the block being written, plus the one before it once k > 3."""
    return 1 if k <= 3 else 2


def block_bounds(blocks_k: torch.Tensor, n_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """blocks_k (B, n, KV, bt, hd) → per-channel (min, max) (B, n, KV, hd).

    n_valid (B,) limits every block to its first n_valid positions (the block being written)."""
    if n_valid is None:
        return blocks_k.amin(3), blocks_k.amax(3)
    bt = blocks_k.shape[3]
    ok = (torch.arange(bt, device=blocks_k.device)[None, :] < n_valid[:, None])[:, None, None, :, None]  # (B,1,1,bt,1)
    lo = torch.where(ok, blocks_k, torch.tensor(INF, dtype=blocks_k.dtype, device=blocks_k.device)).amin(3)
    hi = torch.where(ok, blocks_k, torch.tensor(-INF, dtype=blocks_k.dtype, device=blocks_k.device)).amax(3)
    return lo, hi


def upper_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """q (B, H, 1, hd), kmin/kmax (B, n, KV, hd) → (B, H, n) float32: for each query head and block, a
    bound no scaled score q·k / sqrt(hd) of a key in the block exceeds."""
    b, h, _, hd = q.shape
    kv = kmin.shape[2]
    qg = q[:, :, 0].float().view(b, kv, h // kv, hd)  # (B, KV, G, hd): head h reads kv head h // G
    ub = (torch.einsum("bkgd,bnkd->bkgn", qg.clamp(min=0), kmax.float())
          + torch.einsum("bkgd,bnkd->bkgn", qg.clamp(max=0), kmin.float()))  # (B, KV, G, n)
    return ub.reshape(b, h, -1) * hd ** -0.5


def block_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, frontier: torch.Tensor) -> torch.Tensor:
    """q (B, H, 1, hd), kmin/kmax (B, n, KV, hd), frontier (B,) → scores (B, n) float32.

    Blocks after a row's frontier (the block its current token is in) hold no keys yet: -inf."""
    ub = upper_bounds(q, kmin, kmax)  # (B, H, n)
    live = torch.arange(ub.shape[2], device=q.device)[None, :] <= frontier[:, None]  # (B, n)
    ub = ub.masked_fill(~live[:, None, :], -INF)
    est = ub - torch.logsumexp(ub, dim=-1, keepdim=True)  # log-softmax over the row's blocks, per head
    return est.amax(dim=1)  # (B, n)


def order_key(scores: torch.Tensor) -> torch.Tensor:
    """scores (B, n) float32 → int64 keys (B, n) in the scores' order, ties broken toward the lower block id.

    The float's bits, made monotonic (negative floats count down), above the reversed block id: every
    key is distinct, so `topk` of the keys is one selection whatever the device's topk does with ties."""
    s = scores.float() + 0.0  # -0.0 → +0.0: equal scores, equal bits
    bits = s.view(torch.int32).to(torch.int64)
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # (B, n) in [-2^31, 2^31)
    n = scores.shape[1]
    return ordered * (1 << 32) + (n - 1 - torch.arange(n, device=scores.device))


def _top(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of s (B, n) by `order_key`, best first → (idx (B, k), finite (B, k): idx holds a candidate)."""
    idx = order_key(s).topk(k, dim=1).indices
    return idx, s.gather(1, idx) > -INF


def select_blocks(scores: torch.Tensor, k: int, frontier: torch.Tensor, available: torch.Tensor | None = None,
                  recent: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The k blocks to attend over per row, in position order.

    scores (B, n), frontier (B,), available (B, n) bool (blocks that can be read now; None = all; the
    planner makes sure the forced blocks are available); k <= n.
    Returns sel (B, k) block ids ascending and valid (B, k); a row with fewer than k candidate blocks
    gets invalid entries (id 0, valid False) at the end."""
    n = scores.shape[1]
    j = torch.arange(n, device=scores.device)[None, :]  # (1, n)
    live = j <= frontier[:, None]
    forced = live & ((j == 0) | (j > frontier[:, None] - recent))
    s = torch.where(forced, INF, scores)
    ok = live if available is None else live & available
    idx, valid = _top(torch.where(ok, s, -INF), k)  # (B, k)
    idx = torch.where(valid, idx, n).sort(dim=1).values  # invalid ones last
    valid = idx < n
    return torch.where(valid, idx, 0), valid


def neighbour_scores(scores: torch.Tensor) -> torch.Tensor:
    """Each block scored as the better of itself and the block before it, (B, n) → (B, n).

    The prefetch chooses by the previous step's scores, but what a step needs next is often what
    follows what it just read (the rest of a record that crosses into the next block): with the
    successor of every well-scored block among the candidates, the step's own selection can reach it.
    On the trained recall model (tests/test_recall.py) offloaded top-k at a 256-token budget missed 2
    of 32 passkeys at 2k with own-score prefetch, both records crossing a block boundary; 0 with this."""
    before = F.pad(scores[:, :-1], (1, 0), value=-INF)  # (B, n): block j-1's score at j
    return torch.maximum(scores, before)


def candidates(scores: torch.Tensor, frontier: torch.Tensor, ring_blocks: int, k: int, recent: int) -> torch.Tensor:
    """The offloaded blocks to prefetch for a step whose rows write into block `frontier` (B,): (B, k)
    block ids, best first, -1 = none.

    scores (B, n): the latest scores of the row's blocks (the step before, or this one at the first
    step). Offloaded are the blocks below the GPU ring, j < frontier - ring_blocks + 1. The sink block
    and offloaded recent blocks come first, then the best by score. Every offloaded block of a row
    holds keys (it is below the ring), so a row gets exactly min(k, offloaded) candidates: the count
    the host plans its copy from (`kv.fetch`)."""
    n = scores.shape[1]
    j = torch.arange(n, device=scores.device)[None, :]  # (1, n)
    off = j < (frontier - ring_blocks + 1)[:, None]
    forced = off & ((j == 0) | (j > frontier[:, None] - recent))
    m = min(k, n)
    ahead = neighbour_scores(scores)
    idx, valid = _top(torch.where(off, torch.where(forced, INF, ahead), -INF), m)  # (B, m)
    cand = torch.where(valid, idx, -1)
    return F.pad(cand, (0, k - m), value=-1) if m < k else cand
