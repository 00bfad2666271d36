"""The engine equals HF transformers' LlamaForCausalLM on the same checkpoint.

fp32 logits within 1e-5 relative (in practice identical on CPU), greedy tokens equal to HF
`generate`, across GQA ratios, tied and untied embeddings, with and without llama3 RoPE scaling and
odd sizes; and a batch of prompts of different lengths equals running each prompt alone.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from worker.engine import build_engine
from worker.generate import generate
from worker.model.step import Step
from worker.pack.cache import ensure_pack
from worker.run import resolve_config

CPU = torch.device("cpu")

GEOMETRIES = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa2": dict(num_attention_heads=8, num_key_value_heads=4),
    "gqa8-tied": dict(num_attention_heads=8, num_key_value_heads=1, tie_word_embeddings=True),
    "no-rope-scaling": dict(rope_scaling=None, rope_theta=10000.0),
    "odd-sizes": dict(hidden_size=120, intermediate_size=331, num_attention_heads=6, num_key_value_heads=2,
                      vocab_size=611),
    "short-original-context": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 64}),
}


def _engine(ckpt):
    cfg = resolve_config({"checkpoints": str(ckpt), "mode": "gpu"})
    return build_engine(cfg, ensure_pack(ckpt), CPU)


@pytest.fixture(scope="module", params=list(GEOMETRIES))
def pair(request, make_ckpt):
    ckpt = make_ckpt(layers=3, **GEOMETRIES[request.param])
    hf = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    return _engine(ckpt), hf


def test_logits_match_hf(pair):
    engine, hf = pair
    ids = torch.randint(0, engine.cfg.vocab_size - 20, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    cache = engine.new_cache(2, 64)
    got = engine.model.forward(ids, Step(torch.arange(37).expand(2, 37), 37), cache)
    rel = (got - ref).norm() / ref.norm()
    assert rel < 1e-5, rel


def test_greedy_tokens_match_hf_generate(pair):
    engine, hf = pair
    prompt = torch.randint(0, engine.cfg.vocab_size - 20, (1, 19), generator=torch.Generator().manual_seed(2))
    ref = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 19:]
    cache = engine.new_cache(1, 64)
    out = generate(engine.model, cache, [prompt[0].tolist()], 12, 0.0, 1.0, 0, (), 0, CPU)
    assert out.token_ids[0] == ref.tolist()


def test_batch_rows_equal_running_alone(make_ckpt):
    engine = _engine(make_ckpt(layers=3))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 900, (n,), generator=g).tolist() for n in (5, 31, 17, 1)]
    batch = generate(engine.model, engine.new_cache(4, 64), prompts, 10, 0.0, 1.0, 0, (), 0, CPU, keep_logits=True)
    for i, p in enumerate(prompts):
        alone = generate(engine.model, engine.new_cache(1, 64), [p], 10, 0.0, 1.0, 0, (), 0, CPU, keep_logits=True)
        assert batch.token_ids[i] == alone.token_ids[0]
        for step_b, step_a in zip(batch.logits, alone.logits):
            torch.testing.assert_close(step_b[i], step_a[0], rtol=1e-5, atol=1e-5)


def test_eos_stops_each_row_and_the_batch(make_ckpt):
    engine = _engine(make_ckpt(layers=2))
    prompts = [[5, 6, 7], [8, 9]]
    free = generate(engine.model, engine.new_cache(2, 64), prompts, 8, 0.0, 1.0, 0, (), 0, CPU)
    eos = free.token_ids[0][2]  # make row 0's third token the EOS
    out = generate(engine.model, engine.new_cache(2, 64), prompts, 8, 0.0, 1.0, 0, (eos,), 0, CPU)
    assert out.token_ids[0] == free.token_ids[0][:3]
    cut = next((j + 1 for j, t in enumerate(free.token_ids[1]) if t == eos), 8)
    assert out.token_ids[1] == free.token_ids[1][:cut]


def test_sampling_is_seeded_and_top_p_truncates():
    from worker.sampling import logits_to_probs, sample

    logits = torch.tensor([[4.0, 3.0, 1.0, -2.0]])
    probs = logits_to_probs(logits, 1.0, 0.8)
    assert probs[0, 2:].sum() == 0 and torch.isclose(probs.sum(), torch.tensor(1.0))
    draws = [sample(logits.expand(64, 4), 0.6, 0.9, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1]) and set(draws[0].tolist()) <= {0, 1}
    assert sample(logits, 0.0, 0.9).item() == 0


def test_chunked_argmax_is_argmax_including_ties():
    """The two-stage greedy (CUDA's path) picks what torch.argmax picks: the first of equal maxima."""
    from worker.sampling import chunked_argmax

    g = torch.Generator().manual_seed(0)
    x = torch.randint(-50, 50, (6, 4096), generator=g).to(torch.bfloat16)  # many ties in every row
    x[0, 3000], x[0, 17] = 99, 99  # the max in two chunks: the earlier wins
    x[1, 700], x[1, 650] = 99, 99  # twice in one chunk
    x[2] = 0  # all equal
    for chunk in (128, 512):
        assert torch.equal(chunked_argmax(x, chunk), torch.argmax(x, dim=-1))
    assert chunked_argmax(x, 512)[:3].tolist() == [17, 650, 0]
