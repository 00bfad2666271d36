"""Packing: an HF safetensors checkpoint → one aligned, grouped blob + its runtime manifest.

Streaming reads one group per O_DIRECT request, so the packer lays every group out as one contiguous
4 KiB-aligned extent (tensors inside it aligned too, so they are zero-copy views of the read buffer),
in `groups.all_groups` order. It streams through a fixed pool of aligned 64 MiB windows (a 70B
checkpoint never sits in memory), reads the checkpoint with pread (no mmap), writes with O_DIRECT,
hashes while writing, and writes the manifest last: a crash leaves no blob and no manifest behind.
`ensure_pack` is what `bench run` calls: it keeps a per-dtype, per-format pack cache next to the
checkpoint and re-packs only when the checkpoint's fingerprint changed. A quantized format
(worker.quant) lays each projection out as its parts, side by side in the same group extent, so a
group is still one read and one copy; their bytes come from `worker.pack.quantized`.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import queue
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from worker.errors import UserError
from worker.model.geometry import ModelConfig
from worker.pack import verify
from worker.pack.blob import CHUNK, TORCH_DTYPES, BlobWriter, Pack, aligned_empty, read_extent
from worker.pack.blockdev import check_target
from worker.pack.groups import all_groups, expected_shapes, group_tensors
from worker.pack.manifest import (
    DTYPE_SIZES,
    TENSOR_DTYPE_SIZES,
    BlobRef,
    GroupEntry,
    Manifest,
    TensorEntry,
    align_up,
    checkpoint_source,
)
from worker.pack.quantized import QuantizedSource
from worker.pack.source import ST_DTYPES, SourceTensor, read_index
from worker.quant.formats import WeightSpec, check_divides, part_name, parts
from worker.quant.published import Published, check_source, detect, resolve, scale_dtype

log = logging.getLogger(__name__)

WINDOW = CHUNK  # bytes per staging buffer / write: large, aligned, O_DIRECT-friendly
POOL_WINDOWS = 24  # staging buffers (1.5 GiB): the packer's whole memory footprint
FILLERS = 4  # threads reading the checkpoint into windows (NVMe wants several requests in flight)


def resolve_dtype(dtype: str | None, index: dict[str, SourceTensor]) -> str:
    """None/"auto" → the checkpoint's own dtype (its embedding's); otherwise validate the name."""
    if dtype in (None, "auto"):
        embed = index.get("model.embed_tokens.weight")
        dtype = embed.dtype if embed else next(iter(index.values())).dtype
    if dtype not in DTYPE_SIZES:
        raise UserError(f"dtype {dtype!r} cannot be packed; choose one of {', '.join(DTYPE_SIZES)}")
    return dtype


def plan_layout(cfg: ModelConfig, index: dict[str, SourceTensor], dtype: str, where: Path,
                weights: WeightSpec | None = None, published: Published | None = None
                ) -> tuple[list[tuple[str, int, int]], list[TensorEntry], int]:
    """Place every tensor: [(group, offset, extent)], tensor entries, blob size. Checks names and shapes.
    A quantized tensor is placed as its parts (formats.parts), each aligned like a tensor; a published
    checkpoint's (worker.quant.published) come from its own quantized tensors."""
    weights = weights or WeightSpec()
    shapes, itemsize = expected_shapes(cfg), DTYPE_SIZES[dtype]
    check_divides(weights, shapes, f"checkpoint {where}")
    groups, tensors, offset = [], [], 0
    for key in all_groups(cfg.num_hidden_layers):
        start = offset
        for short, name in group_tensors(key, cfg.tie_word_embeddings).items():
            quantized = weights.quantizes(short, cfg.tie_word_embeddings)
            if quantized and published is not None:
                why = check_source(published, index, name, shapes[short])
                if why:
                    raise UserError(f"checkpoint {where} ({published.method}): {why}; re-download or re-export it")
                offset = _place_parts(tensors, key.name, short, name, shapes[short], weights, offset,
                                      scale_dtype(published, index, name))
                continue
            src = index.get(name)
            if src is None:
                hint = " (config.json says tie_word_embeddings=false)" if short == "lm_head" else ""
                raise UserError(f"tensor {name} is missing from checkpoint {where}{hint}")
            if src.shape != shapes[short]:
                raise UserError(f"tensor {name} in {src.file.name} has shape {list(src.shape)}, but config.json "
                                f"implies {list(shapes[short])}")
            if src.dtype not in DTYPE_SIZES:
                raise UserError(f"tensor {name} in {src.file.name} has dtype {src.dtype}; supported: "
                                f"{', '.join(ST_DTYPES)}")
            if src.nbytes != math.prod(src.shape) * DTYPE_SIZES[src.dtype]:
                raise UserError(f"{src.file} is corrupt: tensor {name} spans {src.nbytes} bytes, not "
                                f"{list(src.shape)} × {src.dtype}")
            if quantized:
                offset = _place_parts(tensors, key.name, short, name, src.shape, weights, offset)
                continue
            nbytes = math.prod(src.shape) * itemsize
            tensors.append(TensorEntry(name, short, key.name, offset, nbytes, src.shape, dtype))
            offset = align_up(offset + nbytes)
        groups.append((key.name, start, offset - start))
    return groups, tensors, offset


