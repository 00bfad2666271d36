"""The CPU tier's fill (worker.stream.fill): bit-exact bytes, pinning behind the reads (on the reader
threads by default), the statistics a run reports, and cleanup when a read or a registration fails;
its page-cache reads: tests/test_fill_pagecache.py.

CUDA's registration is replaced by a recording stand-in (`HostArena(pinner=...)`), so the order
read → register → unregister is checked here on the CPU; the speed is the H200's to measure
(benchmarks/cpu_fill.py).
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from worker.pack.cache import ensure_pack
from worker.pack.groups import KINDS, GroupKey
from worker.run import resolve_config
from worker.stream import fill as fill_mod
from worker.stream import streamer as streamer_mod
from worker.stream.hostmem import HostArena
from worker.stream.plan import place
from worker.stream.ssd import SSDReader
from worker.stream.streamer import WeightStreamer

PAGE = 4096


class RecordingPinner:
    """Registers nothing; records ranges, checks they are disjoint, and can check the bytes a range
    holds when it is registered (its reads must be done by then) or fail on the n-th call."""

    def __init__(self, expect=None, fail_at: int | None = None):
        self.live: dict[int, int] = {}  # ptr → nbytes
        self.calls = 0
        self.expect, self.fail_at = expect, fail_at
        self.lock = threading.Lock()

    def register(self, ptr: int, nbytes: int) -> None:
        with self.lock:
            self.calls += 1
            if self.fail_at is not None and self.calls == self.fail_at:
                raise RuntimeError("cudaHostRegister failed (stand-in)")
            assert all(ptr + nbytes <= p or p + n <= ptr for p, n in self.live.items()), "overlapping registration"
            self.live[ptr] = nbytes
        if self.expect:
            self.expect(ptr, nbytes)

    def unregister(self, ptr: int) -> None:
        with self.lock:
            del self.live[ptr]


@pytest.fixture(scope="module")
def pack(make_ckpt):
    return ensure_pack(str(make_ckpt(layers=4)))


def _keys(pack):
    return [GroupKey(i, k) for i in range(pack.manifest.model_config.num_hidden_layers) for k in KINDS]


def _drop_from_page_cache(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.parametrize("page_cache,pin_threads,huge", [(True, 0, False), (False, 0, False), (True, 1, False),
                                                         (False, 3, False), (True, 2, True)])
def test_fill_is_bit_exact_and_pins_each_range_once_after_its_reads(pack, monkeypatch, page_cache, pin_threads,
                                                                    huge):
    monkeypatch.setattr(fill_mod, "PIN_UNIT", 3 * PAGE)  # several units per group, one short at the end
    want = {k: pack.read_raw(k) for k in _keys(pack)}
    pinner = RecordingPinner()
    arena = HostArena(pin=True, pinner=pinner)
    reader = SSDReader(pack.blob_path, threads=4, chunk=PAGE)  # many requests per unit and per group
    try:
        filled = fill_mod.fill(pack.manifest, _keys(pack), arena, reader, page_cache=page_cache,
                               pin_threads=pin_threads, huge_pages=huge)
        got, stats = filled.host, filled.stats
        for key, buf in got.items():
            assert torch.equal(buf, want[key]), key
            assert buf.data_ptr() % PAGE == 0
            pieces = filled.pieces(key)  # what the GPU tier copies: one registered range each
            assert torch.equal(torch.cat([v for _, v, _ in pieces]), want[key])
            assert all(pinner.live.get(v.data_ptr()) == v.numel() for _, v, _ in pieces)
            assert [o for o, _, _ in pieces] == list(range(0, buf.numel(), 3 * PAGE))
            assert all(ready.done() and ready.exception() is None for _, _, ready in pieces)
        # every byte of every buffer registered exactly once, in units of at most PIN_UNIT
        covered = sorted(pinner.live.items())
        for key, buf in got.items():
            lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel()
            mine = [(p, n) for p, n in covered if lo <= p < hi]
            assert sum(n for _, n in mine) == buf.numel()
            assert all(n <= 3 * PAGE for _, n in mine)
        assert stats.bytes == sum(pack.manifest.group(k.name).nbytes for k in _keys(pack))
        assert stats.pinned and stats.seconds > 0
        d = stats.to_dict()
        assert set(d) == {"bytes", "seconds", "gbps", "page_cache_bytes", "pin_seconds", "pinned"}
        assert d["gbps"] == pytest.approx(stats.bytes / stats.seconds / 1e9)
        if not page_cache:
            assert stats.page_cache_bytes == 0
    finally:
        arena.close()
        reader.close()
    assert pinner.live == {}  # close unregistered everything


def test_ranges_are_registered_only_once_their_bytes_landed(pack, monkeypatch):
    """The stand-in compares each registered range with the pack when it is registered."""
    monkeypatch.setattr(fill_mod, "PIN_UNIT", 2 * PAGE)
    blob = pack.blob_path.read_bytes()
    groups = {pack.manifest.group(k.name).offset: pack.manifest.group(k.name).nbytes for k in _keys(pack)}
    buffers: list[tuple[int, int, torch.Tensor]] = []  # (ptr, blob offset, buf) in allocation order
    offsets = iter(sorted(groups))

    def expect(ptr: int, nbytes: int) -> None:
        base, off, buf = max((b for b in buffers if b[0] <= ptr), key=lambda b: b[0])
        rel = ptr - base
        assert bytes(buf[rel:rel + nbytes].numpy()) == blob[off + rel:off + rel + nbytes]

    pinner = RecordingPinner(expect=expect)
    arena = HostArena(pin=True, pinner=pinner)
    real_empty = arena.empty

    def empty(nbytes, pin=True, huge_pages=False):
        buf = real_empty(nbytes, pin, huge_pages)
        buffers.append((buf.data_ptr(), next(offsets), buf))
        return buf

    monkeypatch.setattr(arena, "empty", empty)
    real_read = SSDReader._read

    def slow(self, *args):  # reads still running when the first units could be registered
        time.sleep(0.002)
        real_read(self, *args)

    monkeypatch.setattr(SSDReader, "_read", slow)
    reader = SSDReader(pack.blob_path, threads=3, chunk=PAGE)
    try:
        keys = sorted(_keys(pack), key=lambda k: pack.manifest.group(k.name).offset)
        fill_mod.fill(pack.manifest, keys, arena, reader, page_cache=False)
    finally:
        arena.close()
        reader.close()
    assert pinner.calls >= len(keys)


@pytest.mark.parametrize("page_cache", [True, False])
def test_by_default_the_reader_thread_that_completes_a_range_registers_it(pack, monkeypatch, page_cache):
    """Not the caller's thread nor one of its own: a chain of wake-ups there, each waiting for the GIL,
    set the pace of a page-cache fill beside the compile-ahead import (worker.stream.fill)."""
    monkeypatch.setattr(fill_mod, "PIN_UNIT", 2 * PAGE)
    threads = []
    pinner = RecordingPinner(expect=lambda ptr, n: threads.append(threading.current_thread().name))
    arena = HostArena(pin=True, pinner=pinner)
    gate = threading.Event()  # no read ends before every one is issued: none is done by the caller's thread
    real_read = SSDReader._read

    def gated(self, *args):
        gate.wait(10)
        real_read(self, *args)

    monkeypatch.setattr(SSDReader, "_read", gated)
    if page_cache:
        pack.blob_path.read_bytes()  # all of it cached, whatever ran before (the packer's writes may not be)
    reader = SSDReader(pack.blob_path, threads=3, chunk=PAGE)
    try:
        filled = fill_mod.fill(pack.manifest, _keys(pack), arena, reader, page_cache=page_cache, behind=True)
        gate.set()
        filled.done.result(10)
        units = sum(len(filled.pieces(k)) for k in _keys(pack))
        assert filled.stats.pin_seconds > 0
    finally:
        gate.set()
        arena.close()
        reader.close()
    assert len(threads) == units > len(_keys(pack))
    assert all(t.startswith("cache-read" if page_cache and reader.direct else "ssd") for t in threads), set(threads)


def test_streamer_reports_the_fill(pack):
    cfg = resolve_config({"checkpoints": "unused", "mode": "cpu"}, where="test")
    n = pack.manifest.model_config.num_hidden_layers
    w = WeightStreamer(pack, place("cpu", n, cfg.stream), cfg.stream, torch.device("cpu"))
    try:
        got = w.io_stats()["cpu_fill"]
        assert got["bytes"] == sum(pack.manifest.group(k.name).nbytes for k in _keys(pack))
        assert got["seconds"] > 0 and got["gbps"] > 0 and got["pinned"] is False
    finally:
        w.close()
    ssd = resolve_config({"checkpoints": "unused", "mode": "ssd"}, where="test")
    w = WeightStreamer(pack, place("ssd", n, ssd.stream), ssd.stream, torch.device("cpu"))
    try:
        assert w.io_stats()["cpu_fill"] is None  # nothing is filled: every pass reads the SSD
    finally:
        w.close()

def test_the_cpu_tier_backs_its_buffers_with_huge_pages(pack, monkeypatch):
    """The engine's fill asks for 2 MiB pages for every buffer of the tier (why: the cpu_fill rows of
    benchmarks/results/README.md, page-cache fills with and without them)."""
    asked = []
    real = HostArena.empty

    def spy(self, nbytes, pin=True, huge_pages=False):
        asked.append(huge_pages)
        return real(self, nbytes, pin, huge_pages)

    monkeypatch.setattr(HostArena, "empty", spy)
    cfg = resolve_config({"checkpoints": "unused", "mode": "cpu"}, where="test")
    n = pack.manifest.model_config.num_hidden_layers
    w = WeightStreamer(pack, place("cpu", n, cfg.stream), cfg.stream, torch.device("cpu"))
    try:
        assert w.io_stats()["cpu_fill"]["bytes"] > 0
    finally:
        w.close()
    assert asked.count(True) == len(_keys(pack)), asked


def failing_reads(monkeypatch, fail_at: int | None, delay_s: float = 0.0) -> tuple[list[int], list[int]]:
    """SSDReader._read with an injected I/O error at the `fail_at`-th read (None: never), each read
    taking at least `delay_s`; returns the live counters [reads running], [reads started]."""
    running, calls, lock = [0], [0], threading.Lock()
    real = SSDReader._read

    def flaky(self, offset, nbytes, out, fd, *call):
        with lock:
            calls[0] += 1
            n = calls[0]
            running[0] += 1
        try:
            time.sleep(delay_s)
            if n == fail_at:
                raise OSError(5, "Input/output error (injected)")
            real(self, offset, nbytes, out, fd, *call)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(SSDReader, "_read", flaky)
    return running, calls


@pytest.mark.parametrize("fail", ["read", "register"])
def test_a_failure_mid_fill_unpins_and_raises(pack, monkeypatch, fail):
    """The streamer's build raises the error; every registered range is unregistered and no read is
    still running into a buffer when it does."""
    monkeypatch.setattr(fill_mod, "PIN_UNIT", PAGE)
    pinner = RecordingPinner(fail_at=5 if fail == "register" else None)
    monkeypatch.setattr(streamer_mod, "HostArena", lambda pin: HostArena(pin=True, pinner=pinner))
    running, _ = failing_reads(monkeypatch, 7 if fail == "read" else None)
    cfg = resolve_config({"checkpoints": "unused", "mode": "cpu", "staging_mb": 1}, where="test")
    n = pack.manifest.model_config.num_hidden_layers
    with pytest.raises((OSError, RuntimeError), match="injected|stand-in"):
        WeightStreamer(pack, place("cpu", n, cfg.stream), cfg.stream, torch.device("cpu"))
    assert running[0] == 0
    assert pinner.calls >= (5 if fail == "register" else 1)
    assert pinner.live == {}


def test_fill_waits_for_reads_in_flight_before_raising(pack, monkeypatch):
    """A failed read must not free or unpin buffers other reads are still writing into: fill returns
    (raises) only once no read is running."""
    running, calls = failing_reads(monkeypatch, 3, delay_s=0.005)
    pinner = RecordingPinner()
    arena = HostArena(pin=True, pinner=pinner)
    reader = SSDReader(pack.blob_path, threads=4, chunk=PAGE)
    try:
        with pytest.raises(OSError, match="injected"):
            fill_mod.fill(pack.manifest, _keys(pack), arena, reader, page_cache=False)
        assert running[0] == 0
        assert calls[0] < sum(pack.manifest.group(k.name).nbytes for k in _keys(pack)) // PAGE  # the rest cancelled
    finally:
        arena.close()
        reader.close()
    assert pinner.live == {}


def test_cpu_mode_copies_each_registered_range_as_its_own_piece(make_ckpt, monkeypatch):
    """Groups split into several registered ranges still give gpu mode's logits bit for bit."""
    from worker.engine import build_engine
    from worker.generate import generate
    from worker.text.checkpoint import load_tokenizer
    from worker.text.prompts import prompt_ids_for

    monkeypatch.setattr(fill_mod, "PIN_UNIT", PAGE)  # one range per 1 MiB read request: 3 per ffn group
    ckpt = make_ckpt(layers=3)
    logits, pieces = {}, []
    for mode in ("gpu", "cpu"):
        cfg = resolve_config({"checkpoints": str(ckpt), "mode": mode, "staging_mb": 1, "temperature": 0,
                              "max_new_tokens": 3, "prompt_len": 24})
        tok = load_tokenizer(cfg.checkpoints)
        ids = prompt_ids_for(tok, cfg)
        engine = build_engine(cfg, ensure_pack(cfg.checkpoints), torch.device("cpu"))
        try:
            if mode == "cpu":
                pieces = [len(engine.weights.providers["cpu"].pieces(GroupKey(0, k))) for k in KINDS]
            cache = engine.new_cache(len(ids), cfg.max_seq_len)
            logits[mode] = generate(engine.model, cache, ids, 3, 0.0, 1.0, 0, (), 0, torch.device("cpu"),
                                    keep_logits=True).logits
        finally:
            engine.close()
    assert max(pieces) > 1
    assert len(logits["cpu"]) == len(logits["gpu"]) > 0
    assert all(torch.equal(a, b) for a, b in zip(logits["cpu"], logits["gpu"]))


