"""The device-resident groups' load (worker.stream.upload) and the engine build's parts in a run's setup:
the same bytes as the pack, read ahead of the CPU tier's fill on the same reader, a failed read
raised only once no read runs, and `slots_parts` adding up to `slots_s`."""

from __future__ import annotations

import pytest
import torch
from test_cpu_fill import PAGE, RecordingPinner, failing_reads

from worker.pack.cache import ensure_pack
from worker.pack.groups import KINDS, RESIDENT, GroupKey
from worker.run import resolve_config, run
from worker.stream import streamer as streamer_mod
from worker.stream.hostmem import HostArena
from worker.stream.plan import place
from worker.stream.ssd import SSDReader
from worker.stream.streamer import WeightStreamer, device_bytes
from worker.stream.upload import Upload, device_keys

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pack(make_ckpt):
    return ensure_pack(str(make_ckpt(layers=3)))


CUDA = pytest.param("cuda", True, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))


@pytest.mark.parametrize("host_embeddings", [True, False])
@pytest.mark.parametrize("device, copies", [("cpu", False), ("cpu", True), CUDA])  # cpu + copies: the CUDA
@pytest.mark.parametrize("window", [1, 1 << 40])  # path's request-by-request copies; window: one group or all
def test_upload_holds_the_packs_bytes(pack, host_embeddings, device, copies, window):
    dev = torch.device(device, 0) if device == "cuda" else CPU
    reader = SSDReader(pack.blob_path, threads=3, chunk=64 * PAGE + PAGE)  # requests straddle tensors
    try:
        up = Upload(pack, device_keys([0, 2]), reader, dev, host_embeddings=host_embeddings, copies=copies,
                    window=window)
        got = up.result()
    finally:
        reader.close()
    assert list(got) == [GroupKey(None, RESIDENT)] + [GroupKey(i, k) for i in (0, 2) for k in KINDS]
    for key, group in got.items():
        want = pack.read_group(key)
        assert set(want) <= set(group)  # and the fused views of a layer
        assert all(torch.equal(group[name].cpu(), t) for name, t in want.items()), key
        if device == "cuda":  # only an embedding table kept on the host stays there
            on_host = {name for name, t in group.items() if t.device.type == "cpu"}
            assert on_host == ({"embed_tokens"} if key.layer is None and host_embeddings else set()), key
    if copies and (device == "cuda" or not host_embeddings):  # what the streamer sizes its slots by, before the
        assert up.device_bytes() == device_bytes(got.values(), dev)  # load is done (on a CPU device with host
    assert up.stats.bytes == sum(pack.manifest.group(k.name).nbytes for k in got)  # embeddings both are "device")
    assert up.stats.read_s > 0 and up.stats.copy_s >= 0
    sizes = [pack.manifest.group(k.name).nbytes for k in got]
    assert up.stats.peak_host_bytes == (max(sizes) if window == 1 else sum(sizes))
    embed = got[GroupKey(None, RESIDENT)]["embed_tokens"]
    lm_head = got[GroupKey(None, RESIDENT)]["lm_head"]
    shares = embed.untyped_storage().data_ptr() == lm_head.untyped_storage().data_ptr()
    assert shares == (not copies or not host_embeddings)  # one buffer (host, or the extent copied whole)


def test_device_groups_are_read_after_the_fill(pack, monkeypatch):
    """In the reader's queue the CPU tier's reads come first (its rate stays its own), the resident
    group's right after them."""
    offsets = []
    real = SSDReader.read
    monkeypatch.setattr(SSDReader, "read", lambda self, offset, *a, **kw: offsets.append(offset)
                        or real(self, offset, *a, **kw))
    cfg = resolve_config({"checkpoints": "unused", "mode": "cpu", "staging_mb": 1}, where="test")
    w = WeightStreamer(pack, place("cpu", 3, cfg.stream), cfg.stream, CPU)
    w.close()
    res = pack.manifest.group(RESIDENT)
    resident = [o for o in offsets if res.offset <= o < res.offset + res.nbytes]
    assert resident and offsets[-len(resident):] == resident and len(offsets) > len(resident)
    assert w.upload["bytes"] == res.nbytes


