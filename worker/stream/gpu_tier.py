"""The GPU tier: a fixed pool of preallocated group slots, one pool per group kind.

A slot is reused only after the compute that read it has finished: `release` records an event on
the compute stream and the next copy into the slot waits for it on the copy stream, so neither side
blocks the host. With `evict_finished` off, a released slot keeps its group and a later request for
the same group is served without a copy (useful when every streamed group fits in the slots).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from worker.pack.groups import GroupKey


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
