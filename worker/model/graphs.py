"""CUDA graphs for the all-resident decode step.

At batch 1 a decode step of an 8B model reads its ~16 GB of weights in a few milliseconds, while
launching its hundreds of kernels from Python takes longer than that: the GPU waits on the host
(measured: benchmarks/results/README.md). Capturing the step once
per KV-length bucket and replaying it removes the launch cost. Only all-resident weights qualify
(a streamed group arrives at a time the host decides, which a graph cannot express); tokens and
positions go through static buffers, and the cache attends over the bucket's fixed length with a
mask, so a replay computes exactly what the eager step computes on the same shapes.

A paged cache whose steady top-k steps move KV by device code alone (`PagedKVCache.use_graphs`: the
CPU tier mapped into the device) qualifies too, step by step rather than per bucket up front: a
step is replayed when the cache says it is steady (`graph_ready`, from host-known positions), and the
other steps (the first, exact ones, and any step of a span whose top-k step has not yet run eagerly:
a capture must not compile) run eagerly, so the warm-up round's second step is already a capture. Its graph is captured from a live step, not before the prefill: capturing does not run
the step but does run its host side (positions, counters), so the capture's replay is that step, and
a warm-up run before it would execute the step twice (the top-k candidates it writes would then be
the next step's).
"""

from __future__ import annotations

import logging

import torch

from worker.model.step import Step

log = logging.getLogger(__name__)


class GraphedDecode:
    def __init__(self, model, cache, batch: int, device: torch.device):
        self.model, self.cache, self.device = model, cache, device
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)  # (B, 1)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)  # (B, 1)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.paged = hasattr(cache, "graph_ready")
        if self.paged:
            cache.use_graphs()
        self.replays = 0

    def __call__(self, tokens: torch.Tensor, step: Step) -> torch.Tensor:
        """Decode logits (B, V) for `tokens` (B, 1) at `step` (positions (B, 1), bucketed kv_len)."""
        if self.paged:
            return self._paged(tokens, step)
        self.tokens.copy_(tokens)
        self.positions.copy_(step.positions)
        if step.kv_len not in self.graphs:
            self.graphs[step.kv_len] = self._capture(step.kv_len)
        graph, out = self.graphs[step.kv_len]
        graph.replay()
        self.replays += 1
        return out

    def prepare(self, spans: list[int]) -> None:
        """Capture graphs for these spans now (capturing runs one step: call before a prefill). A paged
        cache's graphs are captured from live steps instead (module docstring)."""
        if self.paged:
            return
        for n in spans:
            if n not in self.graphs:
                self.graphs[n] = self._capture(n)

    def _paged(self, tokens: torch.Tensor, step: Step) -> torch.Tensor:
        n = step.kv_len
        if not self.cache.graph_ready() or (n not in self.graphs and n not in self.cache.topk_spans):
            return self.model.forward(tokens, step, self.cache)[:, 0]
        self.tokens.copy_(tokens)
        self.positions.copy_(step.positions)
        if n in self.graphs:
            graph, out = self.graphs[n]
            self.cache.replayed(Step(self.positions, n))
        else:  # the capture runs the step's host side; its replay below is the step's device side
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = self._eager(n)
            self.graphs[n] = (graph, out)
            log.debug("captured paged decode graph for kv_len %d", n)
        graph.replay()
        self.replays += 1
        return out

    def _eager(self, kv_len: int) -> torch.Tensor:
        return self.model.forward(self.tokens, Step(self.positions, kv_len), self.cache)[:, 0]

    def _capture(self, kv_len: int):
        # warm up on a side stream (allocator and library handles), as torch.cuda.graphs requires
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._eager(kv_len)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._eager(kv_len)
        log.debug("captured decode graph for kv_len %d", kv_len)
        return graph, out
