"""The SSD tier: O_DIRECT `preadv` of large extents on a pool of reader threads.

Requests are split into `chunk` bytes so many are in flight at once (threads × chunk); buffers are
4 KiB-aligned pinned memory so the kernel DMAs straight into memory the GPU copy engine can read.
Where O_DIRECT is refused (tmpfs, some network filesystems) reads fall back to buffered I/O and the
run records a warning, since its figures then include the page cache. A caller that wants the page
cache (the CPU tier's fill, for extents `cached_bytes` finds there) asks for a buffered read.
"""

from __future__ import annotations

import fcntl
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from worker.pack.blob import open_blob, read_extent
from worker.stream.iostats import Channel
from worker.stream.pagecache import cached_bytes

log = logging.getLogger(__name__)


class SSDReader:
    def __init__(self, path: str, threads: int, chunk: int):
        self.path = str(path)
        self.fd = open_blob(path, direct=True)
        self.direct = bool(fcntl.fcntl(self.fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))
        self.buffered_fd = os.open(path, os.O_RDONLY) if self.direct else self.fd
        self.threads, self.chunk = threads, chunk
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ssd-read")
        self.channel = Channel("ssd_read")
        self.warnings = [] if self.direct else [
            f"O_DIRECT refused for {self.path}: SSD reads are buffered and may come from the page cache"]

    def read(self, offset: int, nbytes: int, out: torch.Tensor, buffered: bool = False) -> Future:
        """Read [offset, offset+nbytes) into `out` (uint8, aligned) on one reader thread; `buffered`
        goes through the page cache instead of O_DIRECT."""
        return self.pool.submit(self._read, offset, nbytes, out, self.buffered_fd if buffered else self.fd)

    def cached_bytes(self, offset: int, nbytes: int) -> int:
        """Bytes of the extent that are in the page cache now."""
        return cached_bytes(self.buffered_fd, offset, nbytes)

    def read_split(self, offset: int, nbytes: int, out: torch.Tensor) -> list[Future]:
        """Read a large extent as parallel chunk requests; one future per chunk."""
        return [self.read(offset + o, min(self.chunk, nbytes - o), out[o:o + min(self.chunk, nbytes - o)])
                for o in range(0, nbytes, self.chunk)]

    def _read(self, offset: int, nbytes: int, out: torch.Tensor, fd: int) -> None:
        self.channel.begin()
        try:
            read_extent(fd, offset, nbytes, out)
        finally:
            self.channel.end(nbytes)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        os.close(self.fd)
        if self.buffered_fd != self.fd:
            os.close(self.buffered_fd)
