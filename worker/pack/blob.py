"""Blob I/O: aligned buffers, O_DIRECT reads of whole groups, and the ordered writer used when packing.

The blob is a flat sequence of 4 KiB-aligned group extents (see `worker.manifest`). Reading a group is
one large `preadv` into a 4 KiB-aligned buffer, and each tensor is a zero-copy view into that buffer:
that is what makes O_DIRECT possible and keeps the load path free of copies. This module keeps the
reading simple and correct; the multi-threaded SSD tier builds on `aligned_empty`/`read_extent`.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import math
import os
import queue
import stat
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from worker.errors import UserError
from worker.model.geometry import ModelConfig
from worker.pack.groups import GroupKey
from worker.pack.manifest import Manifest
from worker.units import PAGE

log = logging.getLogger(__name__)

CHUNK = 64 << 20  # bytes per preadv/pwrite call: large, sequential, O_DIRECT-friendly
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
VIEW_DTYPES = {**TORCH_DTYPES, "int8": torch.int8, "uint8": torch.uint8,  # a quantized pack's parts too
               "float8_e4m3fn": torch.float8_e4m3fn}


def aligned_empty(nbytes: int, pin: bool = False) -> torch.Tensor:
    """An uninitialized uint8 CPU tensor of `nbytes` whose data starts on a 4 KiB boundary.

    O_DIRECT needs aligned buffers; torch's allocator only promises 64 bytes, so over-allocate by a
    page and slice. The slice keeps the whole allocation alive. `pin` is ignored (with a debug log)
    where no pinned-memory allocator exists (CPU-only torch).
    """
    if pin and not torch.cuda.is_available():
        log.debug("aligned_empty: no CUDA, allocating pageable memory instead of pinned")
        pin = False
    raw = torch.empty(nbytes + PAGE, dtype=torch.uint8, pin_memory=pin)  # (nbytes + PAGE,)
    shift = (-raw.data_ptr()) % PAGE
    return raw[shift:shift + nbytes]  # (nbytes,)


def open_direct(path: str | Path, flags: int, mode: int = 0o600) -> tuple[int, bool]:
    """Open with O_DIRECT where the filesystem allows it (tmpfs refuses with EINVAL): (fd, direct)."""
    if hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, mode), True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    return os.open(path, flags, mode), False


def open_blob(path: str | Path, direct: bool = True) -> int:
    """Open a blob read-only; with `direct`, try O_DIRECT and fall back to buffered where refused."""
    if not direct:
        return os.open(path, os.O_RDONLY)
    fd, is_direct = open_direct(path, os.O_RDONLY)
    if not is_direct:
        log.warning("%s: O_DIRECT refused by the filesystem; using buffered reads", path)
    return fd


def read_extent(fd: int, offset: int, nbytes: int, out: torch.Tensor, call: int | None = None) -> None:
    """Fill `out[:nbytes]` (uint8, CPU) from the blob at `offset`. Raises EOFError on a short blob.

    With an O_DIRECT fd, offset, nbytes and `out`'s address must be 4 KiB-aligned (manifest extents and
    `aligned_empty` buffers are). `call` (default CHUNK) is the most bytes one system call asks for: a
    page-cache read asks for its whole request at once, since each return to Python has to win the
    GIL back, and under a thread that holds it (the compile-ahead import) that wait is paid per call.
    """
    view = memoryview(out.numpy())[:nbytes]
    call = call or CHUNK
    done = 0
    while done < nbytes:
        n = os.preadv(fd, [view[done:done + call]], offset + done)
        if n == 0:
            raise EOFError(f"end of blob at offset {offset + done} while reading [{offset}, +{nbytes})")
        done += n


def check_readable(path: str | Path, what: str) -> None:
    """A blob, or a disk to probe, is a regular file or a block device this process can open: say so
    in one line, rather than a PermissionError mid-run or a directory's nonsense "size"."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except PermissionError:
        raise UserError(f"cannot reach {what} {path} (permission denied on a directory above it)") from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{what} {path} is a directory: give the blob file or the block device itself")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise UserError(f"{what} {path} is neither a regular file nor a block device")
    try:
        os.close(os.open(path, os.O_RDONLY))
    except PermissionError:
        hint = " (a device node: add your user to its group, e.g. `disk`, or run as a user who may read it)" \
            if stat.S_ISBLK(st.st_mode) else ""
        raise UserError(f"cannot open {what} {path}: permission denied{hint}") from None


