"""The CPU tier's fill behind the build (worker.stream.fill `behind=True`, `fill_behind`): ranges handed
out once read and pinned while later ones still read, a failure reaching every waiting range, and a
close that stops a fill in flight before its buffers go. Registration is test_cpu_fill's stand-in."""

from __future__ import annotations

import threading

import pytest
import torch

from test_cpu_fill import PAGE, RecordingPinner, _keys
from worker.pack.cache import ensure_pack
from worker.run import resolve_config
from worker.stream import fill as fill_mod
from worker.stream import streamer as streamer_mod
from worker.stream.hostmem import HostArena
from worker.stream.plan import place
from worker.stream.ssd import SSDReader
from worker.stream.streamer import WeightStreamer


@pytest.fixture(scope="module")
def pack(make_ckpt):
    return ensure_pack(str(make_ckpt(layers=4)))


def _gated_reads(monkeypatch, pack):
    """Reads past the first group's extent wait for the returned event: a fill behind is then surely
    still in flight while its first group can already be used."""
    gate = threading.Event()
    first = min(pack.manifest.group(k.name).offset for k in _keys(pack))
    first_end = first + pack.manifest.group(next(k for k in _keys(pack)
                                                 if pack.manifest.group(k.name).offset == first).name).nbytes
    real_read = SSDReader._read

    def gated(self, offset, nbytes, out, fd, *call):  # `call`: a page-cache read's system-call size
        if offset >= first_end:
            gate.wait(timeout=30)
        real_read(self, offset, nbytes, out, fd, *call)

    monkeypatch.setattr(SSDReader, "_read", gated)
    return gate


def test_a_fill_behind_hands_out_each_range_once_it_is_read_and_pinned(pack, monkeypatch):
    monkeypatch.setattr(fill_mod, "PIN_UNIT", 2 * PAGE)
    want = {k: pack.read_raw(k) for k in _keys(pack)}
    gate = _gated_reads(monkeypatch, pack)
    pinner = RecordingPinner()
    arena = HostArena(pin=True, pinner=pinner)
    reader = SSDReader(pack.blob_path, threads=2, chunk=PAGE)
    keys = sorted(_keys(pack), key=lambda k: pack.manifest.group(k.name).offset)
    try:
        filled = fill_mod.fill(pack.manifest, keys, arena, reader, page_cache=False, behind=True)
        assert not filled.done.done()  # returned with its reads issued, not done
        for _, view, ready in filled.pieces(keys[0]):  # the first group is not gated: ready while the rest waits
            ready.result(timeout=30)
            assert pinner.live.get(view.data_ptr()) == view.numel()
        assert torch.equal(filled.host[keys[0]], want[keys[0]])
        assert not filled.done.done() and not filled.pieces(keys[-1])[-1][2].done()
        gate.set()
        stats = filled.done.result(timeout=30)
        assert stats.bytes == sum(pack.manifest.group(k.name).nbytes for k in keys) and stats.seconds > 0
        for key in keys:
            assert torch.equal(filled.host[key], want[key])
            assert all(r.done() for _, _, r in filled.pieces(key))
    finally:
        gate.set()
        arena.close()
        reader.close()
    assert pinner.live == {}


def test_a_fill_behind_that_fails_fails_every_range_not_yet_ready(pack, monkeypatch):
    monkeypatch.setattr(fill_mod, "PIN_UNIT", 2 * PAGE)
    pinner = RecordingPinner(fail_at=2)
    arena = HostArena(pin=True, pinner=pinner)
    reader = SSDReader(pack.blob_path, threads=2, chunk=PAGE)
    keys = sorted(_keys(pack), key=lambda k: pack.manifest.group(k.name).offset)
    try:
        filled = fill_mod.fill(pack.manifest, keys, arena, reader, page_cache=False, behind=True)
        with pytest.raises(RuntimeError, match="stand-in"):
            filled.done.result(timeout=30)
        with pytest.raises(RuntimeError, match="stand-in"):
            filled.pieces(keys[-1])[-1][2].result(timeout=30)  # what a GPU copy waiting on it gets
        filled.cancel()  # the thread has ended: nothing left to stop
    finally:
        arena.close()
        reader.close()
    assert pinner.live == {}
    with pytest.raises(RuntimeError, match="stand-in"):  # the same failure, raised where the fill is not behind
        arena = HostArena(pin=True, pinner=RecordingPinner(fail_at=2))
        reader = SSDReader(pack.blob_path, threads=2, chunk=PAGE)
        try:
            fill_mod.fill(pack.manifest, keys, arena, reader, page_cache=False)
        finally:
            arena.close()
            reader.close()


def test_closing_a_streamer_whose_fill_is_still_behind_stops_it_first(pack, monkeypatch):
    """The buffers of a fill in flight must outlive its reads and its registrations: close() cancels the
    reads not started, waits for the rest and the pinning thread, then unregisters."""
    gate = _gated_reads(monkeypatch, pack)
    pinner = RecordingPinner()
    monkeypatch.setattr(streamer_mod, "HostArena", lambda pin: HostArena(pin=True, pinner=pinner))
    cfg = resolve_config({"checkpoints": "unused", "mode": "cpu", "fill_behind": True, "ssd_readers": 1,
                          "staging_mb": 1}, where="test")
    n = pack.manifest.model_config.num_hidden_layers
    w = WeightStreamer(pack, place("cpu", n, cfg.stream), cfg.stream, torch.device("cpu"))
    tier = w.providers["cpu"]
    assert not tier.filled.done.done() and w.io_stats()["cpu_fill"] is None  # still filling behind
    threading.Timer(0.2, gate.set).start()  # the read in flight finishes a moment after close() began
    w.close()
    assert tier.filled.done.done() and not tier.filled._thread.is_alive()
    assert pinner.live == {}
