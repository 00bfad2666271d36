"""Filling the CPU tier: the pack's extents into pinned host memory at the rate the source gives.

Reads never wait for pinning. Every group's buffer is allocated pageable and all of its reads are
issued at once on the SSD tier's reader (large O_DIRECT requests, threads × chunk in flight, straight
into the buffer, no bounce copy), so the reader threads fault the pages in, in parallel, as the data
lands. Behind them, `PIN_UNIT` ranges are registered (`cudaHostRegister`) as soon as the reads that
cover them are done: registration then finds its pages present and only locks them, and the disk is
never idle while it runs. The reader thread whose read completes a range registers it (`PIN_THREADS`
0; at most `PIN_SLOTS` at once: worker.stream.registrar), not a pinning thread of its own: such a
thread wakes for every read and every registration, one after the other, and each wake-up waits for
the GIL, up to a switch interval while another thread holds it (the compile-ahead import does, during
a run's fill), so a chain of them, not the reads, set the pace of a fill from the page cache; on the
reader threads those waits overlap each other's reads (benchmarks/cpu_fill.py, `pin0` against
`pin1`, with `busy`). The old fill registered each group
before issuing its reads, so no read of a group could start before its registration ended;
registering fresh memory faults in and locks every page on one thread under the driver's global
lock, and where that is slower than the disk the disk waited (benchmarks/cpu_fill.py measures the old
and the new fill against the source).

The page-cache pool's threads are all started before the first read is issued. A pool starts its
threads one per read submitted, and started beside the reads already faulting in their fresh pages
they came up 3 ms apart, so the first tenth of a fill had 4 of 16 threads reading
(benchmarks/results/setup_h200/v7, R; a thread's start maps its stack, which, we think, waits on the
process's memory-map lock behind those faults). Each group's buffer and page-cache map (which
of its chunks the page cache holds: worker.stream.pagecache) are made just before its reads are
issued, not all of them first: with mincore, done first for the 12 groups of a 10 GB tier, they kept
every thread idle for the fill's first 80-130 ms (S). The fill's first `threads` requests are at most
an equal share of its first group (`MAP_AHEAD` groups: that many are mapped before the first read,
and the fill maps that far ahead of its issue after), so that all threads read from the start; they
still idled 10-20 ms for the second group's map while the fill's thread asked mincore about it, until
cachestat replaced mincore (AD).

Each registered range is copied to the GPU as a piece of its own (`Filled.pieces`): a copy spanning
two registrations is not promised to be treated as pinned by the driver.

A request whose bytes are all in the page cache (one cachestat per chunk) is read buffered, at
memory speed, instead of O_DIRECT at disk speed, on the reader's page-cache pool: as many threads as
the process has CPUs (worker.stream.ssd), since such a read is a copy plus the destination's page
faults, bound by cores, not by the disk. Consecutive cached chunks of one registered range go as one
request of up to `CACHED_READ` bytes (less than a chunk where it is), read in one system call: a
reader thread returning from a read has to win the GIL back, and while another thread holds it (the compile-ahead import thread runs
during the fill) each return waits up to the interpreter's switch interval, so at memory speed a
fill of many short reads spends much of its time waiting to resume rather than copying
(benchmarks/cpu_fill.py's `busy` variants measure that). Large requests end unevenly, though: the
fill is over when its last one is, and with every request as large, the last wave leaves most of the
threads idle for up to a request's time. So toward the end the requests shrink, each at most the
bytes still to issue over `TAPER` × the pool's threads (guided self-scheduling), down to
`TAPER_MIN`: the threads run out of work within a small request of each other (setup_h200/v7, R:
the last tenth of a 10 GB fill had 3-4 of 16 threads reading without it, 6-8 with it). On a CPU
device nothing is pinned and the fill is the reads alone.

`release` tells the run when the host is free for the compiler's import (worker.model.compile_cache):
a fill from the page cache is bound by the cores and their memory, and with that import beside it
went at 0.59-0.65 of the page cache's rate into fresh memory, without it at 0.71-0.93
(benchmarks/results/setup_h200/v7, N); so the import waits for such a fill to end, while a fill
mostly from the disk, bound by the disk and seconds long, releases the host once its reads are issued.

A failed read cancels the reads not yet started and waits for those in flight (their buffers must
outlive them) before raising; the caller's `HostArena.close()` then unregisters what was pinned.

`behind=True` returns as soon as the reads are issued and pins behind them on a thread of its own:
each registered range's `ready` future completes once it is read and pinned, so a consumer can copy a
group out while later ones are still read (the CPU tier then fills under the model build and the
warm-up's compile, `StreamConfig.fill_behind`); `Filled.done` completes with the whole fill, its
stats final then. A failure sets it and every range not yet ready; `cancel()` stops a fill in flight.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import (
    FIRST_EXCEPTION,
    Future,
    ThreadPoolExecutor,
    wait,
)
from dataclasses import dataclass, field
from typing import Any

import torch

from worker.pack.groups import GroupKey
from worker.stream.hostmem import HostArena
from worker.stream.registrar import Registrar
from worker.stream.ssd import SSDReader
from worker.units import MiB

log = logging.getLogger(__name__)

PIN_UNIT = 256 * MiB  # bytes per cudaHostRegister call: few calls, and little left to pin after the last read
PIN_THREADS = 0  # 0: the reader thread that completes a range registers it; N: N threads of their own do
PIN_SLOTS = 1  # with PIN_THREADS 0: registrations at once, the rest queued (worker.stream.registrar); 0: no limit
CACHED_READ = 128 * MiB  # most bytes per page-cache request (and system call): few returns to the GIL
TAPER = 2  # a page-cache request is at most the bytes left to issue / (TAPER × threads); 0: no taper (nor head)
TAPER_MIN = 8 * MiB  # the smallest tapered request
PRESTART = True  # the page-cache pool's threads started before the first read (False: one per read issued)
MAP_AHEAD = 1  # groups whose buffer and page-cache map are made before the first read (and kept ahead after)
TAPER_ALIGN = 2 * MiB  # tapered requests are whole huge pages (the CPU tier's buffers are backed by them)


@dataclass
class _Unit:
    view: torch.Tensor  # (n,) uint8: the range registered in one call
    reads: list[Future] = field(default_factory=list)
    ready: Future = field(default_factory=Future)  # read and registered
    # registered by a reader thread (worker.stream.registrar), then `ready` is always set: the fill's
    # failure, shared by its units (what a unit whose read was cancelled gets); None where others register
    failure: list[BaseException] | None = None


@dataclass
class FillStats:
    bytes: int = 0
    seconds: float = 0.0
    page_cache_bytes: int = 0  # read buffered because the page cache held them
    pin_seconds: float = 0.0  # summed over the register calls (they overlap the reads)
    pinned: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The shape of io_stats()["cpu_fill"]."""
        return {"bytes": self.bytes, "seconds": self.seconds,
                "gbps": self.bytes / self.seconds / 1e9 if self.seconds > 0 else None,
                "page_cache_bytes": self.page_cache_bytes, "pin_seconds": self.pin_seconds, "pinned": self.pinned}


