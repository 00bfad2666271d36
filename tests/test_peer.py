"""The accelerate peer: HF-equivalent tokens through the engine's loop, placement per mode, row shape."""

from __future__ import annotations

import json

import pytest
import torch

from worker.config import RunConfig, SamplingConfig
from worker.errors import UserError
from worker.model.geometry import ModelConfig
from worker.pack.source import read_index
from worker.peer import module_bytes, peer_generate, plan_placement, run_peer
from worker.run import resolve_config

CPU = torch.device("cpu")
PAD = 0
NEW = 10


@pytest.fixture(scope="module")
def hf_model(tiny_ckpt):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32, local_files_only=True).eval()


def _cfg(ckpt, **kw) -> RunConfig:
    temperature = kw.pop("temperature", 0.0)
    return RunConfig(checkpoints=str(ckpt), max_new_tokens=NEW, max_seq_len=64,
                     sampling=SamplingConfig(temperature=temperature), **kw)


def _prompts(lengths, seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 900, (n,), generator=g).tolist() for n in lengths]


def _hf_greedy(model, ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=PAD,
                         eos_token_id=None)
    return out[:, ids.shape[1]:].tolist()


def test_greedy_equals_hf_generate_batch_1(hf_model, tiny_ckpt):
    prompt = _prompts([9])
    got = peer_generate(hf_model, prompt, _cfg(tiny_ckpt), (), PAD, CPU)
    ids = torch.tensor(prompt)
    assert got.token_ids == _hf_greedy(hf_model, ids, torch.ones_like(ids))
    assert got.decode_steps == NEW - 1 and len(got.itl_ms) == NEW - 1


def test_ragged_batch_right_padded_equals_hf_left_padded_and_alone(hf_model, tiny_ckpt):
    """Rows of different lengths, right-padded with per-row positions, give what HF gives them alone
    and what HF's own left-padded batched generate gives."""
    prompts = _prompts([7, 3, 12])
    got = peer_generate(hf_model, prompts, _cfg(tiny_ckpt), (), PAD, CPU).token_ids
    width = max(map(len, prompts))
    left = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    assert got == _hf_greedy(hf_model, left, mask)
    for p, row in zip(prompts, got):
        ids = torch.tensor([p])
        assert row == _hf_greedy(hf_model, ids, torch.ones_like(ids))[0]


def test_prefill_logits_are_each_rows_last_token(hf_model, tiny_ckpt):
    prompts = _prompts([5, 11, 5])
    gen = peer_generate(hf_model, prompts, _cfg(tiny_ckpt), (), PAD, CPU, keep_logits=True)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf_model(torch.tensor([p])).logits[0, -1]
        torch.testing.assert_close(gen.logits[0][i], ref, rtol=1e-5, atol=1e-5)
    assert gen.logits[0].shape == (3, hf_model.config.vocab_size)


def test_sampling_is_seeded_and_stops_at_eos(hf_model, tiny_ckpt):
    cfg = _cfg(tiny_ckpt, temperature=1.0)
    prompts = _prompts([6, 4])
    a = peer_generate(hf_model, prompts, cfg, (), PAD, CPU).token_ids
    assert a == peer_generate(hf_model, prompts, cfg, (), PAD, CPU).token_ids
    eos = a[0][2]  # make a token row 0 samples at step 2 the EOS: row 0 is cut there
    b = peer_generate(hf_model, prompts, cfg, (eos,), PAD, CPU).token_ids
    assert b[0] == a[0][:a[0].index(eos) + 1]


# ---- placement --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def geometry(tiny_ckpt):
    mc = ModelConfig.from_hf_dir(tiny_ckpt)
    sizes = module_bytes(read_index(tiny_ckpt), 4)
    return mc, sizes, sizes["model.layers.0"], sizes["model.embed_tokens"] + sizes["lm_head"] + sizes["model.norm"]


def test_sizes_from_safetensors_headers(hf_model, tiny_ckpt, geometry):
    _, sizes, _, _ = geometry
    assert sum(sizes.values()) == sum(p.numel() * 4 for p in hf_model.parameters())
    assert {k for k in sizes if k.startswith("model.layers.")} == {"model.layers.0", "model.layers.1"}


