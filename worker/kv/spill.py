"""The SSD tier of the KV cache (kv_offload=ssd): offloaded blocks live in a spill file, not in RAM.

Layout: one extent per (layer, row, block), padded to 4 KiB (O_DIRECT wants aligned offsets, sizes
and buffers), row-major, so a row's blocks [0, lo) of one layer are one contiguous extent read with
one preadv. Pinned memory holds only what is in flight: an inbox per fetch parity for reads and a
few outbox slots for write-back (a write-back waits for a free slot, on top of the throttle). A
fetch of a layer first waits for that layer's pending writes, so it never reads a stale block.
The file is the cache's own (not the weights blob), sized up front and removed on close.
"""

from __future__ import annotations

import logging
import os
import queue
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from worker.kv.layout import Geometry
from worker.kv.offload import wait_for
from worker.pack.blob import open_direct, pwrite_all, read_extent
from worker.stream.hostmem import HostArena
from worker.stream.iostats import Channel

log = logging.getLogger(__name__)

SLOT_BYTES = 64 << 20  # outbox slot size cap: large sequential writes
SLOTS = 8  # outbox slots: write-backs in flight to the SSD


def open_rw(path: Path) -> tuple[int, bool]:
    """Open (create) for O_DIRECT read/write; fall back to buffered I/O where refused (tmpfs)."""
    return open_direct(path, os.O_RDWR | os.O_CREAT)


class SpillStore:
    device_view = None  # the device cannot read a file: top-k gathers its candidates on the host (`kv.fetch`)
    host_side = True  # every fetch reads the file into pinned buffers: the KV worker thread issues them

    def __init__(self, geo: Geometry, path: Path, arena: HostArena, stage_blocks: int, window: int,
                 channel: Channel, threads: int = 4, slots: int = SLOTS):
        self.geo, self.path, self.channel = geo, Path(path), channel
        self.ext = geo.padded_block_bytes()
        self.size = geo.layers * geo.batch * geo.n_blocks * self.ext
        self.fd, self.direct = open_rw(self.path)
        os.ftruncate(self.fd, self.size)  # sparse: never-written blocks read as zeros
        self.warnings = [] if self.direct else [
            f"O_DIRECT refused for the KV spill file {self.path}: KV reads may come from the page cache"]
        b = geo.batch
        self.inbox = [arena.empty(b * stage_blocks * self.ext).view(b, stage_blocks, self.ext) for _ in range(2)]
        self.bounce = arena.empty(b * window * self.ext).view(b * window, self.ext)
        self.slot_blocks = max(1, min(geo.n_blocks, SLOT_BYTES // self.ext))
        self._free: queue.Queue = queue.Queue()
        self._slots: dict[int, torch.Tensor] = {}  # data_ptr → slot, while a write uses it
        for _ in range(slots):
            self._free.put(arena.empty(self.slot_blocks * self.ext))
        self._io = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kv-ssd")
        self._pending: list[list[Future]] = [[] for _ in range(geo.layers)]

    def offset(self, layer: int, b: int, j: int) -> int:
        return ((layer * self.geo.batch + b) * self.geo.n_blocks + j) * self.ext

    # ---- write-back --------------------------------------------------------------------------------

    def sink(self, layer: int, b: int, j0: int, n: int) -> list[tuple[int, int, torch.Tensor]]:
        out = []
        for jj in range(j0, j0 + n, self.slot_blocks):
            m = min(self.slot_blocks, j0 + n - jj)
            slot = self._free.get()  # blocks until a slot has been written out
            self._slots[slot.data_ptr()] = slot
            out.append((jj, m, slot[:m * self.ext]))
        return out

    def commit(self, layer: int, chunk, event) -> Future:
        """Write `chunk` (row, first block, blocks, pinned bytes) once `event` (its D2H) has fired."""
        b, jj, m, dst = chunk
        fut = self._io.submit(self._write, layer, b, jj, m, dst, event)
        self._pending[layer].append(fut)
        return fut

    def _write(self, layer: int, b: int, j: int, m: int, buf: torch.Tensor, event) -> None:
        try:
            event.synchronize()  # the D2H into the slot has landed
            self.channel.begin()
            try:
                pwrite_all(self.fd, memoryview(buf.numpy()), self.offset(layer, b, j))
            finally:
                self.channel.end(m * self.ext)
        finally:
            self._free.put(self._slots.pop(buf.data_ptr()))

    def _settle(self, layer: int) -> None:
        pending, self._pending[layer] = self._pending[layer], []
        wait_for(pending)

    # ---- reads -------------------------------------------------------------------------------------

    def _read(self, offset: int, out: torch.Tensor) -> None:
        self.channel.begin()
        try:
            read_extent(self.fd, offset, out.numel(), out)
        finally:
            self.channel.end(out.numel())

    def _read_all(self, jobs: list[tuple[int, torch.Tensor]]) -> None:
        wait_for([self._io.submit(self._read, off, out) for off, out in jobs])

    def prefix(self, layer: int, rows: list[tuple[int, int]], parity: int) -> list[torch.Tensor]:
        self._settle(layer)
        outs = [self.inbox[parity][b, :lo].view(-1) for b, lo in rows]
        self._read_all([(self.offset(layer, b, 0), out) for (b, _), out in zip(rows, outs)])
        return outs

    def blocks(self, layer: int, items: list[tuple[int, int]]) -> list[torch.Tensor]:
        self._settle(layer)
        outs = [self.bounce[i] for i in range(len(items))]
        self._read_all([(self.offset(layer, b, j), out) for (b, j), out in zip(items, outs)])
        return outs

    def gather(self, layer: int, flat: torch.Tensor, parity: int) -> torch.Tensor:
        """Blocks at flat indices b * J + j (N,), -1 = skip → pinned (N, ext)."""
        self._settle(layer)
        out = self.inbox[parity].view(-1, self.ext)[:flat.numel()]
        jobs = []
        for i, f in enumerate(flat.tolist()):
            if f >= 0:
                b, j = divmod(f, self.geo.n_blocks)
                jobs.append((self.offset(layer, b, j), out[i]))
        self._read_all(jobs)
        return out

    def close(self) -> None:
        for layer in range(self.geo.layers):
            try:
                self._settle(layer)
            except BaseException:  # closing after a failure: the file goes anyway
                log.debug("kv spill: pending write failed during close", exc_info=True)
        self._io.shutdown(wait=True)
        os.close(self.fd)
        self.path.unlink(missing_ok=True)


def check_spill_dir(path: Path | None, nbytes: int) -> str | None:
    """Why `path` cannot hold a spill file of `nbytes` (None when it can)."""
    import shutil

    if path is None:
        return "no spill directory was given"
    if not path.is_dir():
        return f"{path} is not a directory"
    if not os.access(path, os.W_OK):
        return f"{path} is not writable"
    free = shutil.disk_usage(path).free
    if free < nbytes:
        return f"{path} has {free / 1e9:.2f} GB free, the KV spill file needs {nbytes / 1e9:.2f} GB"
    return None
