"""Moving KV blocks between the GPU and a host tier on a side stream (the KV stream).

Every copy of the KV stream is issued in the order the compute thread submits jobs: write-back of
finished blocks (D2H, after an event the compute stream recorded) and prefetch of a layer's blocks
(H2D, then an event the compute stream waits on). FIFO order on one stream is what makes a block's
write-back land before any later fetch of it. The compute thread never waits on the device.

Who issues the jobs depends on the store:
- inline (the CPU tier, unless top-k gathers its candidates on the host): a job is only device work
  (copies, a gather kernel that reads the mapped store, event waits), so the compute thread issues it
  itself, on the KV stream, when it submits it. No thread handoff per layer: a worker thread would
  cost a future, a wakeup and GIL handoffs between the two threads on every layer-step, the very
  host time a decode step over an offloaded cache is bound by.
- on a worker thread (the SSD tier, a host gather): the job has host work that may wait for the
  device (before the host reads or overwrites pinned memory a copy may still use, only for work
  issued a layer-step or more earlier) or for the disk; the compute thread waits until the worker
  has *issued* the job (a host future) and then makes its stream wait on the job's event.

Write-backs are throttled as in the seed: at most `kv_throttle_threshold` write jobs in flight
(WSM_KV_THROTTLE_THRESHOLD); a new one backs off `kv_throttle_ms` at a time (WSM_KV_THROTTLE_MS)
until an earlier one has finished.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch

from worker.kv import zerocopy
from worker.kv.layout import Geometry, typed
from worker.stream.devsync import Sync
from worker.stream.hostmem import HostArena
from worker.stream.iostats import Channel

log = logging.getLogger(__name__)


def is_done(handle: Any) -> bool:
    """Events (query), futures (done) and lists of either."""
    if handle is None:
        return True
    if isinstance(handle, (list, tuple)):
        return all(is_done(h) for h in handle)
    if isinstance(handle, Future):
        return handle.done() and is_done(handle.result())
    return handle.query()


class Throttle:
    """At most `threshold` writes in flight; beyond that, back off `backoff_ms` at a time."""

    def __init__(self, threshold: int, backoff_ms: int, sleep: Callable[[float], None] = time.sleep):
        self.threshold, self.backoff_s, self._sleep = threshold, backoff_ms / 1e3, sleep
        self._pending: collections.deque = collections.deque()
        self.backoffs = 0
        self.waited_s = 0.0

    def admit(self) -> None:
        while True:
            self._pending = collections.deque(h for h in self._pending if not is_done(h))
            if len(self._pending) < self.threshold:
                return
            t0 = time.perf_counter()
            if self.backoff_s > 0:
                self._sleep(self.backoff_s)
            else:
                wait_for(self._pending[0])
            self.backoffs += 1
            self.waited_s += time.perf_counter() - t0

    def add(self, handle: Any) -> None:
        self._pending.append(handle)

    def drain(self) -> None:
        while self._pending:
            wait_for(self._pending.popleft())


def wait_for(handle: Any) -> None:
    if handle is None:
        return
    if isinstance(handle, (list, tuple)):
        for h in handle:
            wait_for(h)
    elif isinstance(handle, Future):
        wait_for(handle.result())
    else:
        handle.synchronize()


class CpuStore:
    """The CPU tier: every block of every (layer, row) in pinned memory, (L, B, J, block_bytes) bytes.

    Zeroed once, so a block that was never written reads as zeros (finite: attention masks it). With
    top-k the device reads the chosen blocks itself through `device_view` (`kv.zerocopy`; None when
    the device cannot map it: then `gather` copies them on the host). The host never rewrites the
    store's memory (device copies do), so only a host gather's fetch has host work (`host_side`)."""

    def __init__(self, geo: Geometry, arena: HostArena, topk: int, device: torch.device, zero_copy: bool = True):
        self.geo, self.ext = geo, geo.block_bytes
        flat = arena.empty(geo.layers * geo.batch * geo.n_blocks * self.ext)
        flat.zero_()
        self.buf = flat.view(geo.layers, geo.batch, geo.n_blocks, self.ext)
        self.device_view = zerocopy.device_view(flat, device) if topk and zero_copy else None
        self.warnings = ([] if self.device_view is not None or not (topk and zero_copy) else
                         ["kv zero-copy: the device cannot read the pinned CPU tier; top-k gathers on the host"])
        self.host_side = bool(topk) and self.device_view is None  # fetches gather on the host (`gather`)
        self.gather_buf: list[torch.Tensor] = []
        if self.device_view is not None:
            self._wide = zerocopy.wide_dtype(self.ext)
            # per layer (B * J, ext / w): one row per block, read as wide integers
            self._src = list(self.device_view.view(geo.layers, geo.batch * geo.n_blocks, self.ext).view(self._wide))
            # (B, 1) row offsets into the store's (B * J) blocks; None at batch 1 (no add kernel per layer-step)
            self._base = torch.arange(geo.batch, device=device)[:, None] * geo.n_blocks if geo.batch > 1 else None
            # per layer (B, J, 2, KV, bt, hd): where a graphed cache's device code writes each token
            self.token_views = [typed(t, geo) for t in self.device_view.view(geo.layers, geo.batch, geo.n_blocks, self.ext)]
        elif topk:  # host-side gathers for top-k land here, one per fetch parity: (B * k, ext)
            self.gather_buf = [arena.empty(geo.batch * topk * self.ext).view(-1, self.ext) for _ in range(2)]
        self._written: list[Any] = [None] * geo.layers  # last D2H into each layer (host gathers wait on it)
        self.nbytes = arena.nbytes

    def sink(self, layer: int, b: int, j0: int, n: int) -> list[tuple[int, int, torch.Tensor]]:
        return [(j0, n, self.buf[layer, b, j0:j0 + n].view(-1))]

    def commit(self, layer: int, chunk, event) -> Any:
        self._written[layer] = event
        return event

    def prefix(self, layer: int, rows: list[tuple[int, int]], parity: int) -> list[torch.Tensor]:
        return [self.buf[layer, b, :lo].view(-1) for b, lo in rows]

    def blocks(self, layer: int, items: list[tuple[int, int]]) -> list[torch.Tensor]:
        return [self.buf[layer, b, j] for b, j in items]

    def pull(self, layer: int, ids: torch.Tensor, out: torch.Tensor, counts: list[int]) -> None:
        """out (B, k, ext) on the device ← the blocks `ids` (B, k) name (best first, -1 none), the first
        counts[b] of row b: a gather kernel on the current stream that reads the store across PCIe.

        Write-backs into the layer ran earlier on the same (KV) stream, so it reads what they wrote."""
        b, k = ids.shape
        dst = out.view(b, out.shape[1], -1).view(self._wide)  # (B, k, ext / w)
        if all(c == k for c in counts):  # the usual case: one kernel for every row
            flat = ids if self._base is None else ids + self._base
            torch.index_select(self._src[layer], 0, flat.view(-1), out=dst.view(b * k, -1))
            return
        for row, c in enumerate(counts):  # rows with fewer offloaded blocks than k read only theirs
            if c:
                at = ids[row, :c] if self._base is None else ids[row, :c] + self._base[row]
                torch.index_select(self._src[layer], 0, at, out=dst[row, :c])

    def gather(self, layer: int, flat: torch.Tensor, parity: int) -> torch.Tensor:
        """Blocks at flat indices b * J + j (N,), -1 = none (block 0 is read) → pinned (N, ext).

        The host copies here, so it first waits for the last write-back into the layer."""
        wait_for(self._written[layer])
        out = self.gather_buf[parity][:flat.numel()]
        torch.index_select(self.buf[layer].view(-1, self.ext), 0, flat.clamp(min=0), out=out)
        return out

    def close(self) -> None:
        pass


class _Timer:
    """Bytes and busy time of one batch of copies on the KV stream (CUDA events, or the host clock).

    Inside a CUDA graph capture nothing can be timed (an event recorded there is a dependency, not a
    clock): the bytes count as untimed."""

    def __init__(self, sync: Sync, stream, channel: Channel):
        self.sync, self.stream, self.channel = sync, stream, channel
        self.captured = sync.cuda and torch.cuda.is_current_stream_capturing()
        if self.captured:
            return
        if sync.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record(stream)
        else:
            channel.begin()

    def stop(self, nbytes: int):
        if self.captured:
            self.channel.add_untimed(nbytes)
            return self.sync.record(self.stream)
        if not self.sync.cuda:
            self.channel.end(nbytes)
            return self.sync.event()
        end = torch.cuda.Event(enable_timing=True)
        end.record(self.stream)
        if nbytes:
            self.channel.add_device(nbytes, self.start, end)
        return end


class KVMover:
    """The KV stream and who issues its jobs (inline or a worker thread); see the module docstring."""

    def __init__(self, store, geo: Geometry, sync: Sync, throttle: Throttle, h2d: Channel, d2h: Channel):
        self.store, self.geo, self.sync, self.throttle = store, geo, sync, throttle
        self.h2d, self.d2h = h2d, d2h
        self.stream = sync.stream()
        self.inline = not getattr(store, "host_side", True)  # the store's jobs are device work only
        # the mover thread's device, fixed here: a bare "cuda" device means this thread's current one
        index = torch.device(sync.device).index if sync.cuda else None
        self._cuda_index = (torch.cuda.current_device() if index is None else index) if sync.cuda else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-mover", initializer=self._init_thread)
        self._jobs: dict[int, Future] = {}
        self._uploaded: list[Any] = [None, None]  # last upload from each parity's host buffers
        self._lock = threading.Lock()

    def _init_thread(self) -> None:
        if self._cuda_index is not None:
            torch.cuda.set_device(self._cuda_index)

    # ---- compute thread ----------------------------------------------------------------------------

    def fetch(self, layer: int, job: Callable[[KVMover], Any]) -> None:
        """Queue `job` (which issues this layer's H2D copies and returns their event); inline, run it now."""
        assert layer not in self._jobs, f"layer {layer} fetched twice"
        self._jobs[layer] = self._submit(job)

    def drop_fetches(self) -> None:
        """Forget queued fetches (a new generation starts); waits until they were issued."""
        for layer in list(self._jobs):
            wait_for(self._jobs.pop(layer))

    def ready(self, layer: int) -> None:
        """Make the compute stream wait for `layer`'s fetch (the host only waits for it to be issued)."""
        job = self._jobs.pop(layer)
        self.sync.wait(job if self.inline else job.result())

    def write(self, layer: int, items: list[tuple[int, int, torch.Tensor]], after) -> None:
        """Write back blocks: items (row, first block, GPU bytes (n, block_bytes)) once `after` fired."""
        self.throttle.admit()
        self.throttle.add(self._submit(lambda m: m._write(layer, items, after)))

    def drain(self) -> None:
        """Wait for every queued job (and the device work it issued)."""
        for layer in list(self._jobs):
            wait_for(self._jobs.pop(layer))
        self.throttle.drain()
        wait_for(self._submit(lambda m: m.sync.record(m.stream)))

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self._pool.shutdown(wait=True)

    def _submit(self, job: Callable[[KVMover], Any]) -> Any:
        """Inline: run `job` now → what it returns; else queue it on the worker → a future of that."""
        return self._run(job) if self.inline else self._pool.submit(self._run, job)

    # ---- the job side (the worker thread, or the compute thread inline) -----------------------------

    def _run(self, job: Callable[[KVMover], Any]) -> Any:
        if torch.is_inference_mode_enabled():  # inline, inside the forward: entering it again costs host time
            with self.sync.use(self.stream):
                return job(self)
        with torch.inference_mode(), self.sync.use(self.stream):
            return job(self)

    def _write(self, layer: int, items, after) -> Any:
        self.sync.wait(after, self.stream)
        bb, ext = self.geo.block_bytes, self.store.ext
        timer, nbytes, handles = _Timer(self.sync, self.stream, self.d2h), 0, []
        for b, j0, src in items:
            for jj, m, dst in self.store.sink(layer, b, j0, src.shape[0]):  # may wait for a free host buffer
                part = src[jj - j0:jj - j0 + m]  # (m, bb)
                if ext == bb:
                    dst.copy_(part.reshape(-1), non_blocking=True)
                else:
                    for i in range(m):
                        dst[i * ext:i * ext + bb].copy_(part[i], non_blocking=True)
                nbytes += m * bb
                # each chunk is handed on as soon as its copy is queued, so its buffer can come back
                handles.append(self.store.commit(layer, (b, jj, m, dst), self.sync.record(self.stream)))
            if self.sync.cuda:
                src.record_stream(self.stream)  # the compute side may free it before the copy ran
        timer.stop(nbytes)
        return handles

    def wait_uploaded(self, parity: int) -> None:
        """Before the host rewrites a parity's pinned buffers: the last upload from them has finished."""
        wait_for(self._uploaded[parity])

    def pull(self, gather: Callable[[], None], nbytes: int):
        """Run `gather` (kernels that read `nbytes` of KV blocks from the host tier themselves) on the KV
        stream, timed as H2D bytes; returns the event after it."""
        timer = _Timer(self.sync, self.stream, self.h2d)
        gather()
        return timer.stop(nbytes)

    def upload(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], parity: int | None = None, untimed=()):
        """H2D copies (device dst, pinned src) on the KV stream, then `untimed` ones (bookkeeping, not
        KV bytes); returns the event after them all."""
        timer = _Timer(self.sync, self.stream, self.h2d)
        nbytes = 0
        for dst, src in pairs:
            dst.copy_(src, non_blocking=True)
            nbytes += src.numel() * src.element_size()
        done = timer.stop(nbytes)
        if untimed:
            for dst, src in untimed:
                dst.copy_(src, non_blocking=True)
            done = self.sync.record(self.stream)
        if parity is not None:
            self._uploaded[parity] = done
        return done
