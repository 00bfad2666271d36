"""The paged KV cache attends exactly like `StaticKVCache` (bit for bit) when nothing is dropped.

Driven directly with random q/k/v through a prefill and many decode steps, so every combination of
block size, GPU budget (down to one block), host tier (pinned CPU, SSD spill), batch of mixed
lengths and dtype runs in milliseconds; `test_kv_engine.py` does the same through the real model.
"""

from __future__ import annotations

import types

import pytest
import torch

from worker.config import KVConfig
from worker.kv.factory import KVFactory
from worker.kv.static import StaticKVCache
from worker.model.step import Step

DEV = torch.device("cpu")
CFG = types.SimpleNamespace(num_hidden_layers=3, num_key_value_heads=2, head_dim=8, num_attention_heads=4)


def drive(cache, lens: list[int], steps: int, dtype=torch.float32, seed: int = 0, pass_lens: bool = False,
          kv_len=None) -> list[torch.Tensor]:
    """Prefill right-padded rows of `lens`, then `steps` decode steps; the attention outputs of each call."""
    g = torch.Generator().manual_seed(seed)
    b, t = len(lens), max(lens)
    layers, kv, hd, h = CFG.num_hidden_layers, CFG.num_key_value_heads, CFG.head_dim, CFG.num_attention_heads

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    outs = []
    if t > 1:
        step = Step(torch.arange(t).expand(b, t), t, tuple(lens) if pass_lens else None)
        for layer in range(layers):
            outs.append(cache.attend(layer, rnd(b, h, t, hd), rnd(b, kv, t, hd), rnd(b, kv, t, hd), step))
    pos = torch.tensor(lens) if t > 1 else torch.zeros(b, dtype=torch.long)
    for i in range(steps):
        n = (t if t > 1 else 0) + i + 1
        step = Step(pos[:, None].clone(), kv_len(n) if kv_len else n)
        for layer in range(layers):
            outs.append(cache.attend(layer, rnd(b, h, 1, hd), rnd(b, kv, 1, hd), rnd(b, kv, 1, hd), step))
        pos = pos + 1
    return outs


def factory(tmp_path, max_seq: int, batch: int, dtype=torch.float32, **kv) -> KVFactory:
    return KVFactory(CFG, KVConfig(**kv), DEV, dtype, max_seq, batch, None, spill_dir=tmp_path)


def assert_equal(got, ref):
    assert len(got) == len(ref)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert torch.equal(a, b), f"call {i}: max |diff| {(a - b).abs().max().item():.3e}"


