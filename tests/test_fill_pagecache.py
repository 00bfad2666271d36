"""The CPU tier's fill from the page cache (worker.stream.fill, worker.stream.pagecache): which
requests are cached, buffered or O_DIRECT, the page-cache pool, and how few system calls a cached
range takes. The fill's bytes, pinning and failures: tests/test_cpu_fill.py."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from test_cpu_fill import PAGE, _drop_from_page_cache, _keys

from worker.pack.cache import ensure_pack
from worker.stream import fill as fill_mod
from worker.stream.hostmem import HostArena
from worker.stream.pagecache import cached_bytes, is_cached
from worker.stream.ssd import SSDReader


@pytest.fixture(scope="module")
def pack(make_ckpt):
    return ensure_pack(str(make_ckpt(layers=4)))


@pytest.fixture(params=["cachestat", "mincore"])
def backend(request, monkeypatch):
    """Both ways of asking the page cache (worker.stream.pagecache): cachestat where the kernel has it
    (Linux 6.5), mincore otherwise; each must give the same answers."""
    from worker.stream import pagecache

    if request.param == "mincore":
        monkeypatch.setattr(pagecache, "CACHESTAT", False)
        return request.param
    fd = os.open(__file__, os.O_RDONLY)
    try:
        if pagecache._cached_pages(fd, 0, 1) is None:
            pytest.skip("no cachestat on this kernel")
    finally:
        os.close(fd)
    return request.param


def test_page_cache_decides_buffered_or_direct(pack, tmp_path, backend):
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(64 * PAGE))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, 64 * PAGE, 0)
        assert cached_bytes(fd, 0, 64 * PAGE) == 64 * PAGE
        assert cached_bytes(fd, 100, 5000) == 5000  # clipped to the range inside its pages
        assert is_cached(fd, PAGE, 3 * PAGE)
        _drop_from_page_cache(path)
        assert cached_bytes(fd, 0, 64 * PAGE) == 0
        assert not is_cached(fd, 0, PAGE)
    finally:
        os.close(fd)

    _drop_from_page_cache(pack.blob_path)
    reader = SSDReader(pack.blob_path, threads=2, chunk=PAGE)
    arena = HostArena(pin=False)
    try:
        if reader.direct:  # O_DIRECT reads leave the page cache as it was: nothing cached
            cold = fill_mod.fill(pack.manifest, _keys(pack), arena, reader).stats
            assert cold.page_cache_bytes == 0
        pack.blob_path.read_bytes()  # now all of it is cached
        warm = fill_mod.fill(pack.manifest, _keys(pack), arena, reader).stats
        assert warm.page_cache_bytes == warm.bytes
    finally:
        arena.close()
        reader.close()


def test_cached_chunks_says_which_requests_are_all_in_the_page_cache(tmp_path, backend):
    from worker.stream.pagecache import cached_chunks

    path = tmp_path / "blob"
    path.write_bytes(os.urandom(64 * PAGE))
    _drop_from_page_cache(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, 8 * PAGE, 16 * PAGE)  # pages 16..23 cached, nothing else
        # requests of 3 pages from page 14 on: [14,17) [17,20) [20,23) [23,26) [26,28)
        assert cached_chunks(fd, 14 * PAGE, 14 * PAGE, 3 * PAGE) == [False, True, True, False, False]
        assert cached_chunks(fd, 16 * PAGE + 100, 2 * PAGE, PAGE) == [True, True]  # unaligned: 2 pages each
        assert cached_chunks(fd, 23 * PAGE + 100, PAGE, PAGE) == [False]  # its second page is not cached
        assert cached_chunks(fd, 0, 0, PAGE) == []
        assert is_cached(fd, 16 * PAGE + 1, 8 * PAGE - 1) and not is_cached(fd, 16 * PAGE, 8 * PAGE + 1)
    finally:
        os.close(fd)


def test_without_cachestat_the_page_cache_is_asked_with_mincore(tmp_path, monkeypatch):
    """An older kernel (ENOSYS) or a seccomp filter (EPERM): the same answers, and cachestat is not
    tried again."""
    from worker.stream import pagecache

    monkeypatch.setattr(pagecache, "_SYS_CACHESTAT", 10**6)  # no such system call: ENOSYS
    monkeypatch.setattr(pagecache, "_cachestat_works", [True])
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(8 * PAGE))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, 8 * PAGE, 0)
        assert pagecache.cached_chunks(fd, 0, 8 * PAGE, 3 * PAGE) == [True, True, True]
        assert pagecache._cachestat_works == [False] and is_cached(fd, 0, 8 * PAGE)
    finally:
        os.close(fd)


def test_page_cache_reads_run_on_their_own_wider_pool(pack, monkeypatch):
    """Buffered (page-cache) reads on `cached_threads` threads of their own, O_DIRECT ones on the
    disk's `threads`; the bytes are the blob's either way."""
    from worker.pack.blob import aligned_empty

    names = []
    real = SSDReader._read
    monkeypatch.setattr(SSDReader, "_read", lambda self, *a: names.append(threading.current_thread().name)
                        or real(self, *a))
    reader = SSDReader(pack.blob_path, threads=2, chunk=PAGE, cached_threads=5)
    try:
        if not reader.direct:
            pytest.skip("O_DIRECT refused here: every read is buffered, on the one pool")
        g = pack.manifest.group(_keys(pack)[0].name)
        a, b = aligned_empty(g.nbytes), aligned_empty(g.nbytes)  # O_DIRECT wants 4 KiB-aligned buffers
        pack.blob_path.read_bytes()  # cached
        for f in [reader.read(g.offset + o, PAGE, a[o:o + PAGE], buffered=True) for o in range(0, g.nbytes, PAGE)]:
            f.result()
        cached, names[:] = set(names), []
        for f in reader.read_split(g.offset, g.nbytes, b):
            f.result()
    finally:
        reader.close()
    assert all(n.startswith("cache-read") for n in cached) and len(cached) <= reader.cached_threads == 5
    assert all(n.startswith("ssd-read") for n in names) and len(set(names)) <= 2
    assert torch.equal(a, b) and torch.equal(a, pack.read_raw(_keys(pack)[0]))


def test_cached_chunks_of_a_range_go_as_few_requests_each_one_system_call(pack, monkeypatch):
    """Consecutive cached chunks of one registered range are one request of up to `cached_read` bytes,
    read by one preadv; uncached chunks stay one O_DIRECT request each, and no request crosses a range
    (it is registered once its own reads are done). The bytes are the blob's either way."""
    import worker.pack.blob as blob_mod

    monkeypatch.setattr(fill_mod, "PIN_UNIT", 8 * PAGE)
    monkeypatch.setattr(blob_mod, "CHUNK", PAGE)  # a read of more than a page is split, unless it says otherwise
    calls: list[tuple[int, int]] = []  # (fd, bytes asked) per preadv
    real_preadv = os.preadv
    monkeypatch.setattr(blob_mod.os, "preadv", lambda fd, bufs, off: calls.append((fd, len(bufs[0])))
                        or real_preadv(fd, bufs, off))
    keys = _keys(pack)
    g = pack.manifest.group(keys[0].name)
    assert g.nbytes > 8 * PAGE, "the test wants a group of several ranges"
    _drop_from_page_cache(pack.blob_path)
    reader = SSDReader(pack.blob_path, threads=2, chunk=PAGE)
    if not reader.direct:
        reader.close()
        pytest.skip("O_DIRECT refused here: the page cache cannot be told from the disk")
    fd = os.open(pack.blob_path, os.O_RDONLY)
    os.pread(fd, 5 * PAGE, g.offset)  # the group's chunks 0..4 cached, chunk 5 on, not
    os.close(fd)
    arena = HostArena(pin=False)
    sizes = []
    real_read = SSDReader.read
    monkeypatch.setattr(SSDReader, "read", lambda self, off, n, out, buffered=False: sizes.append((n, buffered))
                        or real_read(self, off, n, out, buffered))
    try:
        filled = fill_mod.fill(pack.manifest, keys[:1], arena, reader, cached_read=3 * PAGE)
        assert torch.equal(filled.host[keys[0]], pack.read_raw(keys[0]))
    finally:
        arena.close()
        reader.close()
    assert sizes[:3] == [(3 * PAGE, True), (2 * PAGE, True), (PAGE, False)]  # cap 3; then range [0, 8) uncached
    assert all(not b for _, b in sizes[2:]) and sum(n for n, _ in sizes) == g.nbytes
    buffered_calls = [n for fd_, n in calls if fd_ == reader.buffered_fd]
    assert sorted(buffered_calls) == [2 * PAGE, 3 * PAGE]  # one system call per page-cache request


