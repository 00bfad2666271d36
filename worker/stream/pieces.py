"""What the GPU tier copies: a group arrives as one or more host pieces.

A piece is a pinned host view, where it lands in the slot, a future that completes when the bytes
are in host memory (None when they already are), and a callback told the copy's event so the host
buffer can be reused once the copy has finished.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class Piece:
    host: torch.Tensor  # (nbytes,) uint8, pinned
    offset: int  # where in the slot
    ready: Future | list[Future] | None = None
    on_copied: Callable[[Any], None] | None = None

    def wait_ready(self) -> None:
        if self.ready is None:
            return
        for f in self.ready if isinstance(self.ready, list) else [self.ready]:
            f.result()
