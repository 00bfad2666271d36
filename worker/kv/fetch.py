"""Host-side planning of one layer's fetch, and the job the KV worker runs for it.

A plan is made on the compute thread from host-known positions (cheap, O(batch)); the job runs on
the KV worker: it loads the ring window at the first decode step, then either every offloaded block
of every row (exact attention) or the topk candidate blocks per row (top-k), chosen from the scores the
previous decode step computed for this layer (lagged by one step, so the fetch can start a layer
ahead of the compute that will use it). Blocks land in a GPU stage buffer (one per fetch parity).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from worker.host.timing import span_end, span_start
from worker.kv.offload import KVMover, wait_for

INF = float("inf")


@dataclass
class FetchPlan:
    layer: int
    parity: int
    exact: bool  # fetch every offloaded block (exact attention) or top-k candidates
    lo: list[int]  # per row: blocks [0, lo) are offloaded; [lo, frontier] are in the GPU ring
    frontier: list[int]  # per row: the block the current token goes into
    fill: list[tuple[int, int]]  # (row, block) to load into the ring first (first decode step)
    topk: int = 0
    recent: int = 0

    @property
    def max_lo(self) -> int:
        return max(self.lo, default=0)


def make_plan(layer: int, parity: int, pos: list[int], bt: int, ring_blocks: int, written: int, first: bool,
              topk: int, recent: int) -> FetchPlan:
    frontier = [p // bt for p in pos]
    lo = [max(0, f - ring_blocks + 1) for f in frontier]
    exact = topk == 0 or topk >= max(frontier) + 1
    fill = [(b, j) for b, f in enumerate(frontier) for j in range(lo[b], min(f + 1, written))] if first else []
    return FetchPlan(layer, parity, exact, lo, frontier, fill, topk, recent)


def candidates(plan: FetchPlan, scores: torch.Tensor | None) -> torch.Tensor:
    """Offloaded blocks to fetch per row for top-k: (B, topk) block ids, -1 = none.

    Always the sink block and offloaded recent blocks, then the best by last step's scores (B, >= lo),
    or the most recent blocks when no step has been scored yet."""
    b, n = len(plan.lo), max(plan.max_lo, 1)
    j = torch.arange(n)[None, :]  # (1, n)
    lo, f = torch.tensor(plan.lo)[:, None], torch.tensor(plan.frontier)[:, None]
    off = j < lo
    forced = off & ((j == 0) | (j > f - plan.recent))
    s = scores[:, :n].float() if scores is not None else j.expand(b, n).float()
    s = torch.where(off, torch.where(forced, INF, s), -INF)
    top, idx = s.topk(min(plan.topk, n), dim=1)
    cand = torch.full((b, plan.topk), -1, dtype=torch.long)
    cand[:, :idx.shape[1]] = torch.where(top > -INF, idx, -1)
    return cand


def run_fetch(m: KVMover, cache: Any, plan: FetchPlan, stage_free: Any, scores: tuple | None) -> Any:
    """The KV worker's part: issue the H2D copies of `plan`; returns the event after them.

    `scores`: (pinned (B * n) tensor, n, event) of the last scored step, or None."""
    t0 = span_start()
    done = _issue(m, cache, plan, stage_free, scores)
    span_end("kv.fetch", t0)
    return done


def _issue(m: KVMover, cache: Any, plan: FetchPlan, stage_free: Any, scores: tuple | None) -> Any:
    m.sync.wait(stage_free, m.stream)  # the compute that read this stage parity last has run
    m.wait_uploaded(plan.parity)  # ... and the pinned buffers of this parity are free again
    geo, bufs, store = cache.geo, cache.bufs, m.store
    bb, L, p = geo.block_bytes, plan.layer, plan.parity
    pairs = []
    if plan.fill:
        ring_raw = bufs.ring[L].view(geo.batch, bufs.ring_blocks, bb // geo.item).view(torch.uint8)  # (B, R, bb)
        srcs = store.blocks(L, plan.fill)
        pairs += [(ring_raw[b, j % bufs.ring_blocks], src[:bb]) for (b, j), src in zip(plan.fill, srcs)]
    stage = bufs.stage[p]  # (B, Js, ext) uint8
    if plan.exact:
        rows = [(b, lo) for b, lo in enumerate(plan.lo) if lo > 0]
        pairs += [(stage[b, :lo].view(-1), src) for (b, lo), src in zip(rows, store.prefix(L, rows, p))]
        return m.upload(pairs, p)
    if plan.max_lo == 0:  # nothing offloaded yet: every candidate slot stays empty
        bufs.cand_host[p].fill_(-1)
        return m.upload(pairs, p, untimed=[(bufs.cand[p], bufs.cand_host[p])])
    host = None
    if scores is not None:
        buf, n, ev = scores
        wait_for(ev)
        host = buf[:geo.batch * n].view(geo.batch, n)
    t0 = span_start()
    cand = candidates(plan, host)  # (B, topk)
    span_end("kv.candidates", t0)
    flat = torch.where(cand >= 0, torch.arange(geo.batch)[:, None] * geo.n_blocks + cand, -1).view(-1)
    src = store.gather(L, flat, p)  # (B * topk, ext) pinned
    pairs.append((stage.view(-1)[:src.numel()], src.view(-1)))
    bufs.cand_host[p].copy_(cand)
    return m.upload(pairs, p, untimed=[(bufs.cand[p], bufs.cand_host[p])])  # which block is where: not KV bytes