def blob_size(path: str | Path) -> int:
    """Bytes in a regular file or block device (st_size is 0 for devices, so seek to the end)."""
    st = os.stat(path)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


@dataclass
class Pack:
    """An opened pack: a validated manifest and the blob it describes."""

    manifest: Manifest
    manifest_path: Path
    blob_path: Path
    direct: bool = True
    check: dict | None = None  # how the run checked this blob before using it (worker.pack.verify)
    _fd: int | None = field(default=None, repr=False, compare=False)
    _fd_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def open(cls, manifest_path: str | Path, blob_path: str | Path | None = None, direct: bool = True) -> Pack:
        """Load the manifest and check the blob exists and is the size the manifest says.

        `blob_path` overrides the manifest's blob (e.g. `--raw-device` after device names changed).
        """
        manifest_path = Path(manifest_path)
        m = Manifest.load(manifest_path)
        path = Path(blob_path) if blob_path else m.blob_path(manifest_path)
        if not path.exists():
            raise UserError(f"blob {path} (of manifest {manifest_path}) does not exist: re-pack with `bench pack`")
        check_readable(path, "blob")
        size = blob_size(path)
        is_block = stat.S_ISBLK(os.stat(path).st_mode)
        if (size < m.blob_size) if is_block else (size != m.blob_size):
            raise UserError(f"blob {path} is {size} bytes but its manifest says {m.blob_size}: "
                            "re-pack with `bench pack`")
        return cls(m, manifest_path, path, direct)

    @property
    def model_config(self) -> ModelConfig:
        return self.manifest.model_config

    def n_params(self) -> int:
        """Parameters of the model (a quantized weight counts its dense shape, not its parts)."""
        n = 0
        for t in self.manifest.tensors:
            if t.format == "native":
                n += math.prod(t.shape)
            elif t.short.endswith(".qweight"):
                n += math.prod(t.shape) * (2 if t.format == "int4" else 1)
        return n

    def weight_bytes(self) -> int:
        """Tensor bytes (without alignment padding)."""
        return sum(t.nbytes for t in self.manifest.tensors)

    @property
    def fd(self) -> int:
        """One shared read-only fd (pread needs no per-thread state), opened on first use."""
        with self._fd_lock:
            if self._fd is None:
                self._fd = open_blob(self.blob_path, self.direct)
            return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Pack:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read_raw(self, key: GroupKey | str) -> torch.Tensor:
        """The group's whole extent as one aligned uint8 CPU buffer."""
        name = key if isinstance(key, str) else key.name
        g = self.manifest.group(name)
        buf = aligned_empty(g.nbytes)  # (extent bytes,)
        try:
            read_extent(self.fd, g.offset, g.nbytes, buf)
        except EOFError as e:
            raise UserError(f"blob {self.blob_path} is shorter than its manifest says ({e}): "
                            "re-pack with `bench pack`") from None
        return buf

    def read_group(self, key: GroupKey | str) -> dict[str, torch.Tensor]:
        """Short name → CPU tensor (pack dtype and shape), all views of one aligned buffer."""
        name = key if isinstance(key, str) else key.name
        return group_views(self.manifest, name, self.read_raw(name))


def group_views(manifest: Manifest, name: str, buf: torch.Tensor) -> dict[str, torch.Tensor]:
    """Short name → a typed view of the group's extent held in `buf` (CPU or GPU, uint8)."""
    base = manifest.group(name).offset
    out = {}
    for t in manifest.group_tensors(name):
        rel = t.offset - base
        out[t.short] = buf[rel:rel + t.nbytes].view(VIEW_DTYPES[t.dtype]).view(t.shape)
    return out


