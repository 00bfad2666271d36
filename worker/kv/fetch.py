"""Host-side planning of one layer's fetch, and the job that issues it on the KV stream.

A plan is made on the compute thread from host-known positions (O(batch), once per step: every layer
of a step shares it); the job runs inline on the compute thread or on the KV worker
(`kv.offload`): it loads the ring window at the first decode step, then either every offloaded block
of every row (exact attention) or the top-k candidates per row (top-k). Blocks land in a GPU stage
buffer (one per fetch parity).

The candidates are chosen on the device (`topk.candidates`, inside the compiled step that scored the
layer one step earlier, so the fetch can start a layer ahead of the compute that uses it); the host
never sees a score. The host knows only how many candidates each row has, min(k, offloaded blocks),
which fixes the copy's size. How the chosen blocks cross PCIe depends on the tier:

- device gather (the CPU tier on CUDA, and its CPU twin): the KV stream waits for the event after the
  step that wrote the candidate ids, and a gather kernel reads exactly those blocks from the pinned
  store through its device mapping (`kv.zerocopy`); the ids never leave the device, the host waits
  for nothing, and the compute thread issues the job itself.
- host gather (the SSD tier, or a CPU tier whose memory the device cannot map): the compute stream
  copies the ids to pinned memory right after choosing them (B x k integers); the KV worker waits for
  that copy (issued a layer-step or more earlier), reads the blocks into pinned memory and copies
  them up. The compute thread never waits for the device here either.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from worker.host.timing import span_end, span_start
from worker.kv.offload import KVMover, wait_for


@dataclass
class FetchPlan:
    layer: int
    parity: int
    exact: bool  # fetch every offloaded block (exact attention) or top-k candidates
    lo: tuple[int, ...]  # per row: blocks [0, lo) are offloaded; [lo, frontier] are in the GPU ring
    frontier: tuple[int, ...]  # per row: the block the current token goes into
    fill: list[tuple[int, int]]  # (row, block) to load into the ring first (first decode step)
    topk: int = 0
    recent: int = 0
    counts: tuple[int, ...] = ()  # per row: blocks fetched from the host tier for this step's attention (fill aside)
    max_lo: int = 0  # max(lo)


@functools.lru_cache(maxsize=4)
def reach(pos: tuple[int, ...], bt: int, ring_blocks: int, topk: int):
    """What the rows at `pos` fetch, the same for every layer of a step: computed once per step."""
    frontier = tuple(p // bt for p in pos)
    lo = tuple(max(0, f - ring_blocks + 1) for f in frontier)
    exact = topk == 0 or topk >= max(frontier) + 1
    return exact, lo, frontier, lo if exact else tuple(min(topk, x) for x in lo), max(lo, default=0)


def make_plan(layer: int, parity: int, pos: tuple[int, ...], bt: int, ring_blocks: int, written: int, first: bool,
              topk: int, recent: int) -> FetchPlan:
    exact, lo, frontier, counts, max_lo = reach(tuple(pos), bt, ring_blocks, topk)
    fill = [(b, j) for b, f in enumerate(frontier) for j in range(lo[b], min(f + 1, written))] if first else []
    return FetchPlan(layer, parity, exact, lo, frontier, fill, topk, recent, counts, max_lo)


@dataclass
class Candidates:
    """Where a layer's device-chosen candidate ids (B, k) are: `ids` on the device, written before
    `event` fired; for a host gather also `host`, a pinned copy that has landed once `host_event` fired."""

    ids: torch.Tensor
    event: Any
    host: torch.Tensor | None = None
    host_event: Any = None


@dataclass
class FetchCount:
    """Blocks the decode steps fetched from the host tier for attention, on the compute thread's count."""

    layer_steps: int = 0  # (layer, decode step) pairs
    row_layer_steps: int = 0  # (row, layer, decode step) triples
    blocks: int = 0

    def add(self, rows: int, blocks: int) -> None:
        self.layer_steps += 1
        self.row_layer_steps += rows
        self.blocks += blocks

    def reset(self) -> None:
        self.layer_steps = self.row_layer_steps = self.blocks = 0

    def per_step(self, layers: int, block_bytes: int) -> dict[str, float]:
        """Mean blocks per (row, layer) step, and KV bytes per decode step (every row and layer)."""
        if not self.layer_steps:
            return {"blocks_read_per_step": 0.0, "bytes_per_step": 0.0}
        return {"blocks_read_per_step": self.blocks / self.row_layer_steps,
                "bytes_per_step": self.blocks * block_bytes * layers / self.layer_steps}


def run_fetch(m: KVMover, cache: Any, plan: FetchPlan, stage_free: Any, cand: Candidates | None) -> Any:
    """The job: issue the copies of `plan` on the KV stream; returns the event after them."""
    t0 = span_start()
    done = _issue(m, cache, plan, stage_free, cand)
    span_end("kv.fetch", t0)
    return done


def _issue(m: KVMover, cache: Any, plan: FetchPlan, stage_free: Any, cand: Candidates | None) -> Any:
    m.sync.wait(stage_free, m.stream)  # the compute that read this stage parity last has run
    geo, bufs, store = cache.geo, cache.bufs, m.store
    device_gather = not plan.exact and plan.max_lo > 0 and store.device_view is not None
    if store.host_side and (plan.fill or not device_gather):
        m.wait_uploaded(plan.parity)  # the pinned buffers of this parity are free again
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
    if plan.max_lo == 0:  # nothing offloaded yet: the device chose no candidates
        return m.upload(pairs, p)
    counts = plan.counts
    if device_gather:
        m.sync.wait(cand.event, m.stream)  # the step that wrote the ids has run
        if pairs:
            m.upload(pairs, p)
        return m.pull(lambda: store.pull(L, cand.ids, stage, counts), sum(counts) * bb)
    wait_for(cand.host_event)  # the ids' copy to the host, issued a layer-step or more ago
    t0 = span_start()
    ids, k = cand.host, plan.topk  # (B, k)
    flat = torch.where(ids >= 0, torch.arange(geo.batch)[:, None] * geo.n_blocks + ids, -1).view(-1)
    src = store.gather(L, flat, p)  # (B * k, ext) pinned
    span_end("kv.candidates", t0)
    if all(c == k for c in counts):
        pairs.append((stage.view(-1)[:src.numel()], src.view(-1)))
    else:
        pairs += [(stage[b, :c].view(-1), src[b * k:b * k + c].view(-1)) for b, c in enumerate(counts) if c]
    return m.upload(pairs, p)