def test_a_failed_upload_read_raises_once_no_read_runs(pack, monkeypatch):
    fill_reads = sum(-(-pack.manifest.group(GroupKey(i, k).name).nbytes // (1 << 20)) for i in range(3) for k in KINDS)
    running, calls = failing_reads(monkeypatch, fill_reads + 2, delay_s=0.005)  # the upload's second read
    pinner = RecordingPinner()
    monkeypatch.setattr(streamer_mod, "HostArena", lambda pin: HostArena(pin=True, pinner=pinner))
    cfg = resolve_config({"checkpoints": "unused", "mode": "cpu", "staging_mb": 1}, where="test")
    with pytest.raises(OSError, match="injected"):
        WeightStreamer(pack, place("cpu", 3, cfg.stream), cfg.stream, CPU)
    assert running[0] == 0 and pinner.live == {} and calls[0] >= fill_reads + 2


@pytest.mark.parametrize("mode", ["cpu", "gpu", "mixed"])
def test_a_runs_setup_splits_the_engine_build(tiny_run, mode):
    from worker.host.walltime import SLOTS_PARTS, UPLOAD_KEYS

    res = run(resolve_config({**tiny_run, "mode": mode}))
    setup = res["setup"]
    parts = setup["slots_parts"]
    assert list(parts) == [f"{k}_s" for k in SLOTS_PARTS] + ["upload"]  # one shape for every run
    spans = {k: v for k, v in parts.items() if k != "upload"}
    assert all(v >= 0 for v in spans.values()) and parts["upload_issue_s"] > 0 and parts["upload_wait_s"] > 0
    assert sum(spans.values()) == pytest.approx(setup["slots_s"], abs=0.02)  # the parts add up to the phase
    up = parts["upload"]
    assert list(up) == list(UPLOAD_KEYS)
    pk = ensure_pack(tiny_run["checkpoints"], pack_dir=tiny_run["pack_dir"])
    device_groups = [GroupKey(None, RESIDENT)] + ([GroupKey(i, k) for i in range(2) for k in KINDS]
                                                  if mode == "gpu" else [])
    assert up["bytes"] == sum(pk.manifest.group(k.name).nbytes for k in device_groups)
    if mode == "cpu":
        assert setup["fill_s"] > 0 and parts["ring_s"] == parts["stager_s"] == 0.0
    if mode == "mixed":  # layer 1 streams from the SSD through the stager
        assert parts["stager_s"] > 0


def test_a_reused_engine_reports_no_build(tiny_run):
    from worker.host.reuse import EngineCache

    cache = EngineCache()
    try:
        first, second = (run(resolve_config({**tiny_run, "mode": "cpu"}), reuse=cache) for _ in range(2))
    finally:
        cache.close()
    assert first["setup"]["slots_parts"]["model_s"] is not None and second["reuse"]["reused_engine"]
    parts = second["setup"]["slots_parts"]
    assert all(v is None for k, v in parts.items() if k != "upload") and set(parts["upload"].values()) == {None}


@pytest.mark.parametrize("mode", ["cpu", "gpu"])
def test_the_resident_load_runs_behind_the_model_build(tiny_run, monkeypatch, mode):
    """The engine waits for the device-resident groups only after building the model (the compiler's
    import, seconds on a GPU host), so the load runs behind it; the tokens are the same as a build that
    waits first. `cpu` mode copies here as on a GPU (on a CPU device it would use the host buffers)."""
    from worker.model.llama import Llama

    plain = run(resolve_config({**tiny_run, "mode": mode}))
    events: list[str] = []
    monkeypatch.setattr(streamer_mod, "Upload", lambda *a, **kw: Upload(*a, **{**kw, "copies": True}))
    real_result, real_init = Upload.result, Llama.__init__
    monkeypatch.setattr(Upload, "result", lambda self: events.append("load waited") or real_result(self))
    monkeypatch.setattr(Llama, "__init__", lambda self, *a, **kw: events.append("model built") or real_init(self, *a, **kw))
    res = run(resolve_config({**tiny_run, "mode": mode}))
    assert events == ["model built", "load waited"]
    assert [o["token_ids"] for o in res["outputs"]] == [o["token_ids"] for o in plain["outputs"]]
    parts = res["setup"]["slots_parts"]
    assert parts["upload_wait_s"] > 0 and parts["upload"]["bytes"] == plain["setup"]["slots_parts"]["upload"]["bytes"]


def test_a_build_that_fails_after_starting_the_load_stops_it(tiny_run, monkeypatch):
    """The model build fails while the resident load runs (`gpu` mode defers it on every device): the
    error is the build's, and the load is closed (no read left in flight, its reader closed) before it
    propagates."""
    from worker.engine import build_engine
    from worker.model.llama import Llama

    closed: list[str] = []
    real_close, real_reader_close = Upload.close, SSDReader.close
    monkeypatch.setattr(Upload, "close", lambda self: closed.append("load") or real_close(self))
    monkeypatch.setattr(SSDReader, "close", lambda self: closed.append("reader") or real_reader_close(self))

    def broken(self, *a, **kw):
        raise RuntimeError("model build failed")

    monkeypatch.setattr(Llama, "__init__", broken)
    cfg = resolve_config({**tiny_run, "mode": "gpu"})
    with pytest.raises(RuntimeError, match="model build failed"):
        build_engine(cfg, ensure_pack(cfg.checkpoints, pack_dir=cfg.pack_dir), CPU)
    assert closed[:2] == ["load", "reader"]
