"""The host probe: measured SSD, PCIe and HBM bandwidth, once per host, for the roofline.

A run's I/O floor is `max(ssd_bytes / ssd_gbps, h2d_bytes / h2d_gbps, compute floor)`, so the probe
measures what the engine's tiers can get at best, the way the engine uses them:

- SSD: O_DIRECT `preadv` into 4 KiB-aligned buffers, large requests, several threads in flight
  (a threads × request-size sweep; the best point is the figure: a floor wants the best rate the disk
  showed, and on a noisy virtual disk a median of re-reads came out below what the SSD tier then read;
  measured: benchmarks/results/README.md). Never the page cache: a directory holding a pack is
  measured by reading its blob, else a scratch file is written with O_DIRECT (or flushed and dropped
  from the cache), and where O_DIRECT is refused or the file lives on a memory-backed filesystem the
  figure is flagged unreliable.
- H2D / D2H: one large (≥ 1 GiB) pinned copy, timed with CUDA events, median of repeats; pageable
  H2D for reference. HBM: a large device-to-device copy, bytes read + written.
- A CPU-only host has no PCIe hop: its "H2D" is a host memcpy (memory bandwidth), labelled so in
  `details`; HBM is None.

All figures are GB/s (1e9 bytes per second). Results are cached as JSON in
`envs.cache_dir()/probe-<hostname>.json`; `probe_host(refresh=True)` measures again.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import re
import shutil
import socket
import statistics
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from worker import envs
from worker.errors import UserError
from worker.pack.blob import blob_size, check_readable, open_direct
from worker.pack.cache import CACHE_DIRNAME
from worker.units import GB, PAGE, GiB, MiB

log = logging.getLogger(__name__)

PROBE_SCHEMA = "streambench.probe/1"
MEMORY_FS = {"tmpfs", "ramfs", "devtmpfs", "hugetlbfs"}  # "disk" reads there measure RAM


@dataclass(frozen=True)
class Plan:
    """How much to measure: the full probe (~20 s of SSD sweep) or the quick one (tests, smoke)."""

    scratch_bytes: int
    threads: tuple[int, ...]
    request_mib: tuple[int, ...]
    seconds_per_point: float
    copy_bytes: int
    hbm_bytes: int
    repeats: int


FULL = Plan(4 * GiB, (1, 4, 8, 16), (1, 4, 16, 64), 1.0, 1 * GiB, 2 * GiB, 7)
QUICK = Plan(32 * MiB, (1, 2), (1, 4), 0.1, 64 * MiB, 64 * MiB, 3)


# ---- the cache ----------------------------------------------------------------------------------


def cache_path() -> Path:
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())
    return Path(envs.cache_dir()) / f"probe-{host}.json"


def cached_probe() -> dict[str, Any] | None:
    """This host's cached probe, or None when there is none (or it is unreadable or of another schema)."""
    try:
        doc = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("schema") == PROBE_SCHEMA else None


def cached_for(path: str | None, quick: bool) -> dict[str, Any] | None:
    """The cached probe if it answers a request for `path`'s disk (`probe_host`), else None."""
    target = str(Path(path).resolve()) if path else None
    doc = cached_probe()
    if doc and (target is None or doc.get("ssd_path") == target) and (quick or not doc.get("quick")):
        return doc
    return None


def probe_host(path: str | None = None, refresh: bool = False, quick: bool = False) -> dict[str, Any]:
    """This host's bandwidths: the cached figures when they answer the question, else measured and cached.

    `path`: the disk to measure — a file or raw block device (read only, never written) or a directory
    (its pack blob is read if it holds one, else a scratch file is written there and removed).
    Default: a scratch file in the cache directory.
    A cached full probe answers a quick request; a cached quick probe does not answer a full one.
    """
    target = str(Path(path).resolve()) if path else None
    if not refresh:
        doc = cached_for(path, quick)
        if doc:
            log.info("probe: using %s (measured %s)", cache_path(), doc.get("measured_at"))
            return doc
    doc = measure(target, quick)
    from worker.result import write_json

    write_json(doc, cache_path())
    return doc


def measure(path: str | None, quick: bool = False) -> dict[str, Any]:
    """Measure everything now (no cache)."""
    plan = QUICK if quick else FULL
    if path is None:
        os.makedirs(envs.cache_dir(), exist_ok=True)
    ssd = measure_ssd(path or envs.cache_dir(), plan)
    cuda = torch.cuda.is_available()
    copies = measure_pcie(plan) if cuda else measure_memcpy(plan)
    hbm = measure_hbm(plan) if cuda else None
    matmul = measure_matmul(plan) if cuda else None
    warnings = list(ssd.pop("warnings"))
    return {
        "schema": PROBE_SCHEMA,
        "hostname": socket.gethostname(),
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "ssd_gbps": ssd["gbps"],
        "ssd_path": ssd["target"],
        "ssd_direct": ssd["direct"],
        "h2d_gbps": copies["h2d"]["gbps"],
        "h2d_pageable_gbps": (copies.get("h2d_pageable") or {}).get("gbps"),
        "d2h_gbps": (copies.get("d2h") or {}).get("gbps"),
        "hbm_gbps": hbm["gbps"] if hbm else None,
        "matmul_tflops": matmul["tflops"] if matmul else None,
        "warnings": warnings,
        "details": {"ssd": ssd, **copies, "hbm": hbm, "matmul": matmul,
                    "device": torch.cuda.get_device_name() if cuda else "cpu"},
    }


