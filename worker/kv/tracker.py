"""The global block tracker: per (batch row, layer, block) attention scores and selection hits.

As in the seed, it is created before the model is built (`init_global_tracker`), so every part of
the engine can find it; unlike the seed it is sized from the model's config (its layer count, not a
hard-coded 80) and the run's max_seq / kv_block_tokens. Its tensors live on the compute device and
are only written by device ops (no host sync): a cache takes each layer's slices (`rows`) once and
the compiled decode step writes them (`record_scores`, `record_hits`). They are allocated when a top-k
cache is made, since a tracker for a long context and a large batch is not small. `snapshot()` reads
them back.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

Track = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # one layer's (scores, hits, steps) slices


class BlockTracker:
    def __init__(self, max_batch: int, layers: int, n_blocks: int):
        self.max_batch, self.layers, self.n_blocks = max_batch, layers, n_blocks
        self.scores: torch.Tensor | None = None  # (max_batch, layers, n_blocks) float32, latest score
        self.hits: torch.Tensor | None = None  # (max_batch, layers, n_blocks) int32, times selected
        self.steps: torch.Tensor | None = None  # (layers,) int64, decode steps scored per layer

    def ensure(self, batch: int, n_blocks: int, device: torch.device) -> None:
        """Allocate (or grow, keeping nothing) to hold `batch` rows of `n_blocks` blocks on `device`."""
        fits = (self.scores is not None and self.scores.device == device and batch <= self.scores.shape[0]
                and n_blocks <= self.scores.shape[2])
        if fits:
            return
        if batch > self.max_batch or n_blocks > self.n_blocks:
            log.info("tracker: growing from %d rows x %d blocks to %d x %d", self.max_batch, self.n_blocks,
                     max(batch, self.max_batch), max(n_blocks, self.n_blocks))
        self.max_batch, self.n_blocks = max(batch, self.max_batch), max(n_blocks, self.n_blocks)
        shape = (self.max_batch, self.layers, self.n_blocks)
        self.scores = torch.full(shape, float("-inf"), device=device)
        self.hits = torch.zeros(shape, dtype=torch.int32, device=device)
        self.steps = torch.zeros(self.layers, dtype=torch.int64, device=device)

    def reset(self) -> None:
        """Forget what an earlier generation recorded (a new cache starts counting afresh)."""
        if self.scores is not None:
            self.scores.fill_(float("-inf"))
            self.hits.zero_()
            self.steps.zero_()

    def rows(self, layer: int, batch: int) -> Track:
        """The layer's slices for `batch` rows: scores (B, N), hits (B, N), steps (1,) (views: writes go through)."""
        return self.scores[:batch, layer], self.hits[:batch, layer], self.steps[layer:layer + 1]

    def snapshot(self) -> dict[str, Any]:
        """Host copies (a device sync: call outside the hot path)."""
        if self.scores is None:
            return {"layers": self.layers, "hits": None, "scores": None, "steps": None}
        return {"layers": self.layers, "hits": self.hits.cpu(), "scores": self.scores.cpu(), "steps": self.steps.cpu()}


def record_scores(track: Track, scores: torch.Tensor) -> None:
    """scores (B, n): this decode step's score of each block (-inf: holds no keys yet)."""
    track[0][:, :scores.shape[1]] = scores
    track[2].add_(1)


def record_hits(track: Track, sel: torch.Tensor, valid: torch.Tensor) -> None:
    """sel (B, k) block ids top-k attended over, valid (B, k)."""
    track[1].scatter_add_(1, sel, valid.to(torch.int32))


_GLOBAL: BlockTracker | None = None


def init_global_tracker(max_batch: int, layers: int, n_blocks: int) -> BlockTracker:
    """Create the process-wide tracker (the seed's `init_global_tracker`), replacing any earlier one."""
    global _GLOBAL
    _GLOBAL = BlockTracker(max_batch, layers, n_blocks)
    log.debug("tracker: %d rows x %d layers x %d blocks", max_batch, layers, n_blocks)
    return _GLOBAL


def get_global_tracker() -> BlockTracker | None:
    return _GLOBAL
