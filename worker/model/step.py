"""What one forward takes besides its tokens: where they sit (`Step`), and the two parts the model
does not own, the weights and the KV cache, as protocols.

The model reads weights group by group from a `WeightSource` (all-resident or a streamer, see
`worker.stream`) and attends through a `KVCacheLike` (see `worker.kv`), so either side can change
without touching the forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

Group = dict[str, torch.Tensor]


@dataclass
class Step:
    """Where one forward's tokens sit in their sequences.

    positions: (B, T) on the compute device. A prefill (T > 1) starts every row at position 0 (rows are
    right-padded); a decode step (T == 1) has each row at its own position. kv_len (host int) is the
    number of cache positions the step's attention must cover: max position + 1, known on the host so
    no device sync is needed.

    lens (optional, prefill only): each row's real prompt length on the host. A paged cache with a
    host tier plans block moves from host-known positions; given lens it never reads positions back,
    otherwise it reads them once, at the first decode step.
    """

    positions: torch.Tensor
    kv_len: int
    lens: tuple[int, ...] | None = None

    @property
    def is_prefill(self) -> bool:
        return self.positions.shape[1] > 1


class WeightSource(Protocol):
    def resident(self) -> Group: ...
    def wait(self, layer: int, kind: str) -> Group: ...
    def release(self, layer: int, kind: str) -> None: ...


class KVCacheLike(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step) -> torch.Tensor: ...
