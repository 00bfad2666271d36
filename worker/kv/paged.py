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

Top-k decode (topk < live blocks) is one device function per layer (`kv.kernels.topk_step`,
compiled on CUDA): score every block by its key summary (`kv.topk`), keep the sink and the most
recent block(s) and the best of the rest among the blocks on the GPU (the ring and the blocks the
KV stream prefetched by last step's scores), gather them, attend exactly over those topk, and choose
the offloaded blocks for the layer's next step. The compute thread only plans from host-known
positions (once per step) and launches: it never reads a device value back, so it runs ahead of
the device.

CUDA graphs (`use_graphs`, `worker.model.graphs`): with the CPU tier mapped into the device
(`kv.zerocopy`) a steady top-k step (every row has at least k offloaded blocks, so every layer's
fetch is one gather kernel of B x k blocks) has no host work left but launching, and launching a
step's ~hundreds of kernels is what bounds it. Such a step replays as a graph per span bucket. Three
things change for every decode step of a graphed cache, replayed or not, so that one can be
captured and both compute the same: a step's token goes to the host tier as it is stored (device
code writing the mapped tier, `kernels.put_token`) instead of a block write-back on completion; a
step's fetches start inside the step (no prefetch of the next step's first layer); and they depend
only on events recorded in the step (an event from the previous step cannot be waited on inside a
graph; the previous step ran before the step's first event, on the same stream).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from worker.host.timing import span_end, span_start
from worker.kv import kernels
from worker.kv.fetch import Candidates, FetchCount, make_plan, reach, run_fetch
from worker.kv.layout import Geometry, raw_blocks, to_blocks, typed
from worker.kv.topk import block_summary, code_bits, recent_blocks
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
    smin: list[torch.Tensor] | None = None  # per layer (B, J, KV, hd): per-block key ranges (top-k)
    smax: list[torch.Tensor] | None = None
    scode: list[torch.Tensor] | None = None  # per layer (B, J, KV, bt, bits * ceil(hd / 8)) uint8: the keys' codes (top-k)
    stage: list[torch.Tensor] | None = None  # per fetch parity (B, Js, ext) uint8: blocks from the host tier
    cand: list[torch.Tensor] | None = None  # per layer (B, topk) long: the next step's candidates (top-k), -1 none
    cand_host: list[torch.Tensor] | None = None  # per layer, pinned copies of cand (host gathers only)
    mover: Any = None  # KVMover when there is a host tier


@dataclass
class SpanViews:
    """The views a decode step over `span` positions passes to the device functions, made once per span
    (a few buckets per generation) instead of once per layer-step."""

    summary: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None  # per layer: the blocks' key summary (top-k)
    wb: tuple[torch.Tensor, torch.Tensor]  # the exact path's buffers over the span's nb blocks (B, KV, nb * bt, hd)
    attend: tuple[torch.Tensor, torch.Tensor]  # and over the span's columns (B, KV, span, hd)
    stage: list[torch.Tensor] | None  # per fetch parity, its first min(nb, Js) blocks (B, ., 2, KV, bt, hd)


class PagedKVCache:
    def __init__(self, bufs: PagedBuffers, topk: int, sync: Sync, tracker: BlockTracker | None = None,
                 compiled: bool = False, counter: FetchCount | None = None):
        self.bufs, self.geo, self.sync = bufs, bufs.geo, sync
        self.attention = attention.kernels(compiled)[0]  # the resident cache's very attention
        self.fns = kernels.kernels(compiled)  # put / score / topk on the device
        self.bt, self.R, self.topk = bufs.geo.block_tokens, bufs.ring_blocks, topk
        self.recent = recent_blocks(topk) if topk else 0
        self.mover = bufs.mover
        self.counter = counter if counter is not None else FetchCount()
        # the device reads the CPU tier itself, or the chosen ids go to the host for it (SSD tier)
        self.host_ids = bool(self.mover and topk and self.mover.store.device_view is None)
        self.tracker = tracker if topk else None
        device = bufs.wb_k.device
        self.track: list[Any] = [None] * self.geo.layers
        if self.tracker:
            self.tracker.ensure(self.geo.batch, self.geo.n_blocks, device)
            self.tracker.reset()
            self.track = [self.tracker.rows(layer, self.geo.batch) for layer in range(self.geo.layers)]
        self.stage = [typed(raw, self.geo) for raw in bufs.stage] if bufs.stage else None  # (B, Js, 2, KV, bt, hd)
        self._spans: dict[int, SpanViews] = {}
        self.retired = False
        self._reset(None)
        self._fetches = 0
        self._stage_free: list[Any] = [None, None]  # compute event after the last read of each stage parity
        self.graphed = False  # `use_graphs`
        self.topk_spans: set[int] = set()  # spans a top-k step ran at (its compiled kernels exist)

    def _reset(self, lens) -> None:
        if self.mover:
            self.mover.drop_fetches()
        self.lens = lens
        self.pos: tuple[int, ...] | None = None  # host positions of this decode step (host tier only)
        self.pos_next: tuple[int, ...] | None = None  # and of the next one
        self._closing: list[tuple[int, int]] = []  # (row, block) this step's token completes
        self.written = 0  # blocks per row the prefill wrote to the host tier
        self.steps = 0
        self._queued: dict[int, Any] = {}  # layer → its queued FetchPlan
        self._cand: list[Candidates | None] = [None] * self.geo.layers  # each layer's latest candidates

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
            summary = self._summary(layer, jt)
            bits = code_bits(summary[2], self.geo.head_dim)
            for dst, part in zip(summary, block_summary(blocks[:, :, 0], None, bits)):
                dst.copy_(part)
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
        self.nbk = min(math.ceil(step.kv_len / self.bt), self.geo.n_blocks)  # blocks the step can see
        self.views = self._spans.get(step.kv_len) or self._span_views(step.kv_len)
        if self.mover:  # every decode step moves every row by one
            self.pos = self._first_positions(step) if self.pos is None else self.pos_next
            self.pos_next = tuple(p + 1 for p in self.pos)
            bt = self.bt
            self._closing = [(b, p // bt) for b, p in enumerate(self.pos) if p % bt == bt - 1]
        if self.graphed:  # the step's fetches wait for this, not for anything of the step before
            start = self.sync.record()
            self._stage_free = [start, start]
            self._cand = [c if c is None else Candidates(c.ids, start) for c in self._cand]

    def _first_positions(self, step: Step) -> tuple[int, ...]:
        return tuple(self.lens) if self.lens is not None else self._read_positions(step)

    @staticmethod
    def _read_positions(step: Step) -> tuple[int, ...]:
        # the host plans block moves from each row's position: read once, at the prefill → decode boundary
        return tuple(step.positions[:, 0].tolist())

    def _decode(self, layer: int, q, k, v) -> torch.Tensor:
        plan = self._fetch_ahead(layer, q) if self.mover else None
        exact = plan.exact if plan else (self.topk == 0 or self.topk >= self.nbk)
        self.counter.add(self.geo.batch, sum(plan.counts) if plan else 0)
        t0 = span_start()
        out, written = self._exact(layer, q, k, v, plan) if exact else self._topk(layer, q, k, v, plan)
        span_end("kv.exact" if exact else "kv.topk", t0)
        if plan:  # the top-k step's one event comes after its last read of the stage too
            self._stage_free[plan.parity] = self.sync.record() if exact else written
            if not self.graphed:  # a graphed cache wrote the token to the host tier already
                self._write_back(layer, written)
        return out

    def _span_views(self, span: int) -> SpanViews:
        bufs, nb = self.bufs, math.ceil(span / self.bt)
        nbk = min(nb, self.geo.n_blocks)  # the key summaries of the blocks the step can see
        summary = ([(lo[:, :nbk], hi[:, :nbk], sg[:, :nbk]) for lo, hi, sg in zip(bufs.smin, bufs.smax, bufs.scode)]
                   if self.topk else None)
        wb = (bufs.wb_k[:, :, :nb * self.bt], bufs.wb_v[:, :, :nb * self.bt])
        stage = [st[:, :nb] for st in self.stage] if self.stage else None
        views = SpanViews(summary, wb, (wb[0][:, :, :span], wb[1][:, :, :span]), stage)
        self._spans[span] = views
        return views

    def _summary(self, layer: int, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The key summary (`topk.block_summary`) of the blocks this step can see, or of the first n: views."""
        if n is None:
            return self.views.summary[layer]
        return self.bufs.smin[layer][:, :n], self.bufs.smax[layer][:, :n], self.bufs.scode[layer][:, :n]

    def _exact(self, layer: int, q, k, v, plan):
        """Store the token, assemble the blocks in position order, attend → (out, event after the store).

        One device function (`kernels.exact_step`), then the resident cache's attention on the span."""
        views = self.views
        # every block the stage holds up to the span's: the step's fetch filled the offloaded ones
        stage = views.stage[plan.parity] if plan is not None else None  # (B, min(nb, Js), 2, KV, bt, hd)
        cand = self.bufs.cand[layer] if self.topk and self.mover else None
        self.fns.exact(q, k, v, self.pos_d, self.bufs.ring[layer], self._summary(layer) if self.topk else None, stage,
                       *views.wb, self.bt, self.track[layer], cand, self.recent, self._tier(layer))
        written = self.sync.record() if self.mover else None
        if cand is not None:  # the candidates of a later top-k step
            self._chosen(layer, written)
        return self.attention(q, *views.attend, self.pos_d), written

    def _topk(self, layer: int, q, k, v, plan):
        """The compiled top-k step (`kernels.topk_step`) → (out, event after it)."""
        stage = self.stage[plan.parity] if plan else None  # (B, topk, 2, KV, bt, hd)
        cand = self.bufs.cand[layer] if plan else None
        self.topk_spans.add(self.kv_len)
        out = self.fns.topk(q, k, v, self.pos_d, self.bufs.ring[layer], *self._summary(layer), stage, cand,
                            self.track[layer], self.bt, self.topk, self.recent, self._tier(layer))
        if not plan:
            return out, None
        done = self.sync.record()
        self._chosen(layer, done)
        return out, done

    def _tier(self, layer: int) -> torch.Tensor | None:
        """The host tier's blocks of `layer` as the device writes them (a graphed cache), else None."""
        return self.mover.store.token_views[layer] if self.graphed else None

    def _chosen(self, layer: int, event=None) -> None:
        """The device has written the layer's next candidates (before `event`): where the fetch finds them."""
        ids = self.bufs.cand[layer]
        event = self.sync.record() if event is None else event
        if not self.host_ids:
            self._cand[layer] = Candidates(ids, event)
            return
        host = self.bufs.cand_host[layer]
        host.copy_(ids, non_blocking=True)  # B x k ids; the KV worker waits for this copy, not the compute thread
        self._cand[layer] = Candidates(ids, event, host, self.sync.record())

    # ---- host tier -----------------------------------------------------------------------------------

    def _fetch_ahead(self, layer: int, q):
        """Queue this layer's fetch (if not already) and the next one's, then wait for this one.

        Top-k fetches take the candidates the device chose from the previous step's scores of the
        layer. The first decode step has none: the device scores with the current query first and
        the fetch waits for that (on the KV stream), so it cannot be queued a layer ahead."""
        first = self.steps == 1
        now = first and 0 < self.topk < max(self.pos) // self.bt + 1  # top-k at the first step: score now
        if layer not in self._queued:
            if now:
                self.fns.score(q, *self._summary(layer), self.pos_d, self.bt, None, self.bufs.cand[layer], 0, self.R,
                               self.recent)
                self._chosen(layer)
            self._queue(layer, self.pos, first)
        if layer + 1 < self.geo.layers:
            nxt, pos, ahead = layer + 1, self.pos, not now
        else:  # a graphed cache's steps fetch only their own layers
            nxt, pos, ahead = 0, self.pos_next, not self.graphed and max(self.pos) + 1 < self.geo.max_seq
        if ahead and nxt not in self._queued:
            self._queue(nxt, pos, first and nxt > 0)
        t0 = span_start()
        self.mover.ready(layer)
        span_end("kv.ready", t0)
        return self._queued.pop(layer)

    def _queue(self, layer: int, pos: tuple[int, ...], first: bool) -> None:
        parity = self._fetches % 2
        self._fetches += 1
        plan = make_plan(layer, parity, pos, self.bt, self.R, self.written, first, self.topk, self.recent)
        self._queued[layer] = plan
        free, cand = self._stage_free[parity], self._cand[layer]
        self.mover.fetch(layer, lambda m: run_fetch(m, self, plan, free, cand))

    def _write_back(self, layer: int, after) -> None:
        """Blocks completed by this step's token go to the host tier."""
        if self._closing:
            ring = self.bufs.ring[layer]
            self.mover.write(layer, [(b, j, raw_blocks(ring[b, j % self.R][None])) for b, j in self._closing], after)

    # ---- CUDA graphs (see the module docstring) ------------------------------------------------------

    def can_graph(self) -> bool:
        """Whether steady top-k steps could replay as CUDA graphs: the device reads and writes the host
        tier itself, so a step's KV moves are kernels launched from its compute thread."""
        store = self.mover.store if self.mover else None
        return bool(self.topk and self.mover and self.mover.inline and getattr(store, "device_view", None) is not None)

    def use_graphs(self) -> None:
        """Run every decode step from now on so that a steady one can be captured (module docstring)."""
        if not self.can_graph():
            raise ValueError("this KV cache's decode steps cannot be graphed (needs top-k over a mapped CPU tier)")
        self.graphed = True

    def graph_ready(self) -> bool:
        """Whether the coming decode step is steady, known on the host: not the first (it fills the ring),
        top-k (not exact), and every row reads k offloaded blocks, so its device work is the same as every
        other steady step's of its span."""
        if not self.graphed or self.steps < 1 or self.pos_next is None:
            return False
        exact, _, _, counts, _ = reach(self.pos_next, self.bt, self.R, self.topk)
        return not exact and all(c == self.topk for c in counts)

    def replayed(self, step: Step) -> None:
        """The host's side of a decode step a CUDA graph ran: positions and what the step fetched."""
        self._begin_decode(step)
        blocks = self.topk * self.geo.batch  # a steady step (`graph_ready`) reads k blocks per row and layer
        for _ in range(self.geo.layers):
            self.counter.add(self.geo.batch, blocks)
        self._fetches += self.geo.layers
        self.mover.h2d.add_untimed(blocks * self.geo.block_bytes * self.geo.layers)