def extent_checksum(fd: int, offset: int, nbytes: int) -> str:
    """sha256 of an aligned extent in large reads; the next chunk is read while this one is hashed."""
    h = hashlib.sha256()
    bufs = [aligned_empty(min(CHUNK, nbytes)) for _ in range(2)]  # 2 × (chunk,)

    def read(pos: int) -> memoryview:
        n, buf = min(CHUNK, nbytes - pos), bufs[pos // CHUNK % 2]
        read_extent(fd, offset + pos, n, buf)
        return memoryview(buf.numpy())[:n]

    with ThreadPoolExecutor(1, thread_name_prefix="verify-read") as reader:
        nxt = reader.submit(read, 0)
        for pos in range(0, nbytes, CHUNK):
            data = nxt.result()
            if pos + CHUNK < nbytes:
                nxt = reader.submit(read, pos + CHUNK)
            h.update(data)
    return "sha256:" + h.hexdigest()


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


class BlobWriter:
    """Writes windows at blob offsets and sha256-hashes each group's extent, off the caller's thread.

    Writes run on a small pool (pwrite at distinct offsets is safe in parallel and keeps the SSD's
    queue full); each group is hashed in order on one thread, and consecutive groups hash in parallel
    (sha256 on one core is slower than an NVMe reads; measured: benchmarks/results/README.md). A
    window's `release` runs once it is both written and hashed, which is how the caller recycles its
    buffers and bounds memory.
    """

    def __init__(self, fd: int, writers: int = 4, hashers: int = 4):
        self.fd = fd
        self._writers = ThreadPoolExecutor(writers, thread_name_prefix="pack-write")
        self._hashers = ThreadPoolExecutor(hashers, thread_name_prefix="pack-hash")
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._queue: queue.SimpleQueue | None = None
        self.checksums: dict[str, Future] = {}

    def begin_group(self, name: str) -> None:
        self._queue = queue.SimpleQueue()
        self.checksums[name] = self._hashers.submit(self._hash, self._queue)

    def end_group(self) -> None:
        self._queue.put(None)
        self._queue = None

    def put(self, offset: int, data: memoryview, release: Callable[[], None]) -> None:
        """Queue `data` (the next bytes of the current group, kept alive until `release`) at `offset`."""
        if self._error:
            raise self._error
        pending = [2, release]
        self._writers.submit(self._write, data, offset, pending)
        self._queue.put((data, pending))

    def finish(self) -> dict[str, str]:
        """Wait for everything; return group name → "sha256:<hex>" or raise the first error."""
        self._writers.shutdown(wait=True)
        self._hashers.shutdown(wait=True)
        if self._error:
            raise self._error
        return {name: f.result() for name, f in self.checksums.items()}

    def abort(self) -> None:
        if self._queue is not None:
            self.end_group()
        self._error = self._error or RuntimeError("pack aborted")
        self._writers.shutdown(wait=True, cancel_futures=True)
        self._hashers.shutdown(wait=True, cancel_futures=True)

    def _write(self, data: memoryview, offset: int, pending: list) -> None:
        try:
            if not self._error:
                pwrite_all(self.fd, data, offset)
        except BaseException as e:  # ENOSPC, EIO: surfaces on the caller's thread at its next put
            self._error = self._error or e
        self._done(pending)

    def _hash(self, q: queue.SimpleQueue) -> str:
        h = hashlib.sha256()
        while (item := q.get()) is not None:
            data, pending = item
            try:
                h.update(data)
            except BaseException as e:  # keep draining: the caller waits on released buffers
                self._error = self._error or e
            self._done(pending)
        return "sha256:" + h.hexdigest()

    def _done(self, pending: list) -> None:
        with self._lock:
            pending[0] -= 1
            last = pending[0] == 0
        if last:
            pending[1]()