def _place_parts(tensors: list[TensorEntry], group: str, short: str, name: str, dense: tuple[int, ...],
                 weights: WeightSpec, offset: int, scale_dtype: str | None = None) -> int:
    """Append a quantized weight's parts at `offset` (each aligned); the offset after them."""
    for suffix, (shape, pdtype) in parts(weights.format, dense, weights.group_size, scale_dtype).items():
        nbytes = math.prod(shape) * TENSOR_DTYPE_SIZES[pdtype]
        tensors.append(TensorEntry(part_name(name, suffix), f"{short}.{suffix}", group, offset, nbytes, shape,
                                   pdtype, weights.format))
        offset = align_up(offset + nbytes)
    return offset


def pack_checkpoint(checkpoint_dir: str | Path, blob_path: str | Path, manifest_path: str | Path,
                    dtype: str | None = None, force: bool = False, weights: WeightSpec | None = None) -> Manifest:
    """Pack a checkpoint into `blob_path` (regular file or block device) and write `manifest_path` last.

    `force` lets a raw target that holds a filesystem signature be overwritten (never a mounted one);
    `weights` is the weight format (native by default).
    """
    weights = weights or WeightSpec()
    t0 = time.perf_counter()
    root, blob_path, manifest_path = Path(checkpoint_dir), Path(blob_path).absolute(), Path(manifest_path).absolute()
    cfg = ModelConfig.from_hf_dir(root)
    source = checkpoint_source(root)
    index = read_index(root)
    dtype = resolve_dtype(dtype, index)
    published = detect(root)
    weights = resolve(published, weights, f"checkpoint {root}")
    groups, tensors, size = plan_layout(cfg, index, dtype, root, weights, published)
    if not manifest_path.parent.is_dir():
        raise UserError(f"manifest directory {manifest_path.parent} does not exist")
    if manifest_path == blob_path:
        raise UserError(f"manifest and blob must be different files (both {blob_path})")
    target = check_target(blob_path, size, force, reads=root, manifest=manifest_path)
    block = target.kind == "block"
    log.info("packing %s (%d layers, %s, %s weights, %.2f GB) into %s", root, cfg.num_hidden_layers, dtype,
             weights.format, size / 1e9, blob_path)
    tmp = blob_path if block else blob_path.with_name(f".{blob_path.name}.tmp{os.getpid()}")
    if block:
        manifest_path.unlink(missing_ok=True)  # the device's old contents are about to go
    renamed = False
    try:
        flags = os.O_WRONLY | os.O_EXCL if block else os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        fd = _open_for_write(tmp, flags)  # O_EXCL on a block device: refused if mounted or held
        try:
            if not block:
                _preallocate(fd, size)
            checksums = _write_groups(fd, groups, tensors, index, dtype, weights, published)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)  # leave the page cache to the benchmark
        finally:
            os.close(fd)
        blob_ref = str(blob_path) if block or blob_path.parent != manifest_path.parent else blob_path.name
        manifest = Manifest(
            model_config=cfg, dtype=dtype, blob_size=size, blob=BlobRef(blob_ref, target.kind), source=source,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            groups=tuple(GroupEntry(n, off, nb, checksums[n]) for n, off, nb in groups), tensors=tuple(tensors),
            weight_format=weights.format, group_size=weights.group_size if weights.format == "int4" else None)
        if not block:
            manifest_path.unlink(missing_ok=True)  # an old manifest must never describe the new blob
            os.replace(tmp, blob_path)
            renamed = True
        manifest.save(manifest_path)
    except BaseException as e:
        if not block:
            tmp.unlink(missing_ok=True)
            if renamed:
                blob_path.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise UserError(f"no space left for a {size / 1e9:.2f} GB pack at {blob_path}") from None
        raise
    verify.record(Pack.open(manifest_path), True)  # the checksums are of exactly the bytes written
    dt = time.perf_counter() - t0
    log.info("packed %d tensors in %d groups, %.2f GB in %.1f s (%.2f GB/s); manifest %s",
             len(tensors), len(groups), size / 1e9, dt, size / 1e9 / dt, manifest_path)
    return manifest


