"""`warm_page_cache`: the setup reads (the CPU tier's fill, the device-resident groups' load) leave the
blob's ranges in the page cache for the next run, with the same bytes; off, a cold range is read
O_DIRECT and stays out of it. The SSD tier's streamed reads are not setup reads and stay O_DIRECT."""

from __future__ import annotations

import os

import pytest
import torch
from test_cpu_fill import PAGE, RecordingPinner, _drop_from_page_cache, _keys

from worker.pack.cache import ensure_pack
from worker.pack.groups import GroupKey
from worker.run import resolve_config, run
from worker.stream import fill as fill_mod
from worker.stream.hostmem import HostArena
from worker.stream.pagecache import cached_bytes
from worker.stream.ssd import SSDReader
from worker.stream.upload import Upload, device_keys

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pack(make_ckpt):
    return ensure_pack(str(make_ckpt(layers=3)))


def _cached(pack, keys) -> int:
    fd = os.open(pack.blob_path, os.O_RDONLY)
    try:
        return sum(cached_bytes(fd, pack.manifest.group(k.name).offset, pack.manifest.group(k.name).nbytes)
                   for k in keys)
    finally:
        os.close(fd)


def _direct_reader(pack) -> SSDReader:
    reader = SSDReader(pack.blob_path, threads=3, chunk=16 * PAGE)
    if not reader.direct:
        reader.close()
        pytest.skip("this filesystem refuses O_DIRECT: every read goes through the page cache anyway")
    return reader


@pytest.mark.parametrize("populate", [False, True])
def test_the_fill_leaves_its_ranges_in_the_page_cache_only_when_asked(pack, populate):
    keys = _keys(pack)
    total = sum(pack.manifest.group(k.name).nbytes for k in keys)
    want = {k: pack.read_raw(k) for k in keys}
    _drop_from_page_cache(pack.blob_path)
    assert _cached(pack, keys) < total // 4  # cold (a kernel may keep a page or two)
    reader = _direct_reader(pack)
    arena = HostArena(pin=True, pinner=RecordingPinner())
    try:
        filled = fill_mod.fill(pack.manifest, keys, arena, reader, populate=populate)
        assert all(torch.equal(filled.host[k], want[k]) for k in keys)
        if not populate:  # O_DIRECT reads leave nothing behind for a later group's check to find; buffered
            assert filled.stats.page_cache_bytes < total // 4  # ones may (the kernel reads ahead of them)
    finally:
        arena.close()
        reader.close()
    after = _cached(pack, keys)
    if populate:
        assert after == total
    else:
        assert after < total // 4


@pytest.mark.parametrize("populate", [False, True])
def test_the_resident_load_leaves_its_ranges_in_the_page_cache_only_when_asked(pack, populate):
    keys = device_keys([1])
    total = sum(pack.manifest.group(k.name).nbytes for k in keys)
    _drop_from_page_cache(pack.blob_path)
    reader = _direct_reader(pack)
    try:
        got = Upload(pack, keys, reader, CPU, copies=True, populate=populate).result()
    finally:
        reader.close()
    for key in keys:
        assert all(torch.equal(got[key][name].cpu(), t) for name, t in pack.read_group(key).items()), key
    after = _cached(pack, keys)
    assert (after == total) if populate else (after < total // 4)


def test_a_run_with_warm_page_cache_gives_the_same_tokens_and_a_warm_second_fill(tiny_run, tmp_path):
    """Through the engine (`cpu` mode: the whole model in the CPU tier): a cold run without the option
    leaves the blob cold; the first run with it reads cold and the second finds every byte of its fill
    in the page cache; the tokens are those of the run without it."""
    flat = {**tiny_run, "mode": "cpu"}
    pack = ensure_pack(flat["checkpoints"], pack_dir=flat["pack_dir"])
    _direct_reader(pack).close()
    layers = [GroupKey(i, k) for i in range(pack.manifest.model_config.num_hidden_layers) for k in ("attn", "ffn")]
    total = sum(pack.manifest.group(k.name).nbytes for k in layers)
    _drop_from_page_cache(pack.blob_path)
    base = run(resolve_config(flat))
    assert _cached(pack, layers) < total // 4  # without the option a cold fill leaves the blob cold
    first = run(resolve_config({**flat, "warm_page_cache": True}))
    second = run(resolve_config({**flat, "warm_page_cache": True}))
    assert [o["token_ids"] for o in first["outputs"]] == [o["token_ids"] for o in base["outputs"]]
    assert [o["token_ids"] for o in second["outputs"]] == [o["token_ids"] for o in base["outputs"]]
    assert _cached(pack, layers) == total
    assert second["setup"]["fill_page_cache_bytes"] == second["setup"]["fill_bytes"] > 0  # the first left them warm
    assert first["config"]["stream"]["warm_page_cache"] is True


def test_the_flag_is_a_cli_option_and_off_by_default():
    assert resolve_config({"checkpoints": "x"}).stream.warm_page_cache is False
    assert resolve_config({"checkpoints": "x", "warm_page_cache": True}).stream.warm_page_cache is True
