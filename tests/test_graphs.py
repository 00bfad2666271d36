"""CUDA-graph replay of the decode step computes exactly the eager step (GPU hosts only)."""

from __future__ import annotations

import pytest
import torch

from worker.engine import build_engine
from worker.generate import decode_spans, generate
from worker.model.graphs import GraphedDecode
from worker.pack.cache import ensure_pack
from worker.run import resolve_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("geometry", [
    dict(layers=3),  # the tiny preset in float32
    dict(layers=2, dtype="bfloat16", hidden_size=2048, intermediate_size=7168, num_attention_heads=16,
         num_key_value_heads=4, vocab_size=32000),  # bf16 at a size where cuBLAS picks split-K kernels
])
def test_graph_replay_equals_eager_bit_for_bit(make_ckpt, geometry):
    ckpt = make_ckpt(**geometry)
    dev = torch.device("cuda", torch.cuda.current_device())
    engine = build_engine(resolve_config({"checkpoints": str(ckpt), "mode": "gpu"}), ensure_pack(ckpt), dev)
    prompts = [list(range(5, 245)), list(range(7, 40))]  # width 240
    cache = engine.new_cache(2, 512)
    eager = generate(engine.model, cache, prompts, 40, 0.0, 1.0, 0, (), 0, dev, keep_logits=True, capacity=512)
    again = generate(engine.model, cache, prompts, 40, 0.0, 1.0, 0, (), 0, dev, keep_logits=True, capacity=512)
    assert all(torch.equal(a, b) for a, b in zip(eager.logits, again.logits)), "eager decode is not deterministic"
    graphs = GraphedDecode(engine.model, cache, 2, dev)
    graphs.prepare(decode_spans(240, 40, 512))
    replay = generate(engine.model, cache, prompts, 40, 0.0, 1.0, 0, (), 0, dev, keep_logits=True,
                      decode=graphs, capacity=512)
    assert len(graphs.graphs) == 2
    for a, b in zip(eager.logits, replay.logits):
        assert torch.equal(a, b)
    assert eager.token_ids == replay.token_ids


@pytest.mark.parametrize("kv", [dict(kv_offload="cpu", kv_block_tokens=16, kv_gpu_blocks=2),
                                dict(kv_offload="cpu", kv_block_tokens=64, kv_gpu_blocks=1)])
def test_compiled_offloaded_kv_equals_resident_bit_for_bit(make_ckpt, kv):
    """With torch.compile on (the CUDA default) the paged cache's exact decode runs the resident cache's
    compiled attention on its own buffers: logits must still be equal at every step."""
    ckpt = make_ckpt(layers=2, dtype="bfloat16", hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
                     num_key_value_heads=4, vocab_size=32000)
    dev = torch.device("cuda", torch.cuda.current_device())
    prompts = [list(range(5, 205)), list(range(7, 90))]
    runs = []
    for extra in ({}, kv):
        cfg = resolve_config({"checkpoints": str(ckpt), "mode": "gpu", "max_seq_len": 512, **extra})
        assert cfg.compile
        engine = build_engine(cfg, ensure_pack(ckpt), dev)
        try:
            cache = engine.new_cache(2, 512)
            runs.append(generate(engine.model, cache, prompts, 40, 0.0, 1.0, 0, (), 0, dev, keep_logits=True,
                                 capacity=512))
        finally:
            engine.close()
    assert type(cache).__name__ == "PagedKVCache"
    for a, b in zip(runs[0].logits, runs[1].logits):
        assert torch.equal(a, b)
    assert runs[0].token_ids == runs[1].token_ids