@pytest.mark.parametrize("page_cache", [True, False])
def test_the_host_is_released_when_a_cached_fill_ends_or_once_a_disk_fills_reads_are_issued(pack, monkeypatch,
                                                                                            page_cache):
    """From the page cache the fill keeps the host to itself until it ends (the compiler's import waits);
    from the disk it lets the import run beside its reads: released before any read may finish."""
    released = threading.Event()
    at_release: list[int] = []
    done_reads = [0]
    read = SSDReader._read

    def gated(self, *a, **k):
        if not page_cache:
            assert released.wait(10), "a fill from the disk kept the host until its reads were done"
        read(self, *a, **k)
        done_reads[0] += 1

    def release():
        at_release.append(done_reads[0])
        released.set()

    monkeypatch.setattr(SSDReader, "_read", gated)
    arena = HostArena(pin=False)
    reader = SSDReader(pack.blob_path, threads=2, chunk=PAGE)
    try:
        if page_cache:
            with open(pack.blob_path, "rb") as f:  # the whole blob into the page cache
                while f.read(1 << 20):
                    pass
            fill_mod.fill(pack.manifest, _keys(pack), arena, reader, release=release)
            assert len(at_release) == 1 and at_release[0] == done_reads[0] > 0  # after the last read
        else:
            _drop_from_page_cache(pack.blob_path)
            fill_mod.fill(pack.manifest, _keys(pack), arena, reader, page_cache=False, release=release)
            assert at_release[0] == 0 and len(at_release) == 2  # once issued, and again (idempotent) at the end
        monkeypatch.setattr(SSDReader, "_read", lambda *a, **k: (_ for _ in ()).throw(OSError(5, "EIO (stand-in)")))
        at_release.clear()
        with pytest.raises(OSError, match="EIO"):
            fill_mod.fill(pack.manifest, _keys(pack), arena, reader, release=release)
        assert at_release  # a failed fill releases it too
    finally:
        arena.close()
        reader.close()