@dataclass
class Filled:
    host: dict[GroupKey, torch.Tensor]  # key → (extent,) uint8, the group's whole extent
    unit: int  # bytes per registered range (the last of a group may be shorter)
    stats: FillStats  # final once `done` completed
    units: dict[GroupKey, list[_Unit]] = field(default_factory=dict)
    done: Future = field(default_factory=Future)
    _thread: threading.Thread | None = None

    def pieces(self, key: GroupKey) -> list[tuple[int, torch.Tensor, Future]]:
        """(offset in the group, view, ready) per registered range of the group's buffer."""
        buf = self.host[key]
        return [(o, buf[o:o + self.unit], u.ready) for o, u in zip(range(0, buf.numel(), self.unit), self.units[key])]

    def cancel(self) -> None:
        """Stop a fill still in flight (reads not started are dropped, those in flight waited for) and
        wait for its pinning thread: its buffers may be freed after this."""
        if self._thread is not None:
            _drain([u for us in self.units.values() for u in us])
            self._thread.join()


def unit_bytes(chunk: int) -> int:
    """The registered range: a whole number of read requests, so no request straddles two."""
    return max(1, PIN_UNIT // chunk) * chunk


def fill(manifest, keys: list[GroupKey], arena: HostArena, reader: SSDReader, page_cache: bool = True,
         pin_threads: int | None = None, huge_pages: bool = False, populate: bool = False, behind: bool = False,
         cached_read: int | None = None, release: Callable[[], None] | None = None) -> Filled:
    """Each group's extent in its own arena buffer, read and pinned (with `behind`, being read and pinned:
    see the module's docstring).

    `page_cache=False` reads everything O_DIRECT; `pin_threads` (default `PIN_THREADS`) ≥ 1 registers
    ranges on threads of their own, in issue order (for benchmarks/cpu_fill.py: the fill before the
    reader threads registered, and whether the driver lets registrations on several threads overlap);
    `huge_pages` backs the buffers with 2 MiB pages (the CPU tier asks for them: fewer page faults
    pay when the bytes come from the page cache). `populate` reads the ranges that are not in the page
    cache buffered too, so they are there for the next fill (`StreamConfig.warm_page_cache`). `release` is
    called once the fill no longer needs the host to itself: when it ends, or as soon as its reads are
    issued where most of them go to the disk (or it runs `behind`); see the module's docstring."""
    stats = FillStats(pinned=arena.pins)
    t0 = time.perf_counter()
    host: dict[GroupKey, torch.Tensor] = {}
    by_key: dict[GroupKey, list[_Unit]] = {}
    unit = unit_bytes(reader.chunk)
    cached_read = CACHED_READ if cached_read is None else cached_read
    pin_threads = PIN_THREADS if pin_threads is None else pin_threads
    registrar = Registrar(arena.pin, PIN_SLOTS) if pin_threads == 0 else None  # the readers register
    failure: list[BaseException] = []  # set before a failed fill cancels its reads (`_drain`)
    sizes = _Sizes(left=sum(manifest.group(k.name).nbytes for k in keys), threads=reader.cached_threads)

    def mapped(key: GroupKey):
        g = manifest.group(key.name)
        host[key] = arena.empty(g.nbytes, pin=False, huge_pages=huge_pages)  # (extent,) pageable for now
        cached = reader.cached_chunks(g.offset, g.nbytes) if page_cache else [False] * -(-g.nbytes // reader.chunk)
        return key, g, cached

    try:
        if page_cache and reader.direct and PRESTART:
            reader.start_cached_threads()  # see the module's docstring
        depth = max(1, MAP_AHEAD)
        ahead = [mapped(k) for k in keys[:depth]]  # groups mapped before the first read; the head splits them
        sizes.head = -(-sum(g.nbytes for _, g, _ in ahead) // sizes.threads)
        for n in range(len(keys)):
            key, g, cached = ahead.pop(0)
            by_key[key] = _issue(reader, g.offset, host[key], unit, cached, stats, populate, cached_read, sizes)
            if n + depth < len(keys):
                ahead.append(mapped(keys[n + depth]))
            stats.bytes += g.nbytes
            if registrar is not None:
                for u in by_key[key]:
                    registrar.when_read(u, failure)
    except BaseException as e:
        _drain([u for us in by_key.values() for u in us], e)
        raise
    out = Filled(host, unit, stats, by_key)
    units = [u for us in by_key.values() for u in us]
    if release is not None and (behind or stats.page_cache_bytes * 2 < stats.bytes):
        release()  # bound by the disk, or overlapping the build anyway: what runs beside it costs it little
    if behind:
        out._thread = threading.Thread(target=_finish, args=(out, units, arena, pin_threads, t0, release, registrar),
                                       name="cpu-fill", daemon=True)
        out._thread.start()
        return out
    _finish(out, units, arena, pin_threads, t0, release, registrar)
    out.done.result()  # raises what the fill raised
    return out


def _finish(out: Filled, units: list[_Unit], arena: HostArena, threads: int, t0: float,
            release: Callable[[], None] | None = None, registrar: Registrar | None = None) -> None:
    """Pin behind the reads; then the stats and `done` (with the failure, if any, which every range not
    yet ready gets too); then `release`, whatever happened."""
    try:
        _settle(out, units, arena, threads, t0, registrar)
    finally:
        if release is not None:
            release()


def _settle(out: Filled, units: list[_Unit], arena: HostArena, threads: int, t0: float,
            registrar: Registrar | None = None) -> None:
    try:
        if registrar is not None:
            _wait_ready(units)  # the reader threads register
            out.stats.pin_seconds = registrar.seconds
        else:
            out.stats.pin_seconds = _pin_behind(units, arena, threads)
    except BaseException as e:
        _drain(units, e)
        for u in units:
            if not u.ready.done():
                u.ready.set_exception(e)
        out.done.set_exception(e)
        return
    stats = out.stats
    stats.seconds = time.perf_counter() - t0
    log.info("CPU tier filled: %.2f GB in %.2f s (%.2f GB/s; %.2f GB from the page cache; pinning %.2f s)",
             stats.bytes / 1e9, stats.seconds, stats.bytes / 1e9 / max(stats.seconds, 1e-9),
             stats.page_cache_bytes / 1e9, stats.pin_seconds)
    out.done.set_result(stats)


@dataclass
class _Sizes:
    """How large the next page-cache request may be (see the module's docstring)."""
    left: int  # bytes of the fill not yet issued
    threads: int  # the page-cache pool's
    head: int = 0  # the most bytes of each of the fill's first `threads` requests (a share of its first groups)
    issued: int = 0  # requests issued so far

    def cap(self) -> int:
        if TAPER <= 0:
            return self.left
        cap = max(TAPER_MIN, _align_up(-(-self.left // (TAPER * max(1, self.threads)))))
        if self.issued < self.threads and self.head:
            cap = min(cap, max(TAPER_MIN, _align_up(self.head)))
        return cap

    def take(self, n: int) -> None:
        self.left -= n
        self.issued += 1


def _align_up(n: int) -> int:
    return -(-n // TAPER_ALIGN) * TAPER_ALIGN


def _issue(reader: SSDReader, offset: int, buf: torch.Tensor, unit: int, cached: list[bool],
           stats: FillStats, populate: bool, cached_read: int, sizes: _Sizes) -> list[_Unit]:
    """Submit every read of one extent, grouped by the registered range they fill; consecutive
    chunks of one range that are in the page cache (`cached`, one flag per chunk) go as requests of
    up to `cached_read` bytes, smaller at the fill's start and toward its end (`sizes`; see the
    module's docstring). Uncached requests stay whole chunks at chunk offsets, as O_DIRECT needs: a
    cached run ends at a chunk's end or the range's."""
    chunk = reader.chunk
    nbytes = buf.numel()
    out = []
    for u in range(0, nbytes, unit):
        end = min(u + unit, nbytes)
        piece = _Unit(buf[u:end])
        o = u
        while o < end:
            if cached[o // chunk]:
                run = o  # the end of the cached chunks from o on, within this range
                while run < end and cached[run // chunk]:
                    run = min(end, (run // chunk + 1) * chunk)
                n = min(run - o, cached_read if cached_read > 0 else chunk, sizes.cap())
                stats.page_cache_bytes += n
                buffered = True
            else:
                n = min(chunk, end - o)
                buffered = populate
            piece.reads.append(reader.read(offset + o, n, buf[o:o + n], buffered=buffered))
            sizes.take(n)
            o += n
        out.append(piece)
    return out


def _wait_ready(units: list[_Unit]) -> None:
    """Until every unit is read and registered; raises the first failure."""
    done, _ = wait([u.ready for u in units], return_when=FIRST_EXCEPTION)
    for f in done:
        if f.exception() is not None:
            raise f.exception()


def _pin_behind(units: list[_Unit], arena: HostArena, threads: int) -> float:
    """Register each unit once its reads are done, in issue order; seconds spent registering."""
    def pin(unit: _Unit) -> float:
        for f in unit.reads:
            f.result()
        seconds = arena.pin(unit.view)
        unit.ready.set_result(None)
        return seconds

    if threads <= 1:
        return sum(pin(u) for u in units)
    with ThreadPoolExecutor(threads, thread_name_prefix="cpu-fill-pin") as pool:
        futures = [pool.submit(pin, u) for u in units]
        try:
            return sum(f.result() for f in futures)
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _drain(units: list[_Unit], error: BaseException | None = None) -> None:
    """After a failure (`error`, what the units of cancelled reads get) or on `cancel()`: cancel reads
    not started, wait for those in flight (their buffers must outlive them) and for the registrations
    their threads run after them (`ready` is set after)."""
    shared = units[0].failure if units else None  # one list for all of a fill's units, or None for all
    if error is not None and shared is not None and not shared:
        shared.append(error)
    reads = [f for u in units for f in u.reads]
    for f in reads:
        f.cancel()
    wait(reads)
    if shared is not None:
        wait([u.ready for u in units])
