"""Top-k block selection: estimate each block's share of the attention from a small key summary, keep the k best.

Each block keeps a summary of its keys (`block_summary`): the per-channel minimum and maximum, (KV, hd)
each, and `bits` bits per key and channel (`KVConfig.topk_key_bits`, default 2) naming which of 2^bits
equal slices of that channel's range the key lies in, (KV, bt, bits * ceil(hd / 8)) bytes, one bit
plane after another. A key is estimated as the middle of its slice, so a query scores every key of a
block from `bits` bits per channel instead of its bt * hd values. Per query head the best estimated
score of each block becomes a softmax over the row's blocks (the head's estimated attention mass per
block), and a block's score is the log of that mass averaged over the heads: what the mass measure of
benchmarks/topk_accuracy.py (`MassProbe`) counts. The first block (attention sink) and the most recent
block(s) are always kept.

Why per-key codes and not only the range (Quest's bound sum_c max(q_c * max_c, q_c * min_c)): on the
trained recall model (`worker.recall`) the second layer's heads put nearly all their weight on one
key, whose scaled score is only a few units above the runner-up keys; the range bound is loose by far
more than that (even over pairs of keys), so it ranked the block holding that key far down and the
selection lost much of the oracle's mass (benchmarks/results/topk_selection_cpu.txt). One bit per key
and channel found that block at 8k but still lost passkeys at 32k on the H200: its estimate is off by
up to a quarter of the range per channel, which among 2048 blocks lets a wrong key outscore the one
that matters now and then; two bits selected the needle's block at every step where one bit missed it
(benchmarks/results/topk_key_bits_cpu.txt, then topk_recall_h200_v3/ on the H200; the figures are
indexed in benchmarks/results/README.md). The price: a product with every key's code, O(bt * hd) per
block and head instead of O(hd), and summary bytes of 2 * hd * item + bt * hd * bits / 8 per block and
KV head (at hd 128, bt 16, bf16: 1.5x the range's for one bit, 2x for two).

Everything here is device code with static shapes (no host reads, no data-dependent shapes), so it
traces into the compiled decode step (`kv.kernels`). Selection is one defined function of the
scores on every device: `order_key` breaks ties toward the lower block id, so a brute-force
reference (tests/test_kv_topk_select.py) picks the very same blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

INF = float("inf")


def recent_blocks(k: int) -> int:
    """Most recent blocks always kept: the block being written, plus the one before it once k > 3."""
    return 1 if k <= 3 else 2


Summary = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (kmin, kmax (B, n, KV, hd), codes (B, n, KV, bt, nb) uint8)

KEY_BITS = 2  # bits per key and channel in a block's summary unless the KV config says otherwise
MAX_KEY_BITS = 4


def plane_bytes(head_dim: int) -> int:
    """Bytes of one bit plane of a key (one bit per channel, 8 to a byte)."""
    return -(-head_dim // 8)


def code_bytes(head_dim: int, bits: int = KEY_BITS) -> int:
    """Bytes of one key's code: `bits` bit planes."""
    return bits * plane_bytes(head_dim)


def code_bits(codes: torch.Tensor, head_dim: int) -> int:
    """The bits per channel of a summary's codes (..., nb): the buffer's width says, so kernels need no flag."""
    return codes.shape[-1] // plane_bytes(head_dim)


