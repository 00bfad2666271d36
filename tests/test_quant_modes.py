"""Exactness per weight format: every mode equals that format's `gpu` mode bit for bit, and in fp32
the engine equals HF transformers run on the dequantized checkpoint (`bench dequantize`).

The quantized bytes are what the streaming modes move (the H2D counter says so), and the compute
dequantizes them; a format is not compared with another (quantizing changes the function).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from worker.engine import build_engine
from worker.generate import generate
from worker.model.step import Step
from worker.pack.cache import ensure_pack
from worker.quant.export import dequantize_pack
from worker.run import resolve_config
from worker.text.prompts import prompt_ids_for
from worker.text.checkpoint import load_tokenizer

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FORMATS = {"int8": dict(weight_format="int8"), "int4": dict(weight_format="int4"),
           "int4-g32-head": dict(weight_format="int4", quant_group_size=32, quantize_head=True),
           "fp8": dict(weight_format="fp8")}


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt(layers=4, intermediate_size=768)


def _generate(ckpt, **flat):
    cfg = resolve_config({"checkpoints": str(ckpt), "temperature": 0, "max_new_tokens": 5, "prompt_len": 30,
                          "batch_size": 2, "max_seq_len": 64, **flat})
    pack = ensure_pack(cfg.checkpoints, weights=cfg.weights)
    tok = load_tokenizer(cfg.checkpoints)
    ids = prompt_ids_for(tok, cfg)
    ids[1] = ids[1][:17]
    engine = build_engine(cfg, pack, DEV)
    try:
        outs = []
        for _ in range(2):
            cache = engine.new_cache(len(ids), cfg.max_seq_len)
            outs.append(generate(engine.model, cache, ids, cfg.max_new_tokens, 0.0, 1.0, 0, (), 0, DEV,
                                 keep_logits=True))
        return outs, engine.io(), pack
    finally:
        engine.close()


MODES = {
    "cpu": dict(mode="cpu"),
    "cpu-one-slot-per-kind": dict(mode="cpu", gpu_max_groups=2, group_prefetch_depth=1),
    "ssd-chunked": dict(mode="ssd", staging_mb=1, ssd_readers=2),
    "mixed-subset": dict(mode="mixed", gpu_cached_layers=1, cpu_cache_layers=2),
    "mixed-rolling": dict(mode="mixed", gpu_cached_layers=1, cpu_cache_layers=1, cpu_policy="rolling"),
    "gpu-kv-offload-cpu": dict(mode="gpu", kv_offload="cpu", kv_block_tokens=4, kv_gpu_blocks=2),
    "cpu-kv-offload-ssd": dict(mode="cpu", kv_offload="ssd", kv_block_tokens=8, kv_gpu_blocks=1),
}


@pytest.fixture(scope="module", params=list(FORMATS))
def reference(request, ckpt):
    outs, _, pack = _generate(ckpt, mode="gpu", **FORMATS[request.param])
    return request.param, outs, pack


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_equals_the_formats_gpu_mode_bit_for_bit(ckpt, reference, mode):
    fmt, ref, ref_pack = reference
    outs, io, pack = _generate(ckpt, **FORMATS[fmt], **MODES[mode])
    assert pack.manifest_path == ref_pack.manifest_path
    for got, want in zip(outs, ref):
        for step, (a, b) in enumerate(zip(got.logits, want.logits)):
            assert torch.equal(a, b), f"{fmt} {mode} step {step}: max |diff| {(a - b).abs().max().item():.3e}"
        assert got.token_ids == want.token_ids
    if MODES[mode]["mode"] != "gpu":  # what crossed is the quantized extents: 10 passes (2 rounds of a
        # prefill and 4 decode steps) and what the fetch ran ahead, where native extents are 3-7x larger
        layer_bytes = sum(g.nbytes for g in pack.manifest.groups if g.name != "resident")
        assert 0 < io["weight_h2d"]["bytes"] <= 12 * layer_bytes


@pytest.fixture(scope="module", params=list(FORMATS))
def pair(request, ckpt, tmp_path_factory):
    flat = FORMATS[request.param]
    cfg = resolve_config({"checkpoints": str(ckpt), "mode": "gpu", **flat})
    pack = ensure_pack(ckpt, weights=cfg.weights)
    out = dequantize_pack(pack, tmp_path_factory.mktemp("deq") / "ckpt")
    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return build_engine(cfg, pack, torch.device("cpu")), hf, out, ckpt, flat.get("quantize_head", False)


def test_engine_equals_hf_on_the_dequantized_checkpoint(pair):
    engine, hf = pair[:2]
    ids = torch.randint(0, engine.cfg.vocab_size - 20, (2, 29), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids).logits
    got = engine.model.forward(ids, Step(torch.arange(29).expand(2, 29), 29), engine.new_cache(2, 64))
    rel = (got - ref).norm() / ref.norm()
    assert rel < 1e-5, rel
    prompt = ids[:1, :11]
    want = hf.generate(prompt, max_new_tokens=6, do_sample=False)[0, 11:].tolist()
    gen = generate(engine.model, engine.new_cache(1, 64), [prompt[0].tolist()], 6, 0.0, 1.0, 0, (), 0,
                   torch.device("cpu"))
    assert gen.token_ids[0] == want


def test_the_dequantized_checkpoint_is_a_plain_hf_checkpoint_next_to_its_input(pair):
    _, hf, out, ckpt, head = pair
    names = {p.name for p in out.iterdir()}
    assert "config.json" in names and "tokenizer.json" in names and any(n.endswith(".safetensors") for n in names)
    assert not any(n.startswith(".") for n in names)
    assert all(p.dtype == torch.float32 for p in hf.parameters())
    src = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    for (n, a), (_, b) in zip(src.named_parameters(), hf.named_parameters()):
        if "norm" in n or "embed" in n or (n == "lm_head.weight" and not head):
            assert torch.equal(a, b), n  # native tensors are copied as they are
        else:
            assert not torch.equal(a, b) and (a - b).abs().max() < 0.05, n  # quantized, close
