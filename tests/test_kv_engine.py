"""The KV cache options through the real engine: generation with blocks offloaded to the CPU or the
SSD equals the all-resident run bit for bit (logits at every step, tokens), alone and under weight
streaming; the run's JSON carries the KV channels and tiers, the floor counts KV traffic, the tracker
is made before the model, and bad budgets are one-line errors naming the field."""

from __future__ import annotations

import types

import pytest
import torch

from worker import engine as engine_mod
from worker.config import KVConfig
from worker.engine import build_engine
from worker.errors import UserError
from worker.generate import generate
from worker.host.roofline import roofline
from worker.kv import tracker as tracker_mod
from worker.kv.factory import KVFactory
from worker.kv.offload import Throttle
from worker.kv.paged import PagedKVCache
from worker.kv.static import StaticKVCache
from worker.pack.cache import ensure_pack
from worker.run import resolve_config, run
from worker.text.prompts import prompt_ids_for
from worker.text.checkpoint import load_tokenizer

CPU = torch.device("cpu")


def _generate(ckpt, rounds=1, **flat):
    cfg = resolve_config({"checkpoints": str(ckpt), "temperature": 0, "max_new_tokens": 10, "prompt_len": 40,
                          "batch_size": 3, "max_seq_len": 64, **flat})
    ids = prompt_ids_for(load_tokenizer(cfg.checkpoints), cfg)
    ids[1], ids[2] = ids[1][:23], ids[2][:7]  # rows of different lengths
    engine = build_engine(cfg, ensure_pack(cfg.checkpoints), CPU)
    try:
        outs = []
        for _ in range(rounds):  # later rounds reuse the cache's buffers
            cache = engine.new_cache(len(ids), cfg.max_seq_len)
            outs.append(generate(engine.model, cache, ids, cfg.max_new_tokens, 0.0, 1.0, 0, (), 0, CPU,
                                 keep_logits=True))
        return outs, cache, engine.io()
    finally:
        engine.close()


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt(layers=3)


@pytest.fixture(scope="module")
def reference(ckpt):
    outs, cache, _ = _generate(ckpt)
    assert isinstance(cache, StaticKVCache)
    return outs[0]