def _recorded_fill(pack, monkeypatch, keys, reader, **kw):
    """The fill's requests as (offset in the blob, bytes, buffered), and its buffers."""
    sizes: list[tuple[int, int, bool]] = []
    real_read = SSDReader.read
    monkeypatch.setattr(SSDReader, "read", lambda self, off, n, out, buffered=False: sizes.append((off, n, buffered))
                        or real_read(self, off, n, out, buffered))
    arena = HostArena(pin=False)
    try:
        filled = fill_mod.fill(pack.manifest, keys, arena, reader, **kw)
        for k in keys:
            assert torch.equal(filled.host[k], pack.read_raw(k))
    finally:
        arena.close()
    monkeypatch.setattr(SSDReader, "read", real_read)
    return sizes


def test_page_cache_requests_shrink_toward_the_fills_end(pack, monkeypatch):
    """Each page-cache request is at most the bytes still to issue over TAPER x the pool's threads (and
    at least TAPER_MIN), so the threads run dry within a small request of each other; TAPER = 0 keeps
    every request as large as the range and `cached_read` allow. The bytes are the blob's either way."""
    monkeypatch.setattr(fill_mod, "PIN_UNIT", 1 << 30)  # one range per group: only the taper splits them
    monkeypatch.setattr(fill_mod, "TAPER_MIN", PAGE)
    monkeypatch.setattr(fill_mod, "TAPER_ALIGN", PAGE)
    keys = _keys(pack)
    pack.blob_path.read_bytes()  # all of it cached
    reader = SSDReader(pack.blob_path, threads=2, chunk=2 * PAGE, cached_threads=3)
    try:
        tapered = _recorded_fill(pack, monkeypatch, keys, reader, cached_read=1 << 30)
        monkeypatch.setattr(fill_mod, "TAPER", 0)
        whole = _recorded_fill(pack, monkeypatch, keys, reader, cached_read=1 << 30)
    finally:
        reader.close()
    total = sum(pack.manifest.group(k.name).nbytes for k in keys)
    assert [n for _, n, _ in whole] == [pack.manifest.group(k.name).nbytes for k in keys]  # one request per group
    assert all(b for _, _, b in tapered) and sum(n for _, n, _ in tapered) == total
    left = total
    for _, n, _ in tapered:
        assert n <= max(PAGE, -(-left // (2 * 3) // PAGE) * PAGE), (n, left)
        left -= n
    assert len(tapered) > 2 * len(whole) and tapered[-1][1] == PAGE  # it split, down to the smallest request


def test_a_tapered_run_leaves_the_uncached_requests_whole_chunks(pack, monkeypatch):
    """O_DIRECT wants chunk offsets: a cached run cut by the taper still ends where its chunks do, so
    the uncached requests after it start on a chunk and are a chunk long (or the group's end)."""
    monkeypatch.setattr(fill_mod, "PIN_UNIT", 1 << 30)
    monkeypatch.setattr(fill_mod, "TAPER_MIN", PAGE)
    monkeypatch.setattr(fill_mod, "TAPER_ALIGN", PAGE)
    keys = _keys(pack)[:1]
    g = pack.manifest.group(keys[0].name)
    chunk = 4 * PAGE
    assert g.nbytes > 8 * chunk, "the test wants a group of many chunks"
    _drop_from_page_cache(pack.blob_path)
    reader = SSDReader(pack.blob_path, threads=2, chunk=chunk, cached_threads=16)
    try:
        if not reader.direct:
            pytest.skip("O_DIRECT refused here: the page cache cannot be told from the disk")
        fd = os.open(pack.blob_path, os.O_RDONLY)
        os.pread(fd, 5 * chunk, g.offset)  # chunks 0..4 cached, the rest not
        os.close(fd)
        sizes = _recorded_fill(pack, monkeypatch, keys, reader, cached_read=1 << 30)
    finally:
        reader.close()
    cached = [(o - g.offset, n) for o, n, b in sizes if b]
    direct = [(o - g.offset, n) for o, n, b in sizes if not b]
    assert sum(n for _, n in cached) == 5 * chunk and len(cached) > 1  # the run of 5 chunks, cut by the taper
    assert direct[0][0] == 5 * chunk and all(o % chunk == 0 and n == min(chunk, g.nbytes - o) for o, n in direct)


def test_every_thread_is_running_and_reading_from_the_first_requests(pack, monkeypatch):
    """The page-cache pool's threads are all started before the first read (a thread's start maps its
    stack, which waits behind the readers' page faults: on the H200 the first wave started 3 ms a
    read), and the fill's first `threads` requests split its first group evenly, so every thread has
    a read while the second group's buffer and map are made."""
    monkeypatch.setattr(fill_mod, "TAPER_MIN", PAGE)
    monkeypatch.setattr(fill_mod, "TAPER_ALIGN", PAGE)
    threads_seen: list[int] = []
    real_read = SSDReader._read

    def read(self, *a):
        threads_seen.append(len(self._cached_pool._threads))
        return real_read(self, *a)

    monkeypatch.setattr(SSDReader, "_read", read)
    keys = _keys(pack)
    pack.blob_path.read_bytes()  # all of it cached
    reader = SSDReader(pack.blob_path, threads=2, chunk=PAGE, cached_threads=6)
    if not reader.direct:
        reader.close()
        pytest.skip("O_DIRECT refused here: every read is buffered, on the one pool")
    try:
        sizes = _recorded_fill(pack, monkeypatch, keys, reader, cached_read=1 << 30)
    finally:
        reader.close()
    assert set(threads_seen) == {6}
    first = pack.manifest.group(keys[0].name)
    share = -(-first.nbytes // 6)  # the first group's equal share, in whole pages
    share = -(-share // PAGE) * PAGE
    head = [n for o, n, _ in sizes if first.offset <= o < first.offset + first.nbytes]
    assert sizes[0][0] == first.offset and sum(head) == first.nbytes
    assert len(head) == -(-first.nbytes // share) > 1 and all(n <= share for n in head)


def test_the_pool_is_started_once_even_while_its_threads_are_busy(pack):
    """A second fill on the same reader (its pool's threads may be reading) does not wait for every
    thread to come free: the pool was started once and stays so."""
    import time

    reader = SSDReader(pack.blob_path, threads=2, chunk=PAGE, cached_threads=3)
    gate = threading.Event()
    try:
        reader.start_cached_threads()
        running = threading.Semaphore(0)
        busy = [reader._cached().submit(lambda: running.release() or gate.wait(10)) for _ in range(3)]
        for _ in range(3):
            assert running.acquire(timeout=5)  # every thread taken
        t0 = time.perf_counter()
        reader.start_cached_threads(timeout=5)
        assert time.perf_counter() - t0 < 1
    finally:
        gate.set()
        reader.close()
    assert all(f.result() for f in busy)


def test_page_cache_requests_may_be_smaller_than_a_chunk(pack, monkeypatch):
    """CACHED_READ is the most bytes of a page-cache request, below the O_DIRECT chunk too (the
    registered ranges then complete one after the other instead of in waves of large requests)."""
    monkeypatch.setattr(fill_mod, "TAPER", 0)
    keys = _keys(pack)[:1]
    pack.blob_path.read_bytes()  # all of it cached
    reader = SSDReader(pack.blob_path, threads=2, chunk=8 * PAGE, cached_threads=2)
    try:
        sizes = _recorded_fill(pack, monkeypatch, keys, reader, cached_read=3 * PAGE)
    finally:
        reader.close()
    nbytes = pack.manifest.group(keys[0].name).nbytes
    assert all(b for _, _, b in sizes) and sum(n for _, n, _ in sizes) == nbytes
    assert max(n for _, n, _ in sizes) == 3 * PAGE < reader.chunk


@pytest.mark.parametrize("ahead", [1, 2])
def test_the_fill_maps_map_ahead_groups_before_its_first_read_and_splits_them(pack, monkeypatch, ahead):
    """MAP_AHEAD groups get their buffer and page-cache map before the first read, the fill keeps that
    many mapped ahead of what it issues, and its first requests split those groups evenly."""
    monkeypatch.setattr(fill_mod, "MAP_AHEAD", ahead)
    monkeypatch.setattr(fill_mod, "TAPER_MIN", PAGE)
    monkeypatch.setattr(fill_mod, "TAPER_ALIGN", PAGE)
    keys = _keys(pack)
    groups = [pack.manifest.group(k.name) for k in keys]
    pack.blob_path.read_bytes()  # all of it cached
    # the maps made before each group's first read: that group's and `ahead - 1` more (fewer at the end)
    assert _maps_before_first_reads(pack, monkeypatch, keys) == [min(len(keys), i + ahead) for i in range(len(keys))]
    reader = SSDReader(pack.blob_path, threads=2, chunk=PAGE, cached_threads=4)
    try:
        sizes = _recorded_fill(pack, monkeypatch, keys, reader, cached_read=1 << 30)
    finally:
        reader.close()
    head = groups[:ahead]
    span = (head[0].offset, head[-1].offset + head[-1].nbytes)
    share = -(-sum(g.nbytes for g in head) // 4)
    share = -(-share // PAGE) * PAGE
    in_head = [n for o, n, _ in sizes if span[0] <= o < span[1]]
    assert all(n <= share for n in in_head) and sum(in_head) == sum(g.nbytes for g in head)
    assert 4 <= len(in_head) <= 4 + ahead - 1  # every thread gets a piece (a group's end may cut one short)


def _maps_before_first_reads(pack, monkeypatch, keys) -> list[int]:
    """For each group, how many page-cache maps the fill had made when it issued the group's first read."""
    log: list[tuple[str, int]] = []
    real_chunks, real_read = SSDReader.cached_chunks, SSDReader.read
    monkeypatch.setattr(SSDReader, "cached_chunks",
                        lambda self, off, n: log.append(("map", off)) or real_chunks(self, off, n))
    monkeypatch.setattr(SSDReader, "read", lambda self, off, n, out, buffered=False: log.append(("read", off))
                        or real_read(self, off, n, out, buffered))
    reader = SSDReader(pack.blob_path, threads=2, chunk=PAGE, cached_threads=4)
    arena = HostArena(pin=False)
    try:
        fill_mod.fill(pack.manifest, keys, arena, reader)
    finally:
        arena.close()
        reader.close()
        monkeypatch.setattr(SSDReader, "cached_chunks", real_chunks)
        monkeypatch.setattr(SSDReader, "read", real_read)
    groups = [pack.manifest.group(k.name) for k in keys]
    out = []
    for g in groups:
        first = next(i for i, (kind, off) in enumerate(log) if kind == "read" and g.offset <= off < g.offset + g.nbytes)
        out.append(sum(kind == "map" for kind, _ in log[:first]))
    return out
