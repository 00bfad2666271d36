"""Page-locked host buffers of exact size.

torch's pinned allocator rounds every request up to a power of two, which would waste up to half of
a 24 GB CPU tier; here an aligned pageable buffer is registered with `cudaHostRegister` instead, so
pinned bytes equal requested bytes and every buffer is 4 KiB-aligned for O_DIRECT.

Registering faults in and locks a buffer's pages one by one under the CUDA driver's global lock
(torch's own register path pre-faults pages on several threads for that reason), so a large buffer
can be allocated pageable (`empty(n, pin=False)`), filled first, and registered afterwards in pieces
(`pin(view)`): the pages are then already present. `close()` unregisters every registered range.
Filling fresh memory costs a page fault (and a zeroed page) per 4 KiB; `huge_pages` asks the kernel
for 2 MiB pages instead (`MADV_HUGEPAGE`; a no-op where transparent huge pages are off).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import threading
import time
from typing import Protocol

import torch

from worker.pack.blob import aligned_empty

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class Pinner(Protocol):
    """What page-locks host memory: CUDA's register calls, or a test's stand-in."""

    def register(self, ptr: int, nbytes: int) -> None: ...

    def unregister(self, ptr: int) -> None: ...


class CudaPinner:
    def register(self, ptr: int, nbytes: int) -> None:
        # flags 0 (cudaHostRegisterDefault): under unified addressing the range is mapped and portable, so
        # it counts as pinned for every device's context, also when a side thread (the fill's, the
        # resident load's) registers it while its current device is another one
        rc = int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0))  # releases the GIL while it runs
        if rc != 0:
            raise RuntimeError(f"cudaHostRegister of {nbytes / 1e9:.2f} GB failed with CUDA error {rc} "
                               "(locked-memory limit? see `ulimit -l`)")

    def unregister(self, ptr: int) -> None:
        torch.cuda.cudart().cudaHostUnregister(ptr)


class HostArena:
    """Owns the pinned buffers of one engine; `close()` unregisters them."""

    def __init__(self, pin: bool, pinner: Pinner | None = None):
        self.pinner = pinner if pinner is not None else (CudaPinner() if pin and torch.cuda.is_available() else None)
        self.pins = self.pinner is not None  # False on a CPU device: nothing to page-lock for
        self._buffers: list[torch.Tensor] = []
        self._registered: list[int] = []  # data pointers of registered ranges
        self._lock = threading.Lock()
        self.nbytes = 0

    def empty(self, nbytes: int, pin: bool = True, huge_pages: bool = False) -> torch.Tensor:
        """A (nbytes,) uint8 4 KiB-aligned buffer, registered now, or with `pin=False` left pageable
        for the caller to `pin` (in pieces) once it is filled."""
        buf = aligned_empty(nbytes)  # (nbytes,) uint8, 4 KiB-aligned
        if huge_pages and _libc.madvise(buf.data_ptr(), nbytes, mmap.MADV_HUGEPAGE) != 0:
            log.debug("madvise(MADV_HUGEPAGE) refused: errno %d", ctypes.get_errno())
        with self._lock:
            self._buffers.append(buf)
            self.nbytes += nbytes
        if pin:
            self.pin(buf)
        return buf

    def pin(self, view: torch.Tensor) -> float:
        """Register a range of one of this arena's buffers, or of a host buffer its owner keeps alive
        until this arena's `close()` (the streamer's embedding table: `host_table`), disjoint from
        ranges already registered; returns the seconds the call took. Thread-safe; a no-op where the
        arena does not pin."""
        if self.pinner is None:
            return 0.0
        t0 = time.perf_counter()
        self.pinner.register(view.data_ptr(), view.numel())
        with self._lock:
            self._registered.append(view.data_ptr())
        return time.perf_counter() - t0

    def close(self) -> None:
        with self._lock:
            registered, self._registered = self._registered, []
        for ptr in registered:  # before the buffers may be freed
            self.pinner.unregister(ptr)
        with self._lock:
            self._buffers.clear()
            self.nbytes = 0
