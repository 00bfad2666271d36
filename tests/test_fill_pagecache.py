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


def test_page_cache_decides_buffered_or_direct(pack, tmp_path):
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


def test_cached_chunks_says_which_requests_are_all_in_the_page_cache(tmp_path):
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