# ---- SSD ----------------------------------------------------------------------------------------


def measure_ssd(path: str, plan: Plan) -> dict[str, Any]:
    """O_DIRECT sequential read bandwidth of the disk holding `path` (see `probe_host`)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"probe --path {path!r} does not exist: give a file, a block device or a directory")
    if not p.is_dir():
        check_readable(p, "probe --path")
    blob = _existing_blob(p, plan.scratch_bytes) if p.is_dir() else None
    scratch = _write_scratch(p, plan.scratch_bytes) if p.is_dir() and blob is None else None
    read_path = blob or scratch or p
    try:
        return _sweep(read_path, plan, str(p.resolve()), scratch is not None)
    finally:
        if scratch is not None:
            scratch.unlink(missing_ok=True)


def _existing_blob(directory: Path, want: int) -> Path | None:
    """The largest pack blob of at least `want` bytes in `directory` or its pack cache, read only:
    the very file the SSD tier reads, and no 4 GiB scratch written (and worn into the disk) per probe."""
    dirs = [directory, directory / CACHE_DIRNAME]
    blobs = [b for d in dirs if d.is_dir() for b in d.glob("*.blob") if b.is_file() and b.stat().st_size >= want]
    return max(blobs, key=lambda b: b.stat().st_size, default=None)


def _write_scratch(directory: Path, want: int) -> Path:
    """A scratch file of random bytes, written with large (O_DIRECT where allowed) writes and fsynced."""
    free = shutil.disk_usage(directory).free
    size = min(want, free // 4) // (4 * MiB) * (4 * MiB)
    if size < 4 * MiB:
        raise UserError(f"probe: only {free / GB:.2f} GB free in {directory}; free some space or pass --path "
                        "pointing at an existing large file or a block device")
    path = directory / f".probe-scratch-{os.getpid()}"
    chunk = min(size, 64 * MiB)
    size = size // chunk * chunk
    buf = _aligned(chunk)
    buf[:] = os.urandom(chunk)  # incompressible: an SSD cannot shortcut it
    fd, direct = _open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for off in range(0, size, chunk):
            try:
                n = os.pwrite(fd, memoryview(buf), off)
            except OSError as e:
                if not (direct and e.errno == errno.EINVAL):
                    raise
                os.close(fd)  # opened with O_DIRECT, but the filesystem will not write that way
                fd, direct = os.open(path, os.O_WRONLY), False
                n = os.pwrite(fd, memoryview(buf), off)
            if n != chunk:  # a hole would read back without touching the disk
                raise OSError(errno.EIO, f"short write to the probe's scratch file ({n} of {chunk} bytes)")
        os.fsync(fd)
        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return path


def _sweep(path: Path, plan: Plan, target: str, scratch: bool) -> dict[str, Any]:
    warnings = []
    size = blob_size(path)
    fd, direct = _open(path, os.O_RDONLY)
    try:
        if not direct:
            warnings.append(f"O_DIRECT refused on {target}: buffered reads, the SSD figure may include the "
                            "page cache and is unreliable")
        fs = _fs_type(path)
        if fs in MEMORY_FS:
            warnings.append(f"{target} is on {fs} (memory-backed): the SSD figure measures RAM, not a disk")
        if size < MiB:
            raise UserError(f"probe: {target} holds only {size} bytes; give a file of at least 1 MiB, a block "
                            "device or a directory")
        points, cursor = [], 0
        for threads in plan.threads:
            for req_mib in [r for r in plan.request_mib if r * MiB <= size] or [1]:
                gbps, cursor, direct = _read_point(fd, path, size, threads, req_mib * MiB,
                                                   plan.seconds_per_point, cursor, direct, warnings)
                points.append({"threads": threads, "request_mib": req_mib, "gbps": gbps})
    finally:
        os.close(fd)
    best = max(points, key=lambda p: p["gbps"])
    for w in warnings:
        log.warning("probe: %s", w)
    return {"gbps": best["gbps"], "target": target, "read": str(path), "direct": direct, "fs_type": fs,
            "reliable": direct and fs not in MEMORY_FS, "scratch": scratch, "bytes": size,
            "best": best, "sweep": points, "warnings": warnings}


def _read_point(fd: int, path: Path, size: int, threads: int, req: int, seconds: float, cursor: int,
                direct: bool, warnings: list[str]) -> tuple[float, int, bool]:
    """GB/s of `threads` readers doing `req`-byte preadv's for ~`seconds`; each point continues where
    the last stopped (so no point rereads what the drive just served). Returns (GB/s, cursor, direct)."""
    span = size // req * req or size
    lock = threading.Lock()
    state = {"next": cursor % span, "bytes": 0, "error": None}
    deadline = time.perf_counter() + seconds

    def reader() -> None:
        buf = memoryview(_aligned(req))
        while time.perf_counter() < deadline and state["error"] is None:
            with lock:
                off = state["next"]
                state["next"] = (off + req) % span
            try:
                n = os.preadv(fd, [buf], off)
            except OSError as e:
                state["error"] = e
                return
            with lock:
                state["bytes"] += n

    if not direct:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    t0 = time.perf_counter()
    pool = [threading.Thread(target=reader, name=f"probe-read-{i}") for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - t0
    err = state["error"]
    if err is not None:
        if direct and err.errno == errno.EINVAL:  # opened, but the filesystem will not do the read
            warnings.append(f"O_DIRECT read refused on {path} ({err.strerror}): buffered reads, unreliable")
            fd2 = os.open(path, os.O_RDONLY)
            os.dup2(fd2, fd)
            os.close(fd2)
            return _read_point(fd, path, size, threads, req, seconds, cursor, False, warnings)
        raise err
    return state["bytes"] / elapsed / GB, state["next"], direct


def _open(path: Path, flags: int) -> tuple[int, bool]:
    """Open with O_DIRECT where the filesystem allows it; (fd, direct)."""
    return open_direct(path, flags)


def _aligned(nbytes: int) -> mmap.mmap:
    """A page-aligned (hence 4 KiB-aligned) writable buffer, as O_DIRECT requires."""
    return mmap.mmap(-1, max(nbytes, PAGE))


def _fs_type(path: Path) -> str | None:
    """Filesystem type of the mount holding `path` (longest mount-point prefix in /proc/mounts)."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    real = str(path.resolve())
    best = max((m for m in mounts if real == m[0] or real.startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=None)
    return best[1] if best else None


# ---- copies -------------------------------------------------------------------------------------


def _gbps(nbytes: int, times_s: list[float]) -> dict[str, Any]:
    med = statistics.median(times_s)
    return {"gbps": nbytes / med / GB, "bytes": nbytes, "median_s": med, "repeats": len(times_s)}


def _cuda_time(fn, repeats: int) -> list[float]:
    """Seconds per call of `fn` on the current stream, one warm-up call excluded."""
    fn()
    out = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / 1e3)
    return out


