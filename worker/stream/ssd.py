"""The SSD tier: O_DIRECT `preadv` of large extents on a pool of reader threads.

Requests are split into `chunk` bytes so many are in flight at once (threads × chunk); buffers are
4 KiB-aligned pinned memory so the kernel DMAs straight into memory the GPU copy engine can read.
Where O_DIRECT is refused (tmpfs, some network filesystems) reads fall back to buffered I/O and the
run records a warning, since its figures then include the page cache. A caller that wants the page
cache (the CPU tier's fill, for extents `cached_bytes` finds there) asks for a buffered read; those
run on a pool of their own, `cached_threads` wide (default: the CPUs this process may use, at most
32): a read from the page cache is a memory copy plus the destination's page faults, bound by the
cores doing it, not by the disk's queue, so the disk's thread count would leave most of them idle.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from worker.pack.blob import open_blob, read_extent
from worker.stream.iostats import Channel
from worker.stream.pagecache import cached_bytes, cached_chunks

log = logging.getLogger(__name__)


MAX_CACHED_THREADS = 32


def default_cached_threads() -> int:
    """Threads for page-cache reads: the CPUs this process may run on, at most MAX_CACHED_THREADS."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_CACHED_THREADS, cpus))


class SSDReader:
    def __init__(self, path: str, threads: int, chunk: int, cached_threads: int | None = None):
        self.path = str(path)
        self.fd = open_blob(path, direct=True)
        self.direct = bool(fcntl.fcntl(self.fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))
        self.buffered_fd = os.open(path, os.O_RDONLY) if self.direct else self.fd
        self.threads, self.chunk = threads, chunk
        self.cached_threads = cached_threads or max(threads, default_cached_threads())
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ssd-read")
        self._cached_pool: ThreadPoolExecutor | None = None  # made on the first page-cache read
        self._cached_started = False  # all of its threads started (start_cached_threads)
        self._pool_lock = threading.Lock()
        self.channel = Channel("ssd_read")
        self.warnings = [] if self.direct else [
            f"O_DIRECT refused for {self.path}: SSD reads are buffered and may come from the page cache"]

    def read(self, offset: int, nbytes: int, out: torch.Tensor, buffered: bool = False) -> Future:
        """Read [offset, offset+nbytes) into `out` (uint8, aligned) on one reader thread; `buffered`
        goes through the page cache instead of O_DIRECT, on the page-cache pool, in one system call
        (see read_extent's `call`)."""
        if buffered and self.direct:
            return self._cached().submit(self._read, offset, nbytes, out, self.buffered_fd, nbytes)
        return self.pool.submit(self._read, offset, nbytes, out, self.fd)

    def _cached(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._cached_pool is None:
                self._cached_pool = ThreadPoolExecutor(max_workers=self.cached_threads,
                                                       thread_name_prefix="cache-read")
            return self._cached_pool

    def start_cached_threads(self, timeout: float = 10.0) -> None:
        """Every thread of the page-cache pool running now, before a fill's reads are issued. A pool
        starts its threads one per submitted read, and started beside reads faulting in fresh pages
        they came up 3 ms apart: the first wave of a fill took a tenth of its time to get all threads
        reading (benchmarks/results/setup_h200/v7, R's in-flight profile; worker.stream.fill)."""
        if self._cached_started:  # a pool's threads live as long as it does; some may be reading now
            return
        n = self.cached_threads
        barrier = threading.Barrier(n + 1)  # each task holds its thread until all n are running
        pool = self._cached()
        futures = [pool.submit(barrier.wait, timeout) for _ in range(n)]
        try:
            barrier.wait(timeout)
            self._cached_started = True
        except threading.BrokenBarrierError:
            log.debug("page-cache pool: not all %d threads started within %.0f s", n, timeout)
        for f in futures:
            f.exception()  # a broken barrier is the log line's, not the fill's

    def cached_bytes(self, offset: int, nbytes: int) -> int:
        """Bytes of the extent that are in the page cache now."""
        return cached_bytes(self.buffered_fd, offset, nbytes)

    def cached_chunks(self, offset: int, nbytes: int) -> list[bool]:
        """For each `chunk` of the extent (as `read_split` cuts it): is all of it in the page cache?
        One cachestat per chunk (or one mapping and mincore for the extent: worker.stream.pagecache)."""
        return cached_chunks(self.buffered_fd, offset, nbytes, self.chunk)

    def read_split(self, offset: int, nbytes: int, out: torch.Tensor) -> list[Future]:
        """Read a large extent as parallel chunk requests; one future per chunk."""
        return [self.read(offset + o, min(self.chunk, nbytes - o), out[o:o + min(self.chunk, nbytes - o)])
                for o in range(0, nbytes, self.chunk)]

    def _read(self, offset: int, nbytes: int, out: torch.Tensor, fd: int, call: int | None = None) -> None:
        self.channel.begin()
        try:
            read_extent(fd, offset, nbytes, out, call)
        finally:
            self.channel.end(nbytes)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self._cached_pool is not None:
            self._cached_pool.shutdown(wait=True, cancel_futures=True)
        os.close(self.fd)
        if self.buffered_fd != self.fd:
            os.close(self.buffered_fd)