CASES = {
    "cpu-bt4-one-block": dict(kv_offload="cpu", kv_block_tokens=4, kv_gpu_blocks=1),
    "cpu-bt16-one-block": dict(kv_offload="cpu", kv_block_tokens=16, kv_gpu_blocks=1),
    "cpu-bt5-two-blocks-topk-covers": dict(kv_offload="cpu", kv_block_tokens=5, kv_gpu_blocks=2, topk_blk=13),
    "ssd-bt8-two-blocks": dict(kv_offload="ssd", kv_block_tokens=8, kv_gpu_blocks=2),
    "resident-topk-covers": dict(kv_block_tokens=4, topk_blk=16),
    "mixed-weights-cpu-kv": dict(mode="mixed", gpu_cached_layers=1, cpu_cache_layers=1, kv_offload="cpu",
                                 kv_block_tokens=3, kv_gpu_blocks=1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_offloaded_generation_equals_resident_bit_for_bit(ckpt, reference, case):
    outs, cache, io = _generate(ckpt, rounds=2, **CASES[case])
    assert isinstance(cache, PagedKVCache)
    for out in outs:
        assert out.token_ids == reference.token_ids
        assert len(out.logits) == len(reference.logits)
        for step, (a, b) in enumerate(zip(out.logits, reference.logits)):
            assert torch.equal(a, b), f"step {step}: max |diff| {(a - b).abs().max().item():.3e}"
    if CASES[case].get("kv_gpu_blocks"):
        assert io["kv_d2h"]["bytes"] > 0 and io["kv_h2d"]["bytes"] > 0 and io["kv_bytes"]["gpu"] > 0
        tier = CASES[case]["kv_offload"]
        assert io["kv_bytes"]["cpu" if tier == "cpu" else "ssd"] > 0


def test_topk_generation_runs_and_tracks(ckpt, reference):
    outs, cache, io = _generate(ckpt, kv_offload="cpu", kv_block_tokens=4, kv_gpu_blocks=1, topk_blk=3)
    snap = tracker_mod.get_global_tracker().snapshot()
    assert snap["layers"] == 3 and snap["hits"].shape[1] == 3
    steps = len(outs[0].logits) - 1
    assert bool((snap["hits"][:3, :, 0] == steps).all())  # the sink block, at every decode step
    assert len(outs[0].token_ids[0]) == 10
    # k = 3 blocks of a 40+ token row drop most of the context: tokens may differ, logits must
    assert not all(torch.equal(a, b) for a, b in zip(outs[0].logits[1:], reference.logits[1:]))


def test_tracker_is_made_before_the_model_and_sized_from_the_config(ckpt, monkeypatch):
    seen = {}
    real = engine_mod.Llama

    def spy(cfg, weights, device, **kw):
        seen["tracker"] = tracker_mod.get_global_tracker()
        return real(cfg, weights, device, **kw)

    tracker_mod.init_global_tracker(1, 80, 128)  # a stale seed-sized one must be replaced
    monkeypatch.setattr(engine_mod, "Llama", spy)
    cfg = resolve_config({"checkpoints": str(ckpt), "batch_size": 4, "max_seq_len": 100, "kv_block_tokens": 8})
    build_engine(cfg, ensure_pack(cfg.checkpoints), CPU).close()
    t = seen["tracker"]
    assert (t.layers, t.max_batch, t.n_blocks) == (3, 4, 13)


def test_run_json_has_kv_channels_and_floor(ckpt, tmp_path):
    cfg = resolve_config({"checkpoints": str(ckpt), "temperature": 0, "max_new_tokens": 6, "prompt_len": 30,
                          "batch_size": 2, "max_seq_len": 48, "kv_offload": "cpu", "kv_block_tokens": 4,
                          "kv_gpu_blocks": 2, "roofline": False, "out_json": str(tmp_path / "r.json")})
    r = run(cfg)
    io = r["io"]
    for ch in ("kv_h2d", "kv_d2h"):
        assert io[ch]["bytes"] > 0 and io[ch]["busy_s"] > 0 and io[ch]["gbps"] > 0, ch
    m = r["metrics"]
    assert "kv_ssd" not in io and m["kv_cpu_gb"] > 0 and m["kv_gpu_gb"] > 0 and m["kv_ssd_gb"] == 0
    assert m["kv_write_backoffs"] == 0
    # the measured round alone: the prompt's 8 blocks (x 2 rows x 3 layers) written back, no warm-up bytes
    bb = 2 * 2 * 4 * 32 * 4  # K and V x kv heads x tokens x head_dim x float32
    assert io["kv_d2h"]["bytes"] >= 2 * 3 * 8 * bb and io["kv_d2h"]["bytes"] < 2 * 3 * 12 * bb
    assert m["pinned_host_gb"] >= m["kv_cpu_gb"] * 0.99  # the KV tier's pinned memory is counted


def test_floor_counts_kv_traffic(ckpt):
    cfg = resolve_config({"checkpoints": str(ckpt), "kv_offload": "cpu", "kv_block_tokens": 4, "kv_gpu_blocks": 2,
                          "max_seq_len": 256})
    pack = ensure_pack(cfg.checkpoints)
    engine = build_engine(cfg, pack, CPU)
    try:
        probe = {"h2d_gbps": 10.0, "hbm_gbps": 1000.0}
        kv = engine.kv_step_bytes(2, 100)
        token = 2 * 2 * 32 * 4 * 3  # K+V bytes of one position, all 3 layers
        assert kv["hbm"] == 2 * 100 * token and kv["h2d"] == 2 * (25 - 2) * 4 * token
        plain = roofline(pack.manifest, engine.placement, probe, 2, 100, 10.0, 10.0, 4)
        with_kv = roofline(pack.manifest, engine.placement, probe, 2, 100, 10.0, 10.0, 4, kv_step=kv)
        assert with_kv["floor_decode_s"] > plain["floor_decode_s"]
        assert with_kv["kv_step_bytes"] == kv
    finally:
        engine.close()


@pytest.mark.parametrize("flat, msg", [
    (dict(kv_gpu_blocks=0), "kv_gpu_blocks must be >= 1"),
    (dict(kv_gpu_blocks=2), "kv_gpu_blocks=2 needs --kv-offload cpu or ssd"),
    (dict(topk_blk=1), "topk_blk=1 is too small"),
])
def test_bad_kv_config_is_a_clear_error(ckpt, flat, msg):
    with pytest.raises(UserError, match=msg):
        cfg = resolve_config({"checkpoints": str(ckpt), **flat})
        build_engine(cfg, ensure_pack(cfg.checkpoints), CPU)


def test_unusable_budgets_name_the_field(tmp_path):
    cfg = types.SimpleNamespace(num_hidden_layers=80, num_key_value_heads=8, head_dim=128)
    kv = dict(kv_block_tokens=16, kv_gpu_blocks=1)
    with pytest.raises(UserError, match="kv_offload=ssd has no usable spill location: .* is not a directory"):
        KVFactory(cfg, KVConfig(kv_offload="ssd", **kv), CPU, torch.bfloat16, 2048, 1, spill_dir=tmp_path / "nope")
    with pytest.raises(UserError, match="kv_offload=ssd has no usable spill location: .* GB free"):
        KVFactory(cfg, KVConfig(kv_offload="ssd", **kv), CPU, torch.bfloat16, 131072, 4096, spill_dir=tmp_path)
    with pytest.raises(UserError, match="kv_offload=cpu needs .* GB of pinned host memory for batch_size=512"):
        KVFactory(cfg, KVConfig(kv_offload="cpu", **kv), CPU, torch.bfloat16, 131072, 512)


def test_throttle_backs_off_until_a_write_finishes():
    class Ev:
        def __init__(self):
            self.done = False

        def query(self):
            return self.done

        def synchronize(self):
            self.done = True

    evs = [Ev(), Ev(), Ev()]
    slept = []

    def sleep(s):
        slept.append(s)
        if len(slept) == 3:
            evs[0].done = True  # the oldest write lands during the third back-off

    th = Throttle(threshold=2, backoff_ms=16, sleep=sleep)
    th.admit()
    th.add(evs[0])
    th.admit()
    th.add(evs[1])
    th.admit()  # two in flight: backs off 16 ms at a time until one is done
    assert slept == [0.016] * 3 and th.backoffs == 3
    th.add(evs[2])
    th0 = Throttle(threshold=1, backoff_ms=0)  # no back-off time: wait for the oldest instead
    th0.add(evs[1])
    th0.admit()
    assert evs[1].done
