"""The embedding table a streaming mode keeps on the host, mapped into the device (worker.stream.host_table):
what is registered, what comes back, and every way the mapping can be refused (the host gather stays).
On a GPU: a streamed engine's table is a device tensor over the host bytes and the logits equal the host
gather's bit for bit."""

from __future__ import annotations

import pytest
import torch

from worker.engine import build_engine
from worker.kv import zerocopy
from worker.model.step import Step
from worker.pack.cache import ensure_pack
from worker.run import resolve_config
from worker.stream import host_table
from worker.stream.hostmem import HostArena


class Pinner:
    def __init__(self, fail: bool = False):
        self.live: dict[int, int] = {}
        self.fail = fail

    def register(self, ptr: int, nbytes: int) -> None:
        if self.fail:
            raise RuntimeError("cudaHostRegister failed (stand-in)")
        self.live[ptr] = nbytes

    def unregister(self, ptr: int) -> None:
        del self.live[ptr]


CUDA = torch.device("cuda", 0)


@pytest.fixture
def table():
    return torch.arange(12 * 8, dtype=torch.float32).view(12, 8)


def test_the_table_is_registered_whole_and_its_device_view_has_its_shape_and_bits(table, monkeypatch):
    seen = []
    monkeypatch.setattr(zerocopy, "device_view", lambda raw, dev: seen.append((raw, dev)) or raw.clone())
    arena = HostArena(pin=True, pinner=Pinner())
    out = host_table.map_host_table(table, arena, CUDA)
    assert arena.pinner.live == {table.data_ptr(): table.numel() * 4}
    raw, dev = seen[0]
    assert raw.dtype == torch.uint8 and raw.data_ptr() == table.data_ptr() and dev == CUDA
    assert out.dtype == table.dtype and out.shape == table.shape and torch.equal(out, table)
    arena.close()
    assert arena.pinner.live == {}  # close() unregisters it


@pytest.mark.parametrize("why", ["cpu device", "on the device", "no pinning", "register fails", "no view",
                                 "not contiguous"])
def test_where_the_mapping_is_refused_the_host_table_itself_comes_back(table, monkeypatch, why):
    monkeypatch.setattr(zerocopy, "device_view", lambda raw, dev: None if why == "no view" else raw.clone())
    arena = HostArena(pin=why != "no pinning", pinner=Pinner(fail=why == "register fails")
                      if why != "no pinning" else None)
    t = table.t() if why == "not contiguous" else table
    dev = torch.device("cpu") if why == "cpu device" else CUDA
    if why == "on the device":
        t = t.to("meta")  # stands in for a table already on the GPU (tied to lm_head)
    assert host_table.map_host_table(t, arena, dev) is t


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_streamed_engine_gathers_from_the_mapped_table_with_the_host_gathers_bits(make_ckpt):
    ckpt = make_ckpt(layers=2, dtype="bfloat16")
    logits, where = {}, {}
    for zero_copy in (True, False):
        cfg = resolve_config({"checkpoints": str(ckpt), "mode": "cpu", "embed_zero_copy": zero_copy,
                              "max_seq_len": 64})
        engine = build_engine(cfg, ensure_pack(ckpt, weights=cfg.weights), CUDA, prompt_tokens=16)
        try:
            where[zero_copy] = engine.weights.resident()["embed_tokens"].device.type
            ids = torch.arange(1, 33, device=CUDA).view(2, 16)
            step = Step(torch.arange(16, device=CUDA).expand(2, 16), 16, (16, 16))
            logits[zero_copy] = engine.model.forward(ids, step, engine.new_cache(2, 64)).cpu()
        finally:
            engine.close()
    assert where == {True: "cuda", False: "cpu"}
    assert torch.equal(logits[True], logits[False])


@pytest.mark.parametrize("host_embeddings", [True, False])
def test_the_load_maps_the_table_it_leaves_on_the_host_on_its_own_thread(make_ckpt, host_embeddings):
    """`Upload(map_table=)` hands the embedding table it keeps on the host to the mapper once that group is
    placed, on the load's thread (behind the model's build), and the group holds what the mapper returned."""
    import threading

    from worker.pack.groups import RESIDENT, GroupKey
    from worker.stream.ssd import SSDReader
    from worker.stream.upload import Upload, device_keys

    pack = ensure_pack(str(make_ckpt(layers=2)))
    calls = []

    def mapper(t):
        calls.append((t.data_ptr(), threading.current_thread().name))
        return t.clone()

    reader = SSDReader(pack.blob_path, threads=2, chunk=1 << 20)
    try:
        up = Upload(pack, device_keys([]), reader, torch.device("cpu"), host_embeddings=host_embeddings,
                    copies=True, map_table=mapper)
        got = up.result()
    finally:
        reader.close()
    table = got[GroupKey(None, RESIDENT)]["embed_tokens"]
    assert torch.equal(table, pack.read_group(GroupKey(None, RESIDENT))["embed_tokens"])
    if host_embeddings:
        assert len(calls) == 1 and calls[0][1] == "upload" and calls[0][0] != table.data_ptr()  # the mapper's
        assert up.stats.embed_map_s >= 0 and up.stats.embed_mapped is False  # a CPU "view" is still the host's
    else:  # the table went to the device buffers with the rest: nothing left on the host to map
        assert calls == [] and up.stats.embed_map_s is None


def test_the_streamer_asks_the_load_to_map_the_table_only_with_embed_zero_copy(table, monkeypatch):
    from types import SimpleNamespace

    from worker.config import StreamConfig
    from worker.stream.streamer import WeightStreamer

    monkeypatch.setattr(zerocopy, "device_view", lambda raw, dev: raw.clone())
    owner = SimpleNamespace(arena=HostArena(pin=True, pinner=Pinner()))
    assert WeightStreamer._table_mapper(owner, StreamConfig(mode="cpu", embed_zero_copy=False), CUDA) is None
    mapper = WeightStreamer._table_mapper(owner, StreamConfig(mode="cpu"), CUDA)  # the default: on
    assert torch.equal(mapper(table), table) and owner.arena.pinner.live == {table.data_ptr(): table.numel() * 4}
