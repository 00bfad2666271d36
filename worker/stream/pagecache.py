"""Which parts of the blob sit in the page cache (cachestat, or mincore over a read-only mapping).

O_DIRECT reads go to the disk even when the kernel holds the bytes, so a pack read a moment ago
(a re-run, a verify pass) would be read at disk speed; reading such an extent buffered copies it at
memory speed instead. Asking costs a few system calls and no I/O. Where the blob cannot be mapped
the answer is "not cached" and reads stay O_DIRECT.

Per chunk the question is one `cachestat` call (Linux 6.5): it counts a range's cached pages by
walking the file's page cache a folio at a time, with no mapping. mincore, where cachestat is
missing (ENOSYS) or refused, maps the range and looks every 4 KiB page up on its own, ten times
slower and more; the fill asks about each group just before issuing its reads, and while its
thread asked mincore about the second group the first group's reads were done and most readers
idled (benchmarks/results/setup_h200/v7, AA and AD measure both). `cached_bytes` (exact bytes of a
range, its partial first and last pages included) stays on mincore: nothing waits for it.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os

import numpy as np

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.syscall.restype = ctypes.c_long
_MAP_FAILED = ctypes.c_void_p(-1).value
SYSTEM_PAGE = os.sysconf("SC_PAGE_SIZE")
CACHESTAT = True  # False: mincore only (for an A/B against it)
_SYS_CACHESTAT = {"x86_64": 451, "aarch64": 451}.get(os.uname().machine)  # the same number on both


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted",
                                                "nr_recently_evicted")]


_cachestat_works = [_SYS_CACHESTAT is not None]  # cleared at the first ENOSYS / EPERM (a seccomp filter)


def _cached_pages(fd: int, offset: int, nbytes: int) -> int | None:
    """Pages of [offset, offset + nbytes) in the page cache (every page the range touches), or None
    where cachestat cannot say (then mincore does)."""
    if not (CACHESTAT and _cachestat_works[0]) or nbytes <= 0:
        return None
    rng, stat = _Range(offset, nbytes), _Stat()
    if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(stat), 0) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EPERM):
            _cachestat_works[0] = False
        log.debug("page cache: cachestat on fd %d failed: errno %d; asking mincore", fd, err)
        return None
    return stat.nr_cache


def _pages_touched(offset: int, nbytes: int) -> int:
    return (offset + nbytes - 1) // SYSTEM_PAGE - offset // SYSTEM_PAGE + 1


def _resident_pages(fd: int, offset: int, nbytes: int):
    """(first mapped page's file offset, (pages,) uint8 residency: bit 0 set where the page is in the
    page cache), or None where the file cannot be mapped."""
    start = offset - offset % SYSTEM_PAGE  # mmap offsets are page-aligned
    length = offset + nbytes - start
    addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if addr in (None, _MAP_FAILED):
        log.debug("page cache: cannot map fd %d at %d (+%d): errno %d", fd, start, length, ctypes.get_errno())
        return None
    try:
        pages = -(-length // SYSTEM_PAGE)
        vec = (ctypes.c_ubyte * pages)()
        if _libc.mincore(addr, length, vec) != 0:
            log.debug("page cache: mincore failed: errno %d", ctypes.get_errno())
            return None
        return start, np.frombuffer(vec, dtype=np.uint8) & 1  # (pages,)
    finally:
        _libc.munmap(addr, length)


def cached_bytes(fd: int, offset: int, nbytes: int) -> int:
    """Bytes of [offset, offset + nbytes) of the file behind `fd` that are in the page cache
    (whole pages, clipped to the range); 0 where the file cannot be mapped."""
    if nbytes <= 0:
        return 0
    got = _resident_pages(fd, offset, nbytes)
    if got is None:
        return 0
    start, resident = got
    total = int(resident.sum()) * SYSTEM_PAGE
    total -= int(resident[0]) * (offset - start)  # the part of the first page before the range
    total -= int(resident[-1]) * (start + len(resident) * SYSTEM_PAGE - offset - nbytes)  # after it
    return total


def cached_chunks(fd: int, offset: int, nbytes: int, chunk: int) -> list[bool]:
    """For each `chunk` bytes of [offset, offset + nbytes) (the last one shorter): is every page of it
    in the page cache? All False where the file cannot be mapped."""
    n = -(-nbytes // chunk) if nbytes > 0 else 0
    counted = [_cached_pages(fd, offset + o, min(chunk, nbytes - o)) for o in range(0, nbytes, chunk)] if n else []
    if n and None not in counted:
        return [c == _pages_touched(offset + o, min(chunk, nbytes - o)) for c, o in zip(counted, range(0, nbytes, chunk))]
    got = _resident_pages(fd, offset, nbytes) if n else None
    if got is None:
        return [False] * n
    start, resident = got
    out = []
    for o in range(0, nbytes, chunk):
        lo = (offset + o - start) // SYSTEM_PAGE
        hi = -(-(offset + min(o + chunk, nbytes) - start) // SYSTEM_PAGE)
        out.append(bool(resident[lo:hi].all()))
    return out


def is_cached(fd: int, offset: int, nbytes: int) -> bool:
    """Is every byte of the range in the page cache?"""
    counted = _cached_pages(fd, offset, nbytes)
    if counted is not None:
        return counted == _pages_touched(offset, nbytes)
    return cached_bytes(fd, offset, nbytes) == nbytes