def _open_for_write(path: Path, flags: int) -> int:
    """O_DIRECT where allowed: buffered writes of 100+ GB fight the checkpoint reads for the disk."""
    try:
        return os.open(path, flags | os.O_DIRECT, 0o644)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        log.info("%s: O_DIRECT refused (%s); writing through the page cache", path, e.strerror)
        return os.open(path, flags, 0o644)


def _preallocate(fd: int, size: int) -> None:
    """Reserve the space up front, so a full disk fails in a second rather than after 140 GB."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.ftruncate(fd, size)


def _write_groups(fd: int, groups: list[tuple[str, int, int]], tensors: list[TensorEntry],
                  index: dict[str, SourceTensor], dtype: str, weights: WeightSpec,
                  published: Published | None) -> dict[str, str]:
    """Write every group's extent, window by window, through the pipeline; group name → checksum."""
    by_group: dict[str, list[TensorEntry]] = {}
    for t in tensors:
        by_group.setdefault(t.group, []).append(t)
    with _Pipeline(fd, index, dtype, QuantizedSource(tensors, index, weights.group_size, published)) as pipe:
        for name, start, nbytes in groups:
            for window in _windows(name, start, nbytes, by_group[name]):
                pipe.submit(window)
        return pipe.finish()


@dataclass(frozen=True)
class _Window:
    """WINDOW bytes (or a group's remainder) of one group's extent: blob bytes [start, end)."""

    group: str
    start: int
    end: int
    parts: list[tuple[int, int, TensorEntry | None]]  # blob bytes [from, to) of a tensor or of padding
    first: bool  # the group's first window: the writer starts hashing the group
    last: bool  # the group's last window: the writer ends the group's hash


@dataclass
class _Filling:
    """A window being filled into a staging buffer of the pool."""

    window: _Window
    buf: torch.Tensor  # (WINDOW,) uint8, aligned
    done: Future  # → memoryview of the window's bytes in `buf`