@pytest.mark.filterwarnings("ignore:Current model requires")
def test_placement_per_mode(tiny_ckpt, geometry):
    mc, sizes, layer, resident = geometry
    gpu = torch.device("cuda", 0)  # planning only: nothing is allocated

    def plan(mode, budget, **kw):
        return plan_placement(resolve_config({"checkpoints": str(tiny_ckpt), "mode": mode, **kw}),
                              mc, gpu, sizes, torch.float32, budget=budget)

    assert plan("gpu", 10**9).device_map == {"": 0}
    with pytest.raises(UserError, match="mode gpu"):
        plan("gpu", resident + layer)
    mixed = plan("mixed", resident + 2 * layer, gpu_cached_layers=1, cpu_cache_layers=0)
    assert mixed.layers == {"gpu": 1, "cpu": 0, "disk": 1}
    assert mixed.device_map["model.layers.0"] == 0 and mixed.device_map["model.layers.1"] == "disk"
    assert plan("mixed", 10**9, gpu_cached_layers=0, cpu_cache_layers=40).layers == {"gpu": 0, "cpu": 2, "disk": 0}
    with pytest.raises(UserError, match="gpu_cached_layers"):
        plan("mixed", 10**9, gpu_cached_layers=3)
    with pytest.raises(UserError, match="mode mixed"):
        plan("mixed", resident + layer, gpu_cached_layers=1)
    small = layer + resident  # accelerate keeps one layer in reserve: room for the embeddings, no layer
    assert plan("cpu", small).layers == {"cpu": 2}
    assert plan("ssd", small).layers == {"disk": 2}
    with pytest.raises(UserError, match="holds no module"):
        plan("cpu", layer // 2)
    roomy = plan("cpu", 10**9)
    assert roomy.layers == {"gpu": 2} and "offloads nothing" in roomy.notes[0]
    assert plan_placement(_cfg(tiny_ckpt), mc, CPU, sizes, torch.float32).device_map == {"": "cpu"}


# ---- a whole run ------------------------------------------------------------------------------


def _key_tree(d):
    """The nested keys of a result (values and free-form maps such as the environment left out)."""
    if isinstance(d, dict):
        return {k: None if k in ("environment", "config") else _key_tree(v) for k, v in d.items()}
    return None


def test_run_has_the_streaming_row_shape_and_its_tokens(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMBENCH_CACHE", str(tmp_path / "cache"))
    for var in ("OMP_NUM_THREADS", "MALLOC_ARENA_MAX"):  # bench.run sets them: restore afterwards
        monkeypatch.setenv(var, "2")
    flat = {"checkpoints": str(tiny_ckpt), "prompt_len": 8, "batch_size": 2, "max_new_tokens": 6,
            "max_seq_len": 64, "temperature": 0.0, "warmup_rounds": 0, "pack_dir": str(tmp_path / "pack")}
    phases = []
    peer = run_peer(resolve_config({**flat, "out_json": str(tmp_path / "peer.json")}), CPU, phases.append)
    assert phases == ["load", "measure", "done"]
    assert json.loads((tmp_path / "peer.json").read_text()) == json.loads(json.dumps(peer))
    assert peer["config"]["engine"] == "accelerate"
    assert peer["io"] == {"ssd_read": None, "weight_h2d": None, "kv_h2d": None, "kv_d2h": None}
    assert peer["model"]["n_params"] == sum(p.numel() for p in _hf(tiny_ckpt).parameters())
    assert peer["model"]["weight_bytes"] == 4 * peer["model"]["n_params"]
    m = peer["metrics"]
    assert m["decode_steps"] == 5 and len(m["itl_ms"]) == 5 and m["prefill_ms"] > 0 and m["ttft_ms"] > 0
    s = peer["setup"]  # the phases that apply to the peer; no pack, CPU tier or probe
    assert s["slots_s"] > 0 and s["measure_s"] > 0 and s["pack_s"] == s["fill_s"] == s["probe_s"] == 0
    assert s["wall_s"] >= s["measure_s"] + s["slots_s"] + s["tokenizer_s"]

    from worker import run as bench

    ours = bench.run(resolve_config({**flat, "out_json": None}))
    assert ours["roofline"] is not None and peer["roofline"] is None  # the peer's floor is not modelled
    ours["roofline"] = None
    assert _key_tree(peer) == _key_tree(ours)
    assert [o["token_ids"] for o in peer["outputs"]] == [o["token_ids"] for o in ours["outputs"]]
    assert [o["prompt_token_ids"] for o in peer["outputs"]] == [o["prompt_token_ids"] for o in ours["outputs"]]


def _hf(ckpt):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, local_files_only=True)


def test_cli_engine_accelerate(tiny_ckpt, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import cli

    monkeypatch.setenv("STREAMBENCH_CACHE", str(tmp_path / "cache"))
    for var in ("OMP_NUM_THREADS", "MALLOC_ARENA_MAX"):
        monkeypatch.setenv(var, "2")
    out = tmp_path / "r.json"
    res = CliRunner().invoke(cli.bench, ["run", "--engine", "accelerate", "--checkpoints", str(tiny_ckpt),
                                         "--prompt", "hello world", "--max-new-tokens", "3", "--max-seq-len", "32",
                                         "--warmup-rounds", "0", "--out-json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["config"]["engine"] == "accelerate" and doc["metrics"]["batch_size"] == 1
