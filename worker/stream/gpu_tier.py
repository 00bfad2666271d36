"""The GPU tier: a fixed pool of preallocated group slots, one pool per group kind.

A slot is reused only after the compute that read it has finished: `release` records an event on
the compute stream and the next copy into the slot waits for it on the copy stream, so neither side
blocks the host. With `evict_finished` off, a released slot keeps its group and a later request for
the same group is served without a copy (useful when every streamed group fits in the slots).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from worker.config import StreamConfig
from worker.errors import UserError
from worker.pack.groups import KINDS, GroupKey

log = logging.getLogger(__name__)


@dataclass
class Slot:
    kind: str
    buf: torch.Tensor  # (capacity,) uint8 on the compute device
    tag: GroupKey | None = None
    free_event: Any = None  # recorded on the compute stream when the last reader finished
    ready_event: Any = None  # recorded on the copy stream after the group landed
    views: dict[str, torch.Tensor] = field(default_factory=dict)


class SlotPool:
    def __init__(self, capacity: dict[str, int], counts: dict[str, int], device: torch.device,
                 evict_finished: bool):
        self.evict_finished = evict_finished
        self._capacity = capacity
        self._free = {k: [Slot(k, torch.empty(capacity[k], dtype=torch.uint8, device=device))
                          for _ in range(counts[k])] for k in counts}
        self.nbytes = sum(capacity[k] * counts[k] for k in counts)
        self._cond = threading.Condition()
        self._closed = False

    def acquire(self, key: GroupKey) -> tuple[Slot, bool]:
        """A free slot for `key` (blocking until one is released) and whether it already holds it."""
        with self._cond:
            while not self._free[key.kind]:
                if self._closed:
                    raise RuntimeError("slot pool closed")
                self._cond.wait(timeout=0.5)
            free = self._free[key.kind]
            for i, slot in enumerate(free):
                if slot.tag == key:
                    return free.pop(i), True
            slot = free.pop(0)  # least recently released
            slot.tag = key
            return slot, False

    def release(self, slot: Slot, free_event: Any) -> None:
        with self._cond:
            slot.free_event = free_event
            if self.evict_finished:
                slot.tag = None
            self._free[slot.kind].append(slot)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def slot_counts(capacity: dict[str, int], cfg: StreamConfig, used_bytes: int) -> dict[str, int]:
    """GPU slots per group kind: gpu_max_groups split between the kinds, fewer where the memory limit
    leaves less room.

    The bigger kind (ffn) gets the odd slot and whatever room is left after whole attn+ffn pairs: with
    one ffn slot the next ffn copy waits for this layer's MLP, hidden only while the attn copy in
    between lasts longer than the MLP. In a 70B 2048-token prefill it does, and 1+1 and 1+2 slots
    attain alike (measured: benchmarks/results/README.md); longer prompts or batches make the MLP
    outlast it."""
    kinds = sorted((k for k in KINDS if capacity.get(k)), key=lambda k: -capacity[k])
    counts = {k: 0 for k in KINDS}
    if not kinds:
        return counts
    total = max(len(kinds), cfg.gpu_max_groups)
    want = {k: total // len(kinds) + (i < total % len(kinds)) for i, k in enumerate(kinds)}
    if cfg.gpu_memory_limit_gb is None:
        return {**counts, **want}
    pair = sum(capacity[k] for k in kinds)
    room = cfg.gpu_memory_limit_gb * 1e9 - used_bytes
    fit = int(room // pair)
    if fit < 1:
        raise UserError(f"gpu_memory_limit_gb={cfg.gpu_memory_limit_gb} leaves {max(room, 0) / 1e9:.2f} GB after "
                        f"resident weights, KV cache and activations ({used_bytes / 1e9:.2f} GB): less than one "
                        f"attn+ffn group pair ({pair / 1e9:.2f} GB); raise the limit or lower --gpu-cached-layers")
    got = {k: min(fit, want[k]) for k in kinds}
    left = room - sum(got[k] * capacity[k] for k in kinds)
    for k in kinds:  # biggest first
        while got[k] < want[k] and left >= capacity[k]:
            got[k] += 1
            left -= capacity[k]
    if got != want:
        log.warning("gpu_memory_limit_gb=%s fits %s GPU slots, not the %s of gpu_max_groups=%d",
                    cfg.gpu_memory_limit_gb, slots_text(got), slots_text(want), cfg.gpu_max_groups)
    return {**counts, **got}


def slots_text(counts: dict[str, int]) -> str:
    return " + ".join(f"{n} {k}" for k, n in counts.items() if n)


def fillable(order: list[GroupKey], counts: dict[str, int]) -> int:
    """How many groups of `order` the fetch thread can put in slots before the compute frees one."""
    free = dict(counts)
    for n, key in enumerate(order):
        if free.get(key.kind, 0) == 0:
            return n
        free[key.kind] -= 1
    return len(order)