@pytest.mark.parametrize("slots", [0, 1])
def test_the_readers_register_one_range_at_a_time_by_default(pack, monkeypatch, slots):
    """PIN_SLOTS 1 (the default): registrations beside each other contend in the driver, and a reader
    waiting there reads nothing, so one registers while the others read on (worker.stream.registrar);
    0 lets every reader register its own range at once."""
    import time

    monkeypatch.setattr(fill_mod, "PIN_UNIT", 2 * PAGE)
    monkeypatch.setattr(fill_mod, "PIN_SLOTS", slots)
    now, most, lock = [0], [0], threading.Lock()

    def expect(ptr, n):
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        time.sleep(0.003)
        with lock:
            now[0] -= 1

    arena = HostArena(pin=True, pinner=RecordingPinner(expect=expect))
    reader = SSDReader(pack.blob_path, threads=4, chunk=PAGE, cached_threads=4)
    try:
        filled = fill_mod.fill(pack.manifest, _keys(pack), arena, reader)
        assert all(torch.equal(filled.host[k], pack.read_raw(k)) for k in _keys(pack))
        assert all(ready.done() for k in _keys(pack) for _, _, ready in filled.pieces(k))
    finally:
        arena.close()
        reader.close()
    assert most[0] == 1 if slots == 1 else most[0] > 1
