"""The device side of one paged decode step of one layer, as a few functions of tensors.

Each is one compiled graph on CUDA (`worker.model.compiled`: fullgraph, dynamic=False, deterministic;
one variant per span bucket, since the block count n = ceil(kv_len / bt) is the only shape that
changes during a generation) and runs eagerly on CPU. A layer-step calls one or two of them, never a
string of eager ops: on CUDA each call from Python costs host time, and a decode step over an
offloaded cache is bound by the host.

- `put_token` (inside the exact and top-k steps): the step's k, v into the GPU ring, and the new key into
  its block's summary (top-k).
- `score_step`: score every block with the current query, record the scores in the tracker, and
  choose the offloaded blocks the KV stream fetches for the layer's next step (`topk.candidates`).
  The first top-k step runs it before its fetch (no earlier scores exist).
- `exact_step`: `put_token`, the assembly of the row's blocks in position order (the stage the KV
  stream filled with the offloaded ones, the ring over them) into the exact path's working buffers,
  and with top-k on `score_step` (so a later top-k step has candidates). The attention over the
  buffers is then the resident cache's own function (`worker.attention`), called as it calls it.
- `topk_step`: `put_token`, scores, tracker, the selection among the blocks on the GPU (ring and the
  stage the KV stream filled with last step's candidates), the gather of the chosen blocks, exact
  attention over them, and the next step's candidates.

Nothing in them reads the host or depends on data for a shape: `fullgraph=True` would refuse a
graph break (an `.item()`, a `nonzero`), and tests/test_kv_topk_device.py traces them so on CPU.
Layer-independent: a layer's tensors are arguments (the tracker's slices are views of the same
strides for every layer), so every layer replays the same compiled code.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from worker.kv import topk as sel
from worker.kv.layout import block_view
from worker.kv.tracker import Track, record_hits, record_scores
from worker.model import attention
from worker.model import compiled as compiling


def put_token(ring: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, bt: int,
              summary: sel.Summary | None, store: torch.Tensor | None = None) -> None:
    """Write k, v (B, KV, 1, hd) into ring (B, R, 2, KV, bt, hd) at each row's position pos (B,); with
    a summary (kmin, kmax, codes: `topk.block_summary`) also summarize the block's keys so far into it;
    with `store` (B, J, 2, KV, bt, hd), the host tier's blocks as the device sees them (`kv.zerocopy`),
    also write the token there (a graphed cache: its blocks reach the host tier token by token, since
    a write-back whose timing and address the host picks cannot be replayed)."""
    b, r, kv = ring.shape[0], ring.shape[1], ring.shape[3]
    dev = ring.device
    rows = torch.arange(b, device=dev)
    f = torch.div(pos, bt, rounding_mode="floor")  # (B,) the block being written
    off = pos - f * bt
    # one index_put_ with an index for every dimension but the last: compiled, it is a scatter of the
    # token's 2 x KV rows (indexing a view such as ring[:, :, 0] became a copy of the whole buffer)
    new = torch.stack((k[:, :, 0], v[:, :, 0]), 1)  # (B, 2, KV, hd)
    at = (torch.arange(2, device=dev)[None, :, None], torch.arange(kv, device=dev)[None, None, :], off[:, None, None])
    ring.index_put_((rows[:, None, None], (f % r)[:, None, None], *at), new)
    if store is not None:
        store.index_put_((rows[:, None, None], f[:, None, None], *at), new)
    if summary is not None:
        bits = sel.code_bits(summary[2], ring.shape[-1])
        for dst, part in zip(summary, sel.block_summary(ring[rows, f % r, 0][:, None], off + 1, bits)):  # (B, 1, ...)
            dst[rows, f] = part[:, 0]


def score_step(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, codes: torch.Tensor, pos: torch.Tensor,
               bt: int, track: Track | None, cand: torch.Tensor | None, ahead: int, ring_blocks: int,
               recent: int) -> None:
    """Score the n blocks (their summary kmin, kmax, codes: `topk.block_summary`) for q (B, H, 1, hd) at
    positions pos (B,); record the scores (track); write into cand (B, k) the candidates for the step
    at pos + ahead."""
    sc = sel.block_scores(q, kmin, kmax, codes, torch.div(pos, bt, rounding_mode="floor"))  # (B, n)
    if track is not None:
        record_scores(track, sc)
    if cand is not None:
        frontier = torch.div(pos + ahead, bt, rounding_mode="floor")
        cand.copy_(sel.candidates(sc, frontier, ring_blocks, cand.shape[1], recent))


def exact_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, ring: torch.Tensor,
               summary: sel.Summary | None, stage: torch.Tensor | None, wb_k: torch.Tensor, wb_v: torch.Tensor, bt: int,
               track: Track | None, cand: torch.Tensor | None, recent: int, store: torch.Tensor | None = None) -> None:
    """Store the token and assemble an exact step's keys and values in position order.

    q (B, H, 1, hd); k, v (B, KV, 1, hd); pos (B,); ring (B, R, 2, KV, bt, hd); wb_k, wb_v (B, KV, nb * bt,
    hd), the working buffers over the span's nb blocks (written). stage (B, m, 2, KV, bt, hd): blocks
    [0, m) as the KV stream fetched them (each row's offloaded ones are current; the rest are older
    blocks, finite, which the ring overwrites or the attention masks), or None when the ring holds
    every block. summary (kmin, kmax, codes: `topk.block_summary`) with top-k: the summary is updated
    and the blocks scored (track; cand (B, k) the next step's candidates when there is a host tier).
    store: as `put_token`'s."""
    b, r, nb = ring.shape[0], ring.shape[1], wb_k.shape[2] // bt
    put_token(ring, k, v, pos, bt, summary, store)
    vk, vv = block_view(wb_k, bt), block_view(wb_v, bt)  # (B, nb, KV, bt, hd) views
    if stage is None:  # block j sits in slot j
        vk.copy_(ring[:, :nb, 0])
        vv.copy_(ring[:, :nb, 1])
    else:
        m = stage.shape[1]
        vk[:, :m] = stage[:, :, 0]
        vv[:, :m] = stage[:, :, 1]
        rows = torch.arange(b, device=ring.device)[:, None]  # (B, 1)
        f = torch.div(pos, bt, rounding_mode="floor")[:, None]  # (B, 1) the block being written
        jw = torch.minimum((f - (r - 1)).clamp(min=0) + torch.arange(r, device=ring.device), f)  # (B, R) in the ring
        src = ring[rows, jw % r]  # (B, R, 2, KV, bt, hd)
        vk[rows, jw] = src[:, :, 0]
        vv[rows, jw] = src[:, :, 1]
    if summary is not None:
        score_step(q, *summary, pos, bt, track, cand, 1, r, recent)


def topk_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, ring: torch.Tensor,
              kmin: torch.Tensor, kmax: torch.Tensor, codes: torch.Tensor, stage: torch.Tensor | None,
              cand: torch.Tensor | None, track: Track | None, bt: int, topk: int, recent: int,
              store: torch.Tensor | None = None) -> torch.Tensor:
    """One top-k decode step of a layer → attention output (B, H, 1, hd).

    q (B, H, 1, hd); k, v (B, KV, 1, hd); pos (B,); ring (B, R, 2, KV, bt, hd); kmin/kmax (B, n, KV, hd)
    and codes (B, n, KV, bt, nb), the blocks' summary (`topk.block_summary`), with n > topk; stage
    (B, kc, 2, KV, bt, hd) the fetched candidates cand (B, kc) (block ids, -1 none; overwritten with the
    next step's), or both None when the ring holds every block. store: as `put_token`'s."""
    b, r = ring.shape[0], ring.shape[1]
    n = kmin.shape[1]
    dev = q.device
    rows = torch.arange(b, device=dev)[:, None]  # (B, 1)
    put_token(ring, k, v, pos, bt, (kmin, kmax, codes), store)
    f = torch.div(pos, bt, rounding_mode="floor")  # (B,)
    sc = sel.block_scores(q, kmin, kmax, codes, f)  # (B, n)
    avail, slot = None, None
    if stage is not None:
        kc = cand.shape[1]
        j = torch.arange(n, device=dev)[None, :]  # (1, n)
        lo = (f - r + 1).clamp(min=0)[:, None]
        in_ring = (j >= lo) & (j <= f[:, None])  # (B, n)
        slot = torch.full((b, n + 1), -1, dtype=torch.long, device=dev)  # stage slot of each block, -1 none
        slot.scatter_(1, torch.where(cand >= 0, cand, n), torch.arange(kc, device=dev).expand(b, kc))
        slot = slot[:, :n]
        avail = in_ring | (slot >= 0)
    chosen, valid = sel.select_blocks(sc, topk, f, avail, recent)  # (B, topk)
    if track is not None:
        record_scores(track, sc)
        record_hits(track, chosen, valid)
    blocks = ring[rows, chosen % r]  # (B, topk, 2, KV, bt, hd)
    if stage is not None:
        at = slot.gather(1, chosen)  # (B, topk) stage slot, -1: in the ring
        staged = stage[rows, at.clamp(min=0)]
        blocks = torch.where((at >= 0)[:, :, None, None, None, None], staged, blocks)
        cand.copy_(sel.candidates(sc, torch.div(pos + 1, bt, rounding_mode="floor"), r, cand.shape[1], recent))
    kv, hd = ring.shape[3], ring.shape[5]
    kk = blocks[:, :, 0].transpose(1, 2).reshape(b, kv, topk * bt, hd)  # (B, KV, topk * bt, hd)
    vv = blocks[:, :, 1].transpose(1, 2).reshape(b, kv, topk * bt, hd)
    cols = (chosen[:, :, None] * bt + torch.arange(bt, device=dev)).reshape(b, topk * bt)  # positions
    visible = valid[:, :, None].expand(b, topk, bt).reshape(b, topk * bt) & (cols <= pos[:, None])
    return attention.masked_decode_attention(q, kk, vv, visible)


@functools.cache
def kernels(compiled: bool) -> SimpleNamespace:
    """score / exact / topk, compiled once per process when asked (CUDA), else the plain functions."""
    wrap = compiling.compiled if compiled else (lambda fn: fn)
    return SimpleNamespace(score=wrap(score_step), exact=wrap(exact_step), topk=wrap(topk_step))