def summary_bytes(kv_heads: int, block_tokens: int, head_dim: int, item: int, bits: int = KEY_BITS) -> int:
    """Bytes of one block's summary: its key range (2 * KV * hd values of `item` bytes) and its keys' codes."""
    return kv_heads * (2 * head_dim * item + block_tokens * code_bytes(head_dim, bits))


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bits (..., hd) bool → (..., ceil(hd / 8)) uint8: channel c is bit c % 8 of byte c // 8."""
    hd = bits.shape[-1]
    b = F.pad(bits.to(torch.uint8), (0, 8 * plane_bytes(hd) - hd)).unflatten(-1, (-1, 8))  # (..., nb, 8)
    return (b << torch.arange(8, dtype=torch.uint8, device=bits.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, hd: int) -> torch.Tensor:
    """The inverse of `pack_bits`: (..., nb) uint8 → (..., hd) uint8 of 0 / 1."""
    bits = (packed[..., None] >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1  # (..., nb, 8)
    return bits.flatten(-2)[..., :hd]


def pack_codes(levels: torch.Tensor, bits: int) -> torch.Tensor:
    """levels (..., hd) uint8 in [0, 2^bits) → (..., bits * ceil(hd / 8)) uint8: bit plane p of every
    channel, then plane p + 1."""
    return torch.cat([pack_bits((levels >> p) & 1 == 1) for p in range(bits)], -1)


def unpack_codes(codes: torch.Tensor, hd: int) -> torch.Tensor:
    """The inverse of `pack_codes`: (..., bits * nb) uint8 → levels (..., hd) uint8."""
    nb = plane_bytes(hd)
    levels = unpack_bits(codes[..., :nb], hd)
    for p in range(1, code_bits(codes, hd)):
        levels = levels | (unpack_bits(codes[..., p * nb:(p + 1) * nb], hd) << p)
    return levels


def block_summary(blocks_k: torch.Tensor, n_valid: torch.Tensor | None = None, bits: int = KEY_BITS) -> Summary:
    """blocks_k (B, n, KV, bt, hd) → (kmin, kmax (B, n, KV, hd), codes (B, n, KV, bt, bits * nb) uint8).

    A key's level in channel c is how many of the thresholds lo + (hi - lo) * t / 2^bits, t = 1 ..
    2^bits - 1, it lies above (float32). n_valid (B,) limits every block to its first n_valid positions
    (the block being written): the positions after them are summarized as copies of the last written
    key, which changes neither the range nor the block's best key."""
    if n_valid is not None:
        bt = blocks_k.shape[3]
        at = torch.minimum(torch.arange(bt, device=blocks_k.device)[None, :], (n_valid - 1)[:, None])  # (B, bt)
        blocks_k = blocks_k.gather(3, at[:, None, None, :, None].expand(blocks_k.shape))
    lo, hi = blocks_k.amin(3), blocks_k.amax(3)  # (B, n, KV, hd)
    lo32, w = lo.float()[:, :, :, None], (hi.float() - lo.float())[:, :, :, None]  # (B, n, KV, 1, hd)
    k = blocks_k.float()
    levels = torch.zeros(k.shape, dtype=torch.uint8, device=k.device)
    for t in range(1, 1 << bits):
        levels += (k > lo32 + w * (t / (1 << bits))).to(torch.uint8)
    return lo, hi, pack_codes(levels, bits)


def key_estimates(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """q (B, H, 1, hd) and a summary → (B, H, n) float32: per query head and block, the best scaled
    score q·k̂ / sqrt(hd) over the block's keys k̂, each channel at the middle of the slice its level names."""
    b, h, _, hd = q.shape
    kv = kmin.shape[2]
    slices = 1 << code_bits(codes, hd)
    qg = q[:, :, 0].float().view(b, kv, h // kv, hd)  # (B, KV, G, hd): head h reads kv head h // G
    lo, w = kmin.float(), (kmax.float() - kmin.float()) / slices  # (B, n, KV, hd): a slice's width
    base = torch.einsum("bkgd,bnkd->bkgn", qg, lo + w / 2)  # every level 0: each channel mid lowest slice
    up = qg[:, None, :, :, None, :] * w[:, :, :, None, None, :]  # (B, n, KV, G, 1, hd): what a level adds
    levels = unpack_codes(codes, hd)[:, :, :, None]  # (B, n, KV, 1, bt, hd)
    # one fused reduction when compiled; as a batched matmul it was up to 5x slower compiled (2x faster eager)
    best = (up * levels).sum(-1).amax(-1)  # (B, n, KV, G): the block's best key
    return (base + best.permute(0, 2, 3, 1)).reshape(b, h, -1) * hd ** -0.5


def block_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, codes: torch.Tensor,
                 frontier: torch.Tensor) -> torch.Tensor:
    """q (B, H, 1, hd), a summary (n blocks), frontier (B,) → scores (B, n) float32: the log of the
    block's estimated attention mass, mean over heads.

    Blocks after a row's frontier (the block its current token is in) hold no keys yet: -inf."""
    est = key_estimates(q, kmin, kmax, codes)  # (B, H, n)
    live = torch.arange(est.shape[2], device=q.device)[None, :] <= frontier[:, None]  # (B, n)
    est = est.masked_fill(~live[:, None, :], -INF)
    mass = est - torch.logsumexp(est, dim=-1, keepdim=True)  # log-softmax over the row's blocks, per head
    return torch.logsumexp(mass, dim=1) - math.log(est.shape[1])  # (B, n)


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
