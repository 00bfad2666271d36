"""Every streaming mode computes exactly what the all-resident `gpu` mode computes.

Logits are compared with torch.equal (bit for bit) at every generated position, across geometries,
budgets down to one slot per group kind, both CPU policies, chunked SSD reads through a staging pool
smaller than one group, and passes that wrap around across tokens.
"""

from __future__ import annotations

import threading

import pytest
import torch

from worker.engine import build_engine
from worker.errors import UserError
from worker.generate import generate
from worker.pack.cache import ensure_pack
from worker.run import resolve_config
from worker.text.prompts import prompt_ids_for
from worker.text.checkpoint import load_tokenizer

# On a GPU host the same tests run on CUDA (streams, events, pinned buffers); in CI on the CPU.
CPU = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _generate(ckpt, **flat):
    cfg = resolve_config({"checkpoints": str(ckpt), "temperature": 0, "max_new_tokens": 6, "prompt_len": 40,
                          "batch_size": 2, **flat})
    pack = ensure_pack(cfg.checkpoints)
    tok = load_tokenizer(cfg.checkpoints)
    ids = prompt_ids_for(tok, cfg)
    ids[1] = ids[1][:23]  # rows of different lengths
    engine = build_engine(cfg, pack, CPU)
    try:
        outs = []
        for _ in range(2):  # a second generate continues the cyclic fetch order across rounds
            cache = engine.new_cache(len(ids), cfg.max_seq_len)
            outs.append(generate(engine.model, cache, ids, cfg.max_new_tokens, 0.0, 1.0, 0, (), 0, CPU,
                                 keep_logits=True))
        return outs, engine.io()
    finally:
        engine.close()


def _assert_same(got, ref):
    for g, r in zip(got, ref):
        assert len(g.logits) == len(r.logits)
        for step, (a, b) in enumerate(zip(g.logits, r.logits)):
            assert torch.equal(a, b), f"step {step}: max |diff| {(a - b).abs().max().item():.3e}"
        assert g.token_ids == r.token_ids


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt(layers=5)


@pytest.fixture(scope="module")
def reference(ckpt):
    return _generate(ckpt, mode="gpu")[0]