CASES = {
    "cpu-bt4-one-block": dict(kv_offload="cpu", kv_block_tokens=4, kv_gpu_blocks=1),
    "cpu-bt3-two-blocks": dict(kv_offload="cpu", kv_block_tokens=3, kv_gpu_blocks=2),
    "cpu-bt1-one-block": dict(kv_offload="cpu", kv_block_tokens=1, kv_gpu_blocks=1),
    "cpu-bt7-three-blocks": dict(kv_offload="cpu", kv_block_tokens=7, kv_gpu_blocks=3),
    "cpu-bt16-one-block": dict(kv_offload="cpu", kv_block_tokens=16, kv_gpu_blocks=1),
    "ssd-bt4-one-block": dict(kv_offload="ssd", kv_block_tokens=4, kv_gpu_blocks=1),
    "ssd-bt5-two-blocks-throttled": dict(kv_offload="ssd", kv_block_tokens=5, kv_gpu_blocks=2,
                                         kv_throttle_threshold=1, kv_throttle_ms=0),
    "resident-topk-covers-all": dict(kv_offload="none", kv_block_tokens=4, topk_blk=64),
    "cpu-topk-covers-all": dict(kv_offload="cpu", kv_block_tokens=4, kv_gpu_blocks=1, topk_blk=64),
    "cpu-budget-covers-all": dict(kv_offload="cpu", kv_block_tokens=4, kv_gpu_blocks=64),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("lens", [[13, 5, 9], [37], [2, 30, 30, 17]], ids=["mixed3", "one-long", "mixed4"])
def test_paged_equals_static_bit_for_bit(tmp_path, case, lens):
    max_seq, steps = 64, 24
    ref = drive(StaticKVCache(CFG, len(lens), max_seq, DEV, torch.float32), lens, steps)
    f = factory(tmp_path, max_seq, len(lens), **CASES[case])
    try:
        assert_equal(drive(f(len(lens), max_seq), lens, steps), ref)
        io = f.io_stats()
    finally:
        f.close()
    if CASES[case].get("kv_gpu_blocks", 64) < 16:  # blocks really went to the host tier and back
        assert io["kv_d2h"]["bytes"] > 0 and io["kv_h2d"]["bytes"] > 0
    if CASES[case]["kv_offload"] == "ssd":
        assert io["kv_ssd"]["bytes"] > 0 and io["kv_bytes"]["ssd"] > 0
        assert not list(tmp_path.glob(".kv_spill*")), "the spill file is removed on close"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_and_host_lens(tmp_path, dtype):
    """Low-precision blocks survive the tiers unchanged; given Step.lens the cache never reads positions."""
    lens, max_seq = [11, 3, 8], 40
    ref = drive(StaticKVCache(CFG, 3, max_seq, DEV, dtype), lens, 20, dtype=dtype)
    for kv in (dict(kv_offload="cpu", kv_block_tokens=4, kv_gpu_blocks=1),
               dict(kv_offload="ssd", kv_block_tokens=2, kv_gpu_blocks=3)):
        f = factory(tmp_path, max_seq, 3, dtype=dtype, **kv)
        try:
            cache = f(3, max_seq)
            cache._read_positions = None  # would be called (and fail) if the cache read positions back
            assert_equal(drive(cache, lens, 20, dtype=dtype, pass_lens=True), ref)
        finally:
            f.close()


def test_bucketed_kv_len_and_one_token_prompts(tmp_path):
    """kv_len may be larger than max position + 1 (CUDA-graph buckets); a 1-token prompt starts in decode."""
    bucket = lambda n: min(64, -(-n // 16) * 16)  # noqa: E731
    for lens, kv_len in (([9, 4], bucket), ([1, 1], None)):
        ref = drive(StaticKVCache(CFG, 2, 64, DEV, torch.float32), lens, 30, kv_len=kv_len)
        f = factory(tmp_path, 64, 2, kv_offload="cpu", kv_block_tokens=4, kv_gpu_blocks=2)
        try:
            assert_equal(drive(f(2, 64), lens, 30, kv_len=kv_len), ref)
        finally:
            f.close()


def test_buffers_are_reused_and_old_caches_refuse(tmp_path):
    f = factory(tmp_path, 32, 2, kv_offload="cpu", kv_block_tokens=4, kv_gpu_blocks=1)
    try:
        first = f(2, 32)
        drive(first, [5, 9], 3)
        pinned = f.io_stats()["kv_bytes"]
        second = f(2, 32)
        assert second.bufs is first.bufs and f.io_stats()["kv_bytes"] == pinned
        with pytest.raises(RuntimeError, match="replaced by a newer one"):
            drive(first, [5, 9], 1)
        ref = drive(StaticKVCache(CFG, 2, 32, DEV, torch.float32), [5, 9], 8, seed=4)
        assert_equal(drive(second, [5, 9], 8, seed=4), ref)  # stale blocks of the first cache do not leak
        assert f(3, 32).bufs is not first.bufs  # another shape gets its own buffers
    finally:
        f.close()


def test_ssd_write_back_wider_than_its_outbox(tmp_path):
    """A prefill of more rows than the spill tier has outbox slots streams through them (no deadlock)."""
    lens = [9 + 3 * i for i in range(10)]
    ref = drive(StaticKVCache(CFG, 10, 48, DEV, torch.float32), lens, 6)
    f = factory(tmp_path, 48, 10, kv_offload="ssd", kv_block_tokens=4, kv_gpu_blocks=1)
    try:
        cache = f(10, 48)
        assert len(lens) > cache.mover.store._free.qsize()
        assert_equal(drive(cache, lens, 6), ref)
    finally:
        f.close()


def test_the_kv_worker_thread_takes_the_device_index_of_a_bare_cuda_device(monkeypatch):
    """A bare `cuda` device (no index) broke the worker thread's initializer on the H200
    (`torch.cuda.set_device` wants an index); the thread now gets the caller's current device."""
    from worker.kv.offload import KVMover

    chosen = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    sync = types.SimpleNamespace(cuda=True, device=torch.device("cuda"), stream=lambda: None)
    mover = KVMover(None, None, sync, None, None, None)
    mover._pool.submit(lambda: None).result()  # the initializer runs with the first job
    mover._pool.shutdown(wait=True)
    assert chosen == [3]
