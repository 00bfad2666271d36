"""The paged KV cache: blocks per (batch row, layer), a GPU ring of recent blocks, a host tier for
the rest, and exact or top-k decode attention over them.

GPU layout: per layer a ring (B, R, 2, KV, bt, hd); block j of a row sits in slot j % R. Without a
host tier R covers every block. With one (kv_offload cpu/ssd) R is the budget `kv_gpu_blocks`: the
ring holds each row's R most recent blocks, the block being written included; every block is
written back to the host tier once, when it is complete (the prompt's blocks right after the
prefill), so dropping a block from the ring needs no copy.

Exactness: prefill attends over the fresh keys exactly as `StaticKVCache` does. An exact decode step
assembles the row's blocks, in position order, into a (B, KV, J * bt, hd) buffer (fetched blocks
from the stage, ring blocks over them) and runs the very attention function of `StaticKVCache`
(`worker.attention`) on the same shapes (kv_len columns, the same positions). Visible columns hold
the same values, masked columns hold finite values whose weight is exactly 0, so the result is the
same bit for bit.

Top-k decode (topk < live blocks): score every block by its key bounds (`kv.topk`), keep the sink and the
most recent block(s) and the best of the rest among the blocks on the GPU (the ring and the blocks
the KV worker prefetched by last step's scores), gather them and attend exactly over those topk.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from worker.host.timing import span_end, span_start
from worker.kv.fetch import make_plan, run_fetch
from worker.kv.layout import Geometry, block_view, raw_blocks, to_blocks, typed
from worker.kv.topk import block_bounds, block_scores, recent_blocks, select_blocks
from worker.kv.tracker import BlockTracker
from worker.model import attention
from worker.model.step import Step
from worker.stream.devsync import Sync

log = logging.getLogger(__name__)


@dataclass
class PagedBuffers:
    """Memory of a paged cache, made once per (batch, max_seq) by the factory and reused across caches."""

    geo: Geometry
    ring_blocks: int  # R
    ring: list[torch.Tensor]  # per layer (B, R, 2, KV, bt, hd)
    wb_k: torch.Tensor  # (B, KV, J * bt, hd): one exact decode step's keys in position order
    wb_v: torch.Tensor
    smin: list[torch.Tensor] | None = None  # per layer (B, J, KV, hd): per-block key bounds (top-k)
    smax: list[torch.Tensor] | None = None
    stage: list[torch.Tensor] | None = None  # per fetch parity (B, Js, ext) uint8: blocks from the host tier
    cand: list[torch.Tensor] | None = None  # per parity (B, topk) long: block ids in the stage (top-k), -1 none
    cand_host: list[torch.Tensor] | None = None
    scores_host: torch.Tensor | None = None  # (L, B * J) float32 pinned: last scores, for the next fetch
    mover: Any = None  # KVMover when there is a host tier


class PagedKVCache:
    def __init__(self, bufs: PagedBuffers, topk: int, sync: Sync, tracker: BlockTracker | None = None,
                 compiled: bool = False):
        self.bufs, self.geo, self.sync = bufs, bufs.geo, sync
        self.attention = attention.kernels(compiled)[0]  # the resident cache's very attention
        self.bt, self.R, self.topk = bufs.geo.block_tokens, bufs.ring_blocks, topk
        self.recent = recent_blocks(topk) if topk else 0
        self.mover = bufs.mover
        self.tracker = tracker if topk else None
        device = bufs.wb_k.device
        self.rows = torch.arange(self.geo.batch, device=device)
        self.slots = torch.arange(self.R, device=device)
        if self.tracker:
            self.tracker.ensure(self.geo.batch, self.geo.n_blocks, device)
            self.tracker.reset()
        self.retired = False
        self._reset(None)
        self._fetches = 0
        self._stage_free: list[Any] = [None, None]  # compute event after the last read of each stage parity

    def _reset(self, lens) -> None:
        if self.mover:
            self.mover.drop_fetches()
        self.lens = lens
        self.pos: list[int] | None = None  # host positions of this decode step (host tier only)
        self.written = 0  # blocks per row the prefill wrote to the host tier
        self.steps = 0
        self._queued: dict[int, Any] = {}  # layer → its queued FetchPlan
        self._scores: list[Any] = [None] * self.geo.layers  # (pinned buf, n, event) of the last scoring

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step) -> torch.Tensor:
        """Store k, v (B, KV, T, hd) and attend q (B, H, T, hd) over the cached sequence → (B, H, T, hd)."""
        if self.retired:
            raise RuntimeError("this paged KV cache was replaced by a newer one from the same engine")
        if step.is_prefill:
            return self._prefill(layer, q, k, v, step)
        if layer == 0:
            self._begin_decode(step)
        t0 = span_start()
        out = self._decode(layer, q, k, v)
        span_end("kv.decode", t0)
        return out

    # ---- prefill -------------------------------------------------------------------------------------

    def _prefill(self, layer: int, q, k, v, step: Step) -> torch.Tensor:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        if layer == 0:
            self._reset(step.lens)
        blocks = to_blocks(k, v, self.bt)  # (B, jt, 2, KV, bt, hd)
        jt = blocks.shape[1]
        self.written = jt
        if self.topk:
            self.bufs.smin[layer][:, :jt], self.bufs.smax[layer][:, :jt] = block_bounds(blocks[:, :, 0])
        if self.mover:
            self.mover.write(layer, [(b, 0, raw_blocks(blocks[b])) for b in range(self.geo.batch)], self.sync.record())
        else:
            self.bufs.ring[layer][:, :jt] = blocks
        return out

    # ---- decode --------------------------------------------------------------------------------------

    def _begin_decode(self, step: Step) -> None:
        self.steps += 1
        self.kv_len = step.kv_len
        self.pos_d = step.positions[:, 0]  # (B,)
        self.f_d = torch.div(self.pos_d, self.bt, rounding_mode="floor")  # (B,) block being written
        self.off_d = self.pos_d - self.f_d * self.bt
        self.lo_d = (self.f_d - (self.R - 1)).clamp(min=0)  # first block in the ring
        self.nbk = min(math.ceil(step.kv_len / self.bt), self.geo.n_blocks)  # blocks the step can see
        if self.mover:
            if self.pos is None:
                self.pos = self._first_positions(step)
            else:
                self.pos = [p + 1 for p in self.pos]  # every decode step moves every row by one

    def _first_positions(self, step: Step) -> list[int]:
        return list(self.lens) if self.lens is not None else self._read_positions(step)

    @staticmethod
    def _read_positions(step: Step) -> list[int]:
        # the host plans block moves from each row's position: read once, at the prefill → decode boundary
        return step.positions[:, 0].tolist()

    def _decode(self, layer: int, q, k, v) -> torch.Tensor:
        plan = self._fetch_ahead(layer, q) if self.mover else None
        ring = self.bufs.ring[layer]
        slot = self.f_d % self.R
        ring[:, :, 0][self.rows, slot, :, self.off_d] = k[:, :, 0]  # (B, KV, hd)
        ring[:, :, 1][self.rows, slot, :, self.off_d] = v[:, :, 0]
        written = self.sync.record() if self.mover else None
        if self.topk:
            lo, hi = block_bounds(ring[self.rows, slot, 0][:, None], self.off_d + 1)  # (B, 1, KV, hd)
            self.bufs.smin[layer][self.rows, self.f_d] = lo[:, 0]
            self.bufs.smax[layer][self.rows, self.f_d] = hi[:, 0]
        exact = plan.exact if plan else (self.topk == 0 or self.topk >= self.nbk)
        t0 = span_start()
        out = self._exact(layer, q, plan) if exact else self._topk(layer, q, plan)
        span_end("kv.exact" if exact else "kv.topk", t0)
        if plan:
            self._stage_free[plan.parity] = self.sync.record()
            self._write_back(layer, written)
        return out

    def _exact(self, layer: int, q, plan) -> torch.Tensor:
        span, ring = self.kv_len, self.bufs.ring[layer]
        nb = math.ceil(span / self.bt)
        vk, vv = block_view(self.bufs.wb_k, self.bt), block_view(self.bufs.wb_v, self.bt)  # (B, J, KV, bt, hd)
        if plan is None:
            vk[:, :nb], vv[:, :nb] = ring[:, :nb, 0], ring[:, :nb, 1]
        else:
            m = min(nb, plan.max_lo)
            if m:
                st = typed(self.bufs.stage[plan.parity], self.geo)[:, :m]  # (B, m, 2, KV, bt, hd)
                vk[:, :m], vv[:, :m] = st[:, :, 0], st[:, :, 1]
            jw = torch.minimum(self.lo_d[:, None] + self.slots, self.f_d[:, None])  # (B, R) ring blocks
            src = ring[self.rows[:, None], jw % self.R]  # (B, R, 2, KV, bt, hd)
            vk[self.rows[:, None], jw] = src[:, :, 0]
            vv[self.rows[:, None], jw] = src[:, :, 1]
        if self.topk:
            self._score(layer, q, self.nbk)
        return self.attention(q, self.bufs.wb_k[:, :, :span], self.bufs.wb_v[:, :, :span], self.pos_d)

    def _score(self, layer: int, q, n: int, record: bool = True) -> torch.Tensor:
        sc = block_scores(q, self.bufs.smin[layer][:, :n], self.bufs.smax[layer][:, :n], self.f_d)  # (B, n)
        if self.tracker and record:
            self.tracker.record_scores(layer, sc)
        if self.mover:
            buf = self.bufs.scores_host[layer]
            buf[:sc.numel()].view(sc.shape).copy_(sc, non_blocking=True)
            self._scores[layer] = (buf, n, self.sync.record())
        return sc

    def _topk(self, layer: int, q, plan) -> torch.Tensor:
        b, kv, bt, topk, n = self.geo.batch, self.geo.kv_heads, self.bt, self.topk, self.nbk
        sc = self._score(layer, q, n)
        j = torch.arange(n, device=q.device)[None, :]  # (1, n)
        if plan is None:
            pool, slot_of, avail = self.bufs.ring[layer], j.expand(b, n), None
        else:
            stage = typed(self.bufs.stage[plan.parity].view(-1)[:b * topk * self.bufs.stage[0].shape[2]]
                          .view(b, topk, -1), self.geo)  # (B, topk, 2, KV, bt, hd)
            pool = torch.cat([self.bufs.ring[layer], stage], dim=1)  # (B, R + topk, ...)
            in_ring = (j >= self.lo_d[:, None]) & (j <= self.f_d[:, None])
            slot_of = torch.cat([torch.where(in_ring, j % self.R, -1),
                                 torch.full((b, 1), -1, device=q.device, dtype=torch.long)], 1)  # (B, n + 1)
            cand = self.bufs.cand[plan.parity]  # (B, topk)
            stage_slots = (self.R + torch.arange(topk, device=q.device)).expand(b, topk)  # (B, topk)
            slot_of.scatter_(1, torch.where(cand >= 0, cand, n), stage_slots)
            slot_of = slot_of[:, :n]
            avail = slot_of >= 0
        sel, valid = select_blocks(sc, topk, self.f_d, avail, self.recent)  # (B, topk)
        if self.tracker:
            self.tracker.record_hits(layer, sel, valid)
        blocks = pool[self.rows[:, None], slot_of.gather(1, sel).clamp(min=0)]  # (B, topk, 2, KV, bt, hd)
        kk = blocks[:, :, 0].transpose(1, 2).reshape(b, kv, topk * bt, -1)  # (B, KV, topk * bt, hd)
        vv = blocks[:, :, 1].transpose(1, 2).reshape(b, kv, topk * bt, -1)
        cols = (sel[:, :, None] * bt + torch.arange(bt, device=q.device)).view(b, topk * bt)  # positions
        visible = valid.repeat_interleave(bt, dim=1) & (cols <= self.pos_d[:, None])
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=visible[:, None, None, :], enable_gqa=True)

    # ---- host tier -----------------------------------------------------------------------------------

    def _fetch_ahead(self, layer: int, q):
        """Queue this layer's fetch (if not already) and the next one's, then wait for this one.

        Top-k fetches choose blocks by the previous step's scores of the layer. The first decode step
        has none: it scores with the current query and reads the scores back (a host sync per layer,
        once per generation), so it cannot queue the next layer ahead."""
        first = self.steps == 1
        now = first and 0 < self.topk < max(self.pos) // self.bt + 1  # top-k at the first step: score now
        if layer not in self._queued:
            scores = None
            if now:
                self._score(layer, q, self.nbk, record=False)
                scores = self._scores[layer]
                scores[2].synchronize()
            self._queue(layer, self.pos, first, scores)
        if layer + 1 < self.geo.layers:
            nxt, pos, ahead = layer + 1, self.pos, not now
        else:
            nxt, pos, ahead = 0, [p + 1 for p in self.pos], max(self.pos) + 1 < self.geo.max_seq
        if ahead and nxt not in self._queued:
            self._queue(nxt, pos, first and nxt > 0)
        t0 = span_start()
        self.mover.ready(layer)
        span_end("kv.ready", t0)
        return self._queued.pop(layer)

    def _queue(self, layer: int, pos: list[int], first: bool, scores=None) -> None:
        parity = self._fetches % 2
        self._fetches += 1
        plan = make_plan(layer, parity, pos, self.bt, self.R, self.written, first, self.topk, self.recent)
        self._queued[layer] = plan
        free, scores = self._stage_free[parity], scores or self._scores[layer]
        self.mover.fetch(layer, lambda m: run_fetch(m, self, plan, free, scores))

    def _write_back(self, layer: int, after) -> None:
        """Blocks completed by this step's token go to the host tier."""
        ring, bt = self.bufs.ring[layer], self.bt
        items = [(b, p // bt, raw_blocks(ring[b, (p // bt) % self.R][None])) for b, p in enumerate(self.pos)
                 if p % bt == bt - 1]
        if items:
            self.mover.write(layer, items, after)
