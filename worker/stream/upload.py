"""The groups that live on the device for the whole run, read on the SSD tier's reader and copied as they land.

The resident group (embeddings, final norm, lm_head: 4.2 GB at 70B, 29% of a 6-layer pack) and any
GPU-cached layers used to be read one group at a time on the build thread (`Pack.read_raw`: one
O_DIRECT request of 64 MiB in flight, its pages faulted in by the same thread between requests),
then copied to the device whole, with the disk idle during the copies. Here the extents' reads go
on the reader (threads × chunk in flight; buffered where the page cache holds them; groups issued
while at most `WINDOW_BYTES` of them wait in host memory), and one thread copies each request's
bytes to the device as soon as that request is done, so the copies run behind the reads instead of
after them. The streamer issues the load right after the CPU tier's
fill (the fill keeps the disk to itself, so its rate stays its own) and before its other host
buffers are set up; `result()` waits for all of it, which the engine asks for only after building the
model (`build_engine`: the compiler's import, seconds), so the load runs behind that too.

For the streamer an untied embedding table stays in host memory (it is only gathered from), as
before; its buffer is the group's extent, so the host keeps the extent's other bytes too (2 GB of
lm_head at 70B). With `embed_zero_copy` the streamer's `map_table` then page-locks and maps it into
the device (`worker.stream.host_table`) on this load's thread. `gpu` mode (`ResidentWeights`) puts every group, embeddings included, on the
device. On a CPU device the groups are views of the host buffers, as before (nothing is copied).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, wait
from dataclasses import dataclass, field

import torch

from worker.pack.blob import VIEW_DTYPES, aligned_empty, group_views
from worker.pack.groups import KINDS, RESIDENT, GroupKey, fused
from worker.stream.ssd import SSDReader

log = logging.getLogger(__name__)

Group = dict[str, torch.Tensor]
WINDOW_BYTES = 4 << 30  # host bytes in flight: a few 70B groups, enough to keep the reader's queue full


@dataclass
class UploadStats:
    bytes: int = 0
    page_cache_bytes: int = 0
    read_s: float = 0.0  # from the first read issued to the last one done
    copy_s: float = 0.0  # device copies, summed (they overlap the reads)
    peak_host_bytes: int = 0  # most bytes of groups read or being read, not yet placed
    embed_map_s: float | None = None  # `map_host_table` on the embedding table kept on the host, if asked
    embed_mapped: bool | None = None  # whether that gave the device a view of it (False: gathered on the host)

    def to_dict(self) -> dict[str, float | int | bool | None]:
        return {"bytes": self.bytes, "page_cache_bytes": self.page_cache_bytes, "read_s": self.read_s,
                "copy_s": self.copy_s, "peak_host_bytes": self.peak_host_bytes, "embed_map_s": self.embed_map_s,
                "embed_mapped": self.embed_mapped}


@dataclass
class _Target:
    """A byte range of the extent that goes to the device, and its device buffer once allocated."""

    lo: int
    hi: int
    name: str | None = None  # the tensor, or None for the whole extent
    dst: torch.Tensor | None = None  # (hi - lo,) uint8 on the device


@dataclass
class _Pending:
    key: GroupKey
    buf: torch.Tensor | None  # (extent,) uint8, host
    reads: list[tuple[int, int, Future]] = field(default_factory=list)  # (lo, hi, its read)
    targets: list[_Target] = field(default_factory=list)


class Upload:
    """`keys`' extents read on `reader` and placed on `device` (module doc); `result()` for the groups."""

    def __init__(self, pack, keys: list[GroupKey], reader: SSDReader, device: torch.device,
                 host_embeddings: bool = True, copies: bool | None = None, window: int = WINDOW_BYTES,
                 populate: bool = False, map_table: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """`copies`: into buffers of their own on `device` (default: unless it is the CPU, where the
        groups are views of the host buffers). `window`: host bytes of groups read and not yet placed
        (at least one group), so a whole `gpu`-mode model never sits in host memory at once. `populate`:
        ranges not in the page cache are read buffered too, so they are there next run (`warm_page_cache`).
        `map_table`: applied to an embedding table kept on the host once its group is placed, on this
        load's thread, so its cost (page-locking 2 GB at 70B: `worker.stream.host_table`) runs behind
        the model's build like the rest of the load."""
        self.cuda = device.type == "cuda"
        if self.cuda and device.index is None:  # the load's thread sets it, and torch 2.11 wants an index there
            device = torch.device("cuda", torch.cuda.current_device())
        self.pack, self.device, self.host_embeddings = pack, device, host_embeddings
        self.copies = device.type != "cpu" if copies is None else copies
        self.stats = UploadStats()
        self._reader, self._keys, self._window, self._populate = reader, list(keys), window, populate
        self._map_table = map_table
        self._lock = threading.Lock()
        self._pending: list[_Pending] = []
        self._in_host = 0  # bytes of issued groups not yet placed
        self._closed = False
        self._t0 = time.perf_counter()
        self._issue_more()
        self._groups: dict[GroupKey, Group] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._copy_all, name="upload", daemon=True)
        self._thread.start()

    def _issue_more(self) -> None:
        """Issue the next groups' reads while they fit in the window (the first always does)."""
        with self._lock:
            while len(self._pending) < len(self._keys) and not self._closed:
                g = self.pack.manifest.group(self._keys[len(self._pending)].name)
                if self._in_host and self._in_host + g.nbytes > self._window:
                    return
                self._pending.append(self._issue(self._keys[len(self._pending)], g))
                self._in_host += g.nbytes
                self.stats.peak_host_bytes = max(self.stats.peak_host_bytes, self._in_host)

    def _issue(self, key: GroupKey, g) -> _Pending:
        reader = self._reader
        p = _Pending(key, aligned_empty(g.nbytes), targets=self._targets(key, g))  # (extent,) pageable
        cached = iter(reader.cached_chunks(g.offset, g.nbytes))
        for o in range(0, g.nbytes, reader.chunk):
            n, in_cache = min(reader.chunk, g.nbytes - o), next(cached)
            self.stats.page_cache_bytes += n if in_cache else 0
            p.reads.append((o, o + n, reader.read(g.offset + o, n, p.buf[o:o + n],
                                                  buffered=in_cache or self._populate)))
        self.stats.bytes += g.nbytes
        return p

    def _targets(self, key: GroupKey, g) -> list[_Target]:
        """What of the extent is copied: all of it, or (resident group, host embeddings) each tensor
        but an untied embedding table."""
        if key.layer is not None or not self.host_embeddings:
            return [_Target(0, g.nbytes)]
        tied = self.pack.manifest.model_config.tie_word_embeddings
        return [_Target(t.offset - g.offset, t.offset - g.offset + t.nbytes, t.short)
                for t in self.pack.manifest.group_tensors(key.name) if tied or t.short != "embed_tokens"]

    def _copy_all(self) -> None:
        try:
            if self.cuda:
                torch.cuda.set_device(self.device)
            for i in range(len(self._keys)):
                with self._lock:
                    if i >= len(self._pending):  # closed before it was issued
                        return
                    p = self._pending[i]
                for lo, hi, f in p.reads:
                    f.result()
                    t = time.perf_counter()
                    if self.copies:
                        self._copy(p, lo, hi)
                    self.stats.copy_s += time.perf_counter() - t
                self.stats.read_s = time.perf_counter() - self._t0
                self._groups[p.key] = self._views(p)
                self._map_host_table(p, self._groups[p.key])
                p.buf = None  # the views keep what stays on the host alive; the rest is freed
                with self._lock:
                    self._in_host -= self.pack.manifest.group(p.key.name).nbytes
                self._issue_more()
            if self.cuda:
                torch.cuda.current_stream(self.device).synchronize()  # the copies are done when result() is
        except BaseException as e:  # raised on the build thread by result()
            self._error = e

    def _map_host_table(self, p: _Pending, group: Group) -> None:
        """The embedding table, if `_targets` left it on the host, through `map_table`."""
        left = "embed_tokens" in group and not any(t.name in (None, "embed_tokens") for t in p.targets)
        if self._map_table is None or not self.copies or not left:
            return
        table = group["embed_tokens"]
        t = time.perf_counter()
        group["embed_tokens"] = self._map_table(table)
        self.stats.embed_map_s = time.perf_counter() - t
        self.stats.embed_mapped = group["embed_tokens"].device.type != "cpu"

    def _copy(self, p: _Pending, lo: int, hi: int) -> None:
        """The bytes [lo, hi) of the extent, just read, into the device buffers they belong to."""
        for t in p.targets:
            a, b = max(lo, t.lo), min(hi, t.hi)
            if a >= b:
                continue
            if t.dst is None:
                t.dst = torch.empty(t.hi - t.lo, dtype=torch.uint8, device=self.device)
            t.dst[a - t.lo:b - t.lo].copy_(p.buf[a:b])

    def _views(self, p: _Pending) -> Group:
        """The group's tensors: views of the device buffers (of the host buffer on a CPU device, and for
        an embedding table kept on the host)."""
        m = self.pack.manifest
        if len(p.targets) == 1 and p.targets[0].name is None:
            return fused(group_views(m, p.key.name, p.targets[0].dst if self.copies else p.buf))
        views = group_views(m, p.key.name, p.buf)
        if not self.copies:
            return views
        meta = {t.short: t for t in m.group_tensors(p.key.name)}
        for t in p.targets:
            views[t.name] = t.dst.view(VIEW_DTYPES[meta[t.name].dtype]).view(meta[t.name].shape)
        return views

    def device_bytes(self) -> int:
        """Device memory the groups will hold once placed (their copied byte ranges), known before any
        read is done: what the streamer sizes its GPU slots against while the load is still running."""
        if not self.copies:
            return 0
        m = self.pack.manifest
        return sum(t.hi - t.lo for key in self._keys for t in self._targets(key, m.group(key.name)))

    def result(self) -> dict[GroupKey, Group]:
        """Every group on its device (or the first error, once no read is still in flight)."""
        self._thread.join()
        if self._error is not None:
            self.close()
            raise self._error
        log.debug("upload: %d groups, %.2f GB (%.2f GB from the page cache), reads done after %.2f s, "
                  "device copies %.2f s", len(self._groups), self.stats.bytes / 1e9,
                  self.stats.page_cache_bytes / 1e9, self.stats.read_s, self.stats.copy_s)
        return dict(self._groups)

    def close(self) -> None:
        """After a failure (here or elsewhere in the build): cancel the reads not started and wait for
        those in flight, whose buffers must outlive them."""
        with self._lock:
            self._closed = True
            reads = [f for p in self._pending for _, _, f in p.reads]
        for f in reads:
            f.cancel()
        wait(reads)
        self._thread.join()


def device_keys(layers_on_device: list[int]) -> list[GroupKey]:
    """The resident group, then each GPU-cached layer's groups."""
    return [GroupKey(None, RESIDENT)] + [GroupKey(i, k) for i in layers_on_device for k in KINDS]
