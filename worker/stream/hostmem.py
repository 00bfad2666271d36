"""Page-locked host buffers of exact size.

torch's pinned allocator rounds every request up to a power of two, which would waste up to half of
a 24 GB CPU tier; here an aligned pageable buffer is registered with `cudaHostRegister` instead, so
pinned bytes equal requested bytes and every buffer is 4 KiB-aligned for O_DIRECT.
"""

from __future__ import annotations

import logging

import torch

from worker.pack.blob import aligned_empty

log = logging.getLogger(__name__)


class HostArena:
    """Owns the pinned buffers of one engine; `close()` unregisters them."""

    def __init__(self, pin: bool):
        self.pin = pin and torch.cuda.is_available()
        self._buffers: list[torch.Tensor] = []
        self.nbytes = 0

    def empty(self, nbytes: int) -> torch.Tensor:
        buf = aligned_empty(nbytes)  # (nbytes,) uint8, 4 KiB-aligned
        if self.pin:
            rc = int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0))
            if rc != 0:
                raise RuntimeError(f"cudaHostRegister of {nbytes / 1e9:.2f} GB failed with CUDA error {rc} "
                                   "(locked-memory limit? see `ulimit -l`)")
        self._buffers.append(buf)
        self.nbytes += nbytes
        return buf

    def close(self) -> None:
        if self.pin:
            for buf in self._buffers:
                torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
        self._buffers.clear()
        self.nbytes = 0