CASES = {
    "cpu": dict(mode="cpu"),
    "cpu-one-slot-per-kind": dict(mode="cpu", gpu_max_groups=2, group_prefetch_depth=1),
    "cpu-single-slot-budget": dict(mode="cpu", gpu_max_groups=1, aggressive_gpu_prefetch=0),
    "cpu-odd-slot-to-ffn": dict(mode="cpu", gpu_max_groups=3, group_prefetch_depth=4, skip_preload_wait=False,
                                warmup_layers=3),
    "ssd": dict(mode="ssd"),
    "ssd-chunked-one-reader": dict(mode="ssd", staging_mb=1, ssd_readers=1, gpu_max_groups=2),
    "mixed-subset": dict(mode="mixed", gpu_cached_layers=1, cpu_cache_layers=2, cpu_policy="pinned-subset"),
    "mixed-rolling": dict(mode="mixed", gpu_cached_layers=1, cpu_cache_layers=2, cpu_policy="rolling"),
    "mixed-rolling-one-slot": dict(mode="mixed", gpu_cached_layers=0, cpu_cache_layers=1, cpu_policy="rolling",
                                   staging_mb=1),
    "mixed-rolling-no-wrap-stride2": dict(mode="mixed", gpu_cached_layers=2, cpu_cache_layers=2,
                                          cpu_policy="rolling", cpu_wrap_around=False, cpu_roll_stride=2),
    "mixed-rolling-async-offset": dict(mode="mixed", gpu_cached_layers=0, cpu_cache_layers=3, cpu_policy="rolling",
                                       cpu_roll_sync=False, cpu_ring_offset=1),
    "mixed-keep-finished": dict(mode="mixed", gpu_cached_layers=1, cpu_cache_layers=1, evict_finished=False,
                                gpu_max_groups=20),
    "mixed-preload-wait": dict(mode="mixed", gpu_cached_layers=1, cpu_cache_layers=1, skip_preload_wait=False,
                               warmup_layers=2, h2d_group_backlog_max=3),
    "cpu-fill-behind": dict(mode="cpu", fill_behind=True),
    "mixed-subset-fill-behind-preload-wait": dict(mode="mixed", gpu_cached_layers=1, cpu_cache_layers=2,
                                                  cpu_policy="pinned-subset", fill_behind=True,
                                                  skip_preload_wait=False, warmup_layers=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mode_equals_gpu_mode_bit_for_bit(ckpt, reference, case):
    outs, io = _generate(ckpt, **CASES[case])
    _assert_same(outs, reference)
    assert io["weight_h2d"]["bytes"] > 0


def test_pinned_subset_reads_fewer_ssd_bytes_than_rolling(ckpt):
    flat = dict(mode="mixed", gpu_cached_layers=1, cpu_cache_layers=2)
    _, subset = _generate(ckpt, cpu_policy="pinned-subset", **flat)
    _, ring = _generate(ckpt, cpu_policy="rolling", **flat)
    # per pass the subset reads 2 of 4 streamed layers, the ring all 4 (plus the initial fill)
    assert subset["ssd_read"]["bytes"] < ring["ssd_read"]["bytes"]


@pytest.mark.parametrize("geometry", [dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
                                      dict(num_attention_heads=8, num_key_value_heads=1, intermediate_size=300,
                                           rope_scaling=None)])
def test_other_geometries(make_ckpt, geometry):
    ckpt = make_ckpt(layers=3, **geometry)
    ref, _ = _generate(ckpt, mode="gpu")
    for flat in (dict(mode="ssd", staging_mb=1), dict(mode="mixed", gpu_cached_layers=1, cpu_cache_layers=1)):
        _assert_same(_generate(ckpt, **flat)[0], ref)


@pytest.mark.parametrize("flat, msg", [
    (dict(mode="mixed", gpu_cached_layers=6, cpu_cache_layers=0), "more than the model's 5 layers"),
    (dict(mode="mixed", gpu_cached_layers=2, cpu_cache_layers=4), "lower --cpu-cache-layers to at most 3"),
    (dict(mode="cpu", gpu_memory_limit_gb=0.001), r"less than one attn\+ffn group pair"),
])
def test_bad_budgets_are_clear_errors(ckpt, flat, msg):
    with pytest.raises(UserError, match=msg):
        _generate(ckpt, **flat)


def test_slot_counts_split_and_fill():
    """gpu_max_groups is split between the kinds, the odd slot to ffn; under a memory limit the room
    after whole pairs buys ffn slots first, then attn; less than one pair is refused."""
    from worker.config import StreamConfig
    from worker.pack.groups import GroupKey
    from worker.stream.streamer import fillable, slot_counts

    cap = {"attn": 3, "ffn": 10}
    assert slot_counts(cap, StreamConfig(gpu_max_groups=5), 0) == {"attn": 2, "ffn": 3}
    assert slot_counts(cap, StreamConfig(gpu_max_groups=1), 0) == {"attn": 1, "ffn": 1}
    limited = StreamConfig(gpu_max_groups=10, gpu_memory_limit_gb=40e-9)  # 40 bytes of room
    assert slot_counts(cap, limited, 0) == {"attn": 3, "ffn": 3}  # 3 pairs = 39
    assert slot_counts(cap, limited, 12) == {"attn": 2, "ffn": 2}  # 28 left: 2 pairs = 26, 2 buys nothing
    assert slot_counts(cap, limited, 4) == {"attn": 2, "ffn": 3}  # 36 left: 2 pairs + one more ffn
    assert slot_counts(cap, limited, 11) == {"attn": 3, "ffn": 2}  # 29 left: 2 pairs, 3 < ffn, one attn
    with pytest.raises(UserError, match="less than one attn"):
        slot_counts(cap, limited, 28)
    order = [GroupKey(i, k) for i in range(3) for k in ("attn", "ffn")]
    assert fillable(order, {"attn": 1, "ffn": 2}) == 2  # the second attn waits for the first to be freed
    assert fillable(order, {"attn": 5, "ffn": 5}) == 6


def test_wsm_switches_take_effect(ckpt, monkeypatch):
    monkeypatch.setenv("WSM_GPU_MAX_GROUPS", "2")
    monkeypatch.setenv("WSM_CPU_ROLLING_MODE", "0")
    monkeypatch.setenv("WSM_KV_THROTTLE_MS", "3")
    cfg = resolve_config({"checkpoints": str(ckpt), "mode": "mixed", "gpu_cached_layers": 1, "cpu_cache_layers": 1})
    assert (cfg.stream.gpu_max_groups, cfg.stream.cpu_policy, cfg.kv.kv_throttle_ms) == (2, "pinned-subset", 3)
    engine = build_engine(cfg, ensure_pack(cfg.checkpoints), CPU)
    try:
        assert engine.weights.pool.nbytes == sum(engine.weights.pool._capacity.values())  # one slot per kind
        assert "ring" not in engine.weights.providers and "cpu" in engine.weights.providers
    finally:
        engine.close()
    explicit = resolve_config({"checkpoints": str(ckpt), "gpu_max_groups": 6})
    assert explicit.stream.gpu_max_groups == 6  # a flag beats the environment
    monkeypatch.setenv("WSM_EVICT_FINISHED", "maybe")
    with pytest.raises(UserError, match="WSM_EVICT_FINISHED"):
        resolve_config({"checkpoints": str(ckpt)})


def test_resident_layers_count_once_against_the_memory_limit(ckpt):
    """A GPU-cached layer's tensors (and its fused qkv / gate_up views) share one extent: the memory
    limit must be charged its size once (counted per view it was charged ~2x, and a 70B mixed run
    with one cached layer under 6 GiB was refused)."""
    from worker.stream.plan import place
    from worker.stream.ssd import SSDReader
    from worker.stream.streamer import device_bytes
    from worker.stream.upload import Upload, device_keys

    cfg = resolve_config({"checkpoints": str(ckpt), "mode": "mixed", "gpu_cached_layers": 2, "cpu_cache_layers": 1})
    pack = ensure_pack(cfg.checkpoints)
    reader = SSDReader(pack.blob_path, 2, 1 << 20)
    resident = Upload(pack, device_keys(place("mixed", 5, cfg.stream).layers("gpu")), reader, CPU).result()
    reader.close()
    layer_groups = [g for k, g in resident.items() if k.layer is not None]
    assert any("qkv_proj" in g for g in layer_groups)  # the fused views are there...
    extents = sum(pack.manifest.group(k.name).nbytes for k in resident if k.layer is not None)
    others = sum(t.numel() * t.element_size() for k, g in resident.items() if k.layer is None for t in g.values()
                 if t.device.type == CPU.type)  # CPU is "cuda" (no index) on a GPU host
    assert device_bytes(resident.values(), CPU) == pytest.approx(extents + others, rel=0.01)  # ...counted once


def test_slot_sizing_leaves_room_for_a_long_prefill():
    """70B geometry, 15 layers, cpu mode, 6 GiB: a 2048-token prefill must not get two slots per kind
    (that left ~0.1 GB and ran out of memory on an H200), but the room left buys a second ffn slot;
    a 512-token run still gets two of each."""
    from worker.engine import HEADROOM_BYTES, workspace_bytes
    from worker.model.geometry import ModelConfig
    from worker.stream.streamer import slot_counts
    from worker.synth.presets import LLAMA31_COMMON, PRESETS

    cfg = ModelConfig.from_hf({**LLAMA31_COMMON, **PRESETS["llama3.1-70b"], "num_hidden_layers": 15,
                               "torch_dtype": "bfloat16"})
    d, f = cfg.hidden_size, cfg.intermediate_size
    kv_heads, hd = cfg.num_key_value_heads, cfg.head_dim
    capacity = {"attn": (d * (cfg.num_attention_heads + 2 * kv_heads) * hd + d * d) * 2, "ffn": 3 * d * f * 2}
    lm_head = cfg.vocab_size * d * 2
    run = resolve_config({"checkpoints": "x", "mode": "cpu", "gpu_memory_limit_gb": 6.442, "max_seq_len": 4096,
                          "gpu_max_groups": 4})
    long, short = workspace_bytes(run, cfg, 2048), workspace_bytes(run, cfg, 512)
    assert long - short > HEADROOM_BYTES // 2  # activations grow with the prompt, on top of the headroom
    assert slot_counts(capacity, run.stream, lm_head + long) == {"attn": 1, "ffn": 2}
    assert slot_counts(capacity, run.stream, lm_head + short) == {"attn": 2, "ffn": 2}
    room = run.stream.gpu_memory_limit_gb * 1e9 - lm_head - long
    assert room - capacity["attn"] - 2 * capacity["ffn"] >= 0  # the extra ffn slot is inside the limit


def _poll(cond, timeout=5.0):
    import time
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.005)
    return cond()


def test_fetch_thread_runs_the_preload_ahead_then_lookahead(ckpt):
    """Before the first group is consumed the fetch thread fills the preload (6 groups ahead with 3
    warm-up layers), then it stays `ahead` (2) groups in front of the compute, never further."""
    import time

    cfg = resolve_config({"checkpoints": str(ckpt), "mode": "cpu", "gpu_max_groups": 10, "warmup_layers": 3,
                          "group_prefetch_depth": 2, "aggressive_gpu_prefetch": 0})
    engine = build_engine(cfg, ensure_pack(cfg.checkpoints), CPU)
    w = engine.weights
    try:
        assert (w._preload, w.ahead) == (6, 2)
        assert _poll(lambda: w._issued == 7)  # groups 0..6: the preload beyond the one computed first
        time.sleep(0.1)
        assert w._issued == 7  # and not one more while nothing is consumed
        for key in w.order[:6]:
            w.wait(key.layer, key.kind)
            w.release(key.layer, key.kind)
        assert _poll(lambda: w._issued == 9)  # 6 consumed + the one computed next + 2 ahead
        time.sleep(0.1)
        assert w._issued == 9
    finally:
        engine.close()


def test_fetch_thread_error_is_raised_on_the_compute_side(ckpt):
    """A failing copy source stops the fetch thread; the compute's next `wait` raises its error
    instead of hanging, and the engine still closes."""
    cfg = resolve_config({"checkpoints": str(ckpt), "mode": "cpu", "gpu_max_groups": 2})
    engine = build_engine(cfg, ensure_pack(cfg.checkpoints), CPU)
    w = engine.weights

    def broken(key):
        raise OSError("host copy source gone")

    w.providers["cpu"].pieces = broken
    try:
        with pytest.raises(OSError, match="host copy source gone"):
            for key in w.order:  # at most the first 2 groups were fetched before the source broke
                w.wait(key.layer, key.kind)
                w.release(key.layer, key.kind)
        assert not w._thread.is_alive()
    finally:
        engine.close()


def test_a_streamed_run_reports_where_its_fetch_thread_waited(tiny_run):
    """The run JSON says how long the fetch thread waited for room ahead of the compute, for a slot and
    for the copy engine during the measured round: the H200's batch-16 copy stalls were issued late
    by the host, and this is what tells those waits apart from any bench run."""
    from worker.run import run

    doc = run(resolve_config({k: v for k, v in {**tiny_run, "mode": "cpu"}.items() if k != "cpu_cache_layers"}))
    waits = doc["io"]["weight_h2d"]["fetch_waits_s"]
    assert set(waits) == {"room", "slot", "backlog", "since_reset"}
    assert all(v >= 0 for v in waits.values())
    # the thread waits at most as long as the round has lasted, and on the CPU it mostly waits for room:
    # each copy is done when issued, so the fetch runs ahead until the lookahead stops it
    assert waits["room"] + waits["slot"] + waits["backlog"] <= waits["since_reset"] + 1e-3
    assert waits["room"] > 0


def test_waits_count_each_named_wait_until_reset():
    import time

    from worker.stream.iostats import Waits

    w = Waits("fetch", ("room", "slot"))
    with w("room"):
        time.sleep(0.02)
    with pytest.raises(RuntimeError):  # a wait that ends in an error still counts
        with w("slot"):
            time.sleep(0.01)
            raise RuntimeError("closing")
    got = w.stats()
    assert got["room"] >= 0.02 and got["slot"] >= 0.01 and got["since_reset"] >= got["room"] + got["slot"]
    w.reset()
    assert w.stats()["room"] == 0 and w.stats()["slot"] == 0


def test_waits_are_profiler_ranges_only_while_a_profiler_records():
    from torch.profiler import ProfilerActivity, profile

    from worker.stream.iostats import Waits

    w = Waits("fetch", ("room",))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with w("room"):
            pass
    assert any(e.name == "fetch.room" for e in prof.events())
    with w("room"):  # no profiler: counted, no range entered
        pass
    assert w.stats()["room"] > 0


def test_a_cpu_tier_filled_behind_is_streamed_while_it_still_reads(ckpt, reference, monkeypatch):
    """`fill_behind`: the first group is copied and computed while the fill still reads the others (their
    reads wait until the streamer first asks the tier for a group), and the logits stay gpu mode's."""
    from worker.pack.groups import KINDS, GroupKey
    from worker.stream import cpu_tier
    from worker.stream.ssd import SSDReader

    m = ensure_pack(str(ckpt)).manifest
    later = [m.group(GroupKey(i, k).name) for i in range(m.model_config.num_hidden_layers) for k in KINDS][1:]
    gate = threading.Event()
    real_read, real_pieces = SSDReader._read, cpu_tier.FixedTier.pieces

    def gated(self, offset, nbytes, out, fd, *call):  # `call`: a page-cache read's system-call size
        if any(g.offset <= offset < g.offset + g.nbytes for g in later):  # not layer 0's attn, not the resident load
            gate.wait(timeout=30)
        real_read(self, offset, nbytes, out, fd, *call)

    in_flight = []

    def pieces(self, key):
        in_flight.append(not self.filled.done.done())
        gate.set()
        return real_pieces(self, key)

    monkeypatch.setattr(SSDReader, "_read", gated)
    monkeypatch.setattr(cpu_tier.FixedTier, "pieces", pieces)
    outs, _ = _generate(ckpt, mode="cpu", fill_behind=True)
    assert in_flight[0] is True  # the fill was still reading when the first group was asked for
    _assert_same(outs, reference)