def measure_pcie(plan: Plan) -> dict[str, Any]:
    """Pinned H2D and D2H, pageable H2D, one large copy each (CUDA events, median of repeats)."""
    n = plan.copy_bytes
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")  # (n,)
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True).fill_(1)  # (n,)
    pageable = torch.ones(n, dtype=torch.uint8)  # (n,) touched, so no first-fault cost is timed
    def timed(kind: str, fn) -> dict[str, Any]:
        return {"kind": kind, **_gbps(n, _cuda_time(fn, plan.repeats))}

    out = {"h2d": timed("pinned", lambda: dev.copy_(pinned, non_blocking=True)),
           "d2h": timed("pinned", lambda: pinned.copy_(dev, non_blocking=True)),
           "h2d_pageable": timed("pageable", lambda: dev.copy_(pageable))}
    del dev, pinned, pageable
    torch.cuda.empty_cache()
    return out


def measure_hbm(plan: Plan) -> dict[str, Any]:
    """Device memory bandwidth: a device-to-device copy, counting bytes read + written."""
    n = plan.hbm_bytes
    src = torch.ones(n, dtype=torch.uint8, device="cuda")  # (n,)
    dst = torch.empty_like(src)
    out = {"kind": "d2d copy, read + write", **_gbps(2 * n, _cuda_time(lambda: dst.copy_(src), plan.repeats))}
    del src, dst
    torch.cuda.empty_cache()
    return out


def measure_matmul(plan: Plan, n: int = 8192) -> dict[str, Any]:
    """Dense bf16 matrix-product rate on random data: the compute term of the roofline (prefill)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    times = _cuda_time(lambda: a @ b, plan.repeats)
    del a, b
    torch.cuda.empty_cache()
    return {"kind": f"bf16 {n}x{n}x{n}", "tflops": 2 * n ** 3 / statistics.median(times) / 1e12}


def measure_memcpy(plan: Plan) -> dict[str, Any]:
    """No CUDA: the engine's "H2D" is a host copy, so the figure is host memcpy (memory) bandwidth."""
    n = plan.copy_bytes
    src = torch.ones(n, dtype=torch.uint8)  # (n,)
    dst = torch.zeros(n, dtype=torch.uint8)  # (n,)
    dst.copy_(src)
    times = []
    for _ in range(plan.repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    label = {"kind": "host memcpy (no CUDA): memory bandwidth, not PCIe"}
    return {"h2d": {**label, **_gbps(n, times)}, "d2h": {**label, **_gbps(n, times)}, "h2d_pageable": None}