class _Pipeline:
    """Windows in blob order: take a free buffer → fill it on the filler pool → hand it to the writer
    (which writes and hashes it) → the buffer returns to the pool. Windows are handed on in order, so
    each group hashes sequentially while the fills and writes of many windows overlap.

    POOL_WINDOWS buffers are the whole memory footprint. At most POOL_WINDOWS // 2 windows wait to be
    handed on: the rest of the pool is the writer's, so taking a free buffer never waits on windows
    only this thread can hand on, and fills run ahead of the writes by half the pool. On a failure the
    fills still running are waited for (they read the source fds into the buffers), the writer is
    aborted, and the source fds are closed: `pack_checkpoint` then removes the partial blob.
    """

    def __init__(self, fd: int, index: dict[str, SourceTensor], dtype: str, quantized: QuantizedSource):
        self.index, self.dtype, self.quantized = index, dtype, quantized
        self.free: queue.Queue = queue.Queue()
        for _ in range(POOL_WINDOWS):
            self.free.put(aligned_empty(WINDOW))
        self.waiting: deque[_Filling] = deque()
        self.sources: dict[Path, int] = {}  # checkpoint file → fd: opened here, read by the fillers
        quantized.sources = self.sources
        self.writer = BlobWriter(fd)
        self.fillers = ThreadPoolExecutor(FILLERS, thread_name_prefix="pack-fill")

    def submit(self, window: _Window) -> None:
        """Start filling the next window, first handing older ones on to stay within the bound."""
        self._open_sources(window)
        while len(self.waiting) >= POOL_WINDOWS // 2:
            self._hand_on()
        buf = self.free.get()
        done = self.fillers.submit(_fill, buf, window, self.index, self.sources, self.dtype, self.quantized)
        self.waiting.append(_Filling(window, buf, done))

    def finish(self) -> dict[str, str]:
        """Hand on the windows left, wait for the writer; group name → checksum."""
        while self.waiting:
            self._hand_on()
        self.fillers.shutdown(wait=True)
        return self.writer.finish()

    def _open_sources(self, window: _Window) -> None:
        files = set()
        for _, _, t in window.parts:
            if t is not None:
                files |= {self.index[t.name].file} if t.format == "native" else self.quantized.files(t)
        for file in files:
            if file not in self.sources:
                self.sources[file] = os.open(file, os.O_RDONLY)

    def _hand_on(self) -> None:
        """Give the oldest window to the writer; its buffer returns to the pool once written and hashed."""
        f = self.waiting.popleft()
        if f.window.first:
            self.writer.begin_group(f.window.group)
        self.writer.put(f.window.start, f.done.result(), release=lambda: self.free.put(f.buf))
        if f.window.last:
            self.writer.end_group()

    def __enter__(self) -> _Pipeline:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                self.fillers.shutdown(wait=True)  # no fill may still touch a buffer or an fd
                self.writer.abort()
        finally:
            for fd in self.sources.values():
                os.close(fd)


def _windows(group: str, start: int, nbytes: int, tensors: list[TensorEntry]) -> Iterator[_Window]:
    """Cut a group's extent [start, start + nbytes) into windows of its tensors and the padding between."""
    end, segments, pos = start + nbytes, [], start
    for t in tensors:
        segments += [(pos, t.offset, None)] if t.offset > pos else []
        segments.append((t.offset, t.offset + t.nbytes, t))
        pos = t.offset + t.nbytes
    segments += [(pos, end, None)] if end > pos else []
    for ws in range(start, end, WINDOW):
        we = min(ws + WINDOW, end)
        yield _Window(group, ws, we, [(max(a, ws), min(b, we), t) for a, b, t in segments if a < we and b > ws],
                      first=ws == start, last=we == end)


def _fill(buf: torch.Tensor, window: _Window, index: dict[str, SourceTensor], sources: dict[Path, int],
          dtype: str, quantized: QuantizedSource) -> memoryview:
    """Fill the window's blob bytes into `buf` (aligned, uint8) straight from the checkpoint (pread into
    place, or read and convert into place; zeros between tensors; quantized parts from `quantized`);
    return their view."""
    for a, b, t in window.parts:
        dst = buf[a - window.start:b - window.start]  # (b - a,) bytes of the blob
        if t is None:
            dst.zero_()
            continue
        if t.format != "native":
            quantized.fill(dst, t, a - t.offset)
            continue
        src = index[t.name]
        src_t, dst_t = TORCH_DTYPES[src.dtype], TORCH_DTYPES[dtype]
        rel = a - t.offset  # bytes into the packed tensor; a multiple of its itemsize
        try:
            if src_t == dst_t:
                read_extent(sources[src.file], src.offset + rel, b - a, dst)
            else:
                first, count = rel // dst_t.itemsize, (b - a) // dst_t.itemsize
                tmp = torch.empty(count * src_t.itemsize, dtype=torch.uint8)  # (count * src itemsize,)
                read_extent(sources[src.file], src.offset + first * src_t.itemsize, tmp.numel(), tmp)
                dst.view(dst_t).copy_(tmp.view(src_t))  # (count,) converted in place
        except EOFError:
            raise UserError(f"checkpoint file {src.file} is truncated (ends inside {t.name})") from None
    return memoryview(buf[:window.end - window.start].numpy())  # (end - start,) bytes

