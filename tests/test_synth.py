"""Synthetic checkpoints: the local tokenizer, the HF checkpoint layout, weights, sharding, the CLI."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from benchcli import bench_inprocess
from safetensors import safe_open

import cli
from worker.errors import UserError
from worker.model.geometry import ModelConfig
from worker.synth import checkpoints as synth
from worker.synth.presets import TRAINED_PRESETS
from worker.text.checkpoint import load_tokenizer, special_token_policy
from worker.text.tokenizer import build_tokenizer, save_tokenizer, special_layout

TEXTS = ["Hello, world!", "  leading and trailing  ", "tabs\tand\nnew\r\nlines", "héllo wörld — ünïcödé",
         "漢字とかな 🙂👍🏽", "x=1; y = x**2 # don't", "<|begin_of_text|> is only text here", ""]


# ---- tokenizer ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_tok():
    """The Llama 3 size (built once: ~0.5 s)."""
    return build_tokenizer(128256)


def _tok(vocab, big_tok):
    return big_tok if vocab == 128256 else build_tokenizer(vocab)


@pytest.mark.parametrize("vocab", [298, 384, 512, 1000, 128256])
def test_tokenizer_has_exactly_vocab_size_tokens(vocab, big_tok):
    tok = _tok(vocab, big_tok)
    assert tok.get_vocab_size(with_added_tokens=True) == vocab
    assert sorted(tok.get_vocab(with_added_tokens=True).values()) == list(range(vocab))


def test_tokenizer_is_deterministic_and_merges_join_known_tokens():
    a, b = build_tokenizer(1000), build_tokenizer(1000)
    assert a.to_str() == b.to_str()
    model = json.loads(a.to_str())["model"]
    vocab = model["vocab"]
    assert len(model["merges"]) == 1000 - 256 - 16
    for left, right in (m if isinstance(m, list) else m.split(" ") for m in model["merges"]):
        assert left in vocab and right in vocab and left + right in vocab


def test_llama3_special_tokens_at_the_top(big_tok):
    tok = big_tok
    ids = {name: tok.token_to_id(name) for name in ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                                   "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                                                   "<|reserved_special_token_0|>",
                                                   "<|reserved_special_token_247|>")}
    assert ids == {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|start_header_id|>": 128006,
                   "<|end_header_id|>": 128007, "<|eom_id|>": 128008, "<|eot_id|>": 128009,
                   "<|reserved_special_token_0|>": 128002, "<|reserved_special_token_247|>": 128255}
    added = tok.get_added_tokens_decoder()
    assert sorted(added) == list(range(128000, 128256)) and all(t.special for t in added.values())
    assert special_layout(128256).eos_ids == [128001, 128008, 128009]


def test_small_vocab_keeps_the_same_special_offsets():
    layout = special_layout(1000)
    tok = build_tokenizer(1000)
    assert layout.count == 16 and layout.bos_id == 984
    assert tok.token_to_id("<|begin_of_text|>") == 984 and tok.token_to_id("<|eot_id|>") == 993
    assert tok.id_to_token(999) == "<|reserved_special_token_7|>"


def test_too_small_vocab_is_refused():
    with pytest.raises(UserError, match="too small"):
        build_tokenizer(297)


@pytest.mark.parametrize("vocab", [384, 128256])
def test_round_trip_and_no_special_tokens_added(vocab, big_tok):
    tok = _tok(vocab, big_tok)
    for text in TEXTS:
        ids = tok.encode(text).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
        if "<|" not in text:  # special-token text matches as special, as in Llama 3
            assert all(i < special_layout(vocab).first for i in ids), "plain text produced a special token"
    assert special_layout(vocab).bos_id in tok.encode("<|begin_of_text|>x").ids


def test_vocabulary_words_are_single_tokens(big_tok):
    tok = big_tok
    assert tok.encode(" ab").tokens == ["Ġab"]
    assert tok.encode(" xyz").tokens == ["Ġxyz"]
    assert len(tok.encode("Hello, world!").ids) < len("Hello, world!")  # merges are used


def test_auto_tokenizer_loads_offline_and_agrees(tmp_path):
    from transformers import AutoTokenizer

    raw = build_tokenizer(1000)
    save_tokenizer(raw, tmp_path, model_max_length=4096)
    hf = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert len(hf) == 1000 and hf.model_max_length == 4096
    assert hf.bos_token == "<|begin_of_text|>" and hf.bos_token_id == 984
    for text in TEXTS:
        assert hf.encode(text) == raw.encode(text).ids  # default encode adds no BOS
        assert hf.decode(hf.encode(text)) == text
    assert special_token_policy(hf) is False
    assert load_tokenizer(tmp_path).encode(["a b"], False) == [raw.encode("a b").ids]


def test_special_token_policy_follows_add_bos_token(tmp_path):
    save_tokenizer(build_tokenizer(384), tmp_path, model_max_length=128)
    cfg_file = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["add_bos_token"] = True
    cfg_file.write_text(json.dumps(cfg))
    assert special_token_policy(load_tokenizer(tmp_path)) is True


def test_missing_tokenizer_names_the_dir_and_the_fix(tmp_path):
    with pytest.raises(UserError, match=r"make-model") as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(e.value)


# ---- checkpoint layout and weights ---------------------------------------------------------------


def _file_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(ckpt / shard), framework="pt") as f:
            for name in f.keys():
                assert index["weight_map"][name] == shard
                out[name] = f.get_tensor(name)
    assert set(out) == set(index["weight_map"])
    return out


def test_checkpoint_files_and_config(tiny_ckpt):
    names = sorted(p.name for p in tiny_ckpt.iterdir() if not p.name.startswith("."))  # not the pack cache
    assert names == ["config.json", "generation_config.json", "model-00001-of-00001.safetensors",
                     "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"]
    raw = json.loads((tiny_ckpt / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLM"] and raw["model_type"] == "llama"
    assert raw["rope_theta"] == 500000.0 and raw["torch_dtype"] == "float32"
    assert raw["rope_scaling"] == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    cfg = ModelConfig.from_hf_dir(tiny_ckpt)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (256, 688, 2, 8, 2, 32, 1000)
    assert cfg.bos_token_id == 984 and cfg.eos_token_ids == (985, 992, 993)
    assert cfg.max_position_embeddings == 131072 and not cfg.tie_word_embeddings
    gen = json.loads((tiny_ckpt / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [985, 992, 993] and gen["bos_token_id"] == 984
    assert len(load_tokenizer(tiny_ckpt)) == cfg.vocab_size


def test_presets_have_the_real_llama31_geometry():
    for preset, params in (("llama3.1-8b", 8_030_261_248), ("llama3.1-70b", 70_553_706_496)):
        cfg = synth.build_config(preset)
        assert cfg["vocab_size"] == 128256 and cfg["bos_token_id"] == 128000
        assert cfg["eos_token_id"] == [128001, 128008, 128009] and cfg["head_dim"] == 128
        assert sum(torch.Size(s.shape).numel() for s in synth.tensor_specs(cfg)) == params
    cfg = synth.build_config("llama3.1-70b", layers=2)
    layer = sum(torch.Size(s.shape).numel() * 2 for s in synth.tensor_specs(cfg) if ".layers.0." in s.name)
    assert 1.6e9 < layer < 1.8e9  # ~1.7 GB per bf16 layer, as the 70B streaming budget assumes


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_loads_every_tensor_unchanged(make_ckpt, dtype):
    from transformers import LlamaForCausalLM

    ckpt = make_ckpt(dtype=dtype)
    model, info = LlamaForCausalLM.from_pretrained(str(ckpt), dtype=getattr(torch, dtype), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    files = _file_tensors(ckpt)
    state = model.state_dict()
    assert set(files) == set(state)
    for name, t in files.items():
        assert t.dtype == getattr(torch, dtype)
        assert torch.equal(state[name], t), name


def test_tied_embeddings_have_no_lm_head(make_ckpt):
    from transformers import LlamaForCausalLM

    ckpt = make_ckpt(tie_word_embeddings=True)
    files = _file_tensors(ckpt)
    assert "lm_head.weight" not in files
    model, info = LlamaForCausalLM.from_pretrained(str(ckpt), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    embed = files["model.embed_tokens.weight"]
    assert torch.equal(model.lm_head.weight, embed)
    assert torch.count_nonzero(embed[984:]) == 0 and abs(embed[:984].std().item() * 16 - 1.0) < 0.05
    _, new = _greedy(ckpt, torch.float32)
    assert len(set(new)) >= 8, new


def test_overrides_reach_config_and_shapes(make_ckpt):
    ckpt = make_ckpt(num_key_value_heads=4, head_dim=16, rope_scaling=None, vocab_size=512)
    cfg = ModelConfig.from_hf_dir(ckpt)
    assert cfg.rope_scaling is None and cfg.head_dim == 16 and cfg.vocab_size == 512
    files = _file_tensors(ckpt)
    assert files["model.layers.1.self_attn.q_proj.weight"].shape == (8 * 16, 256)
    assert files["model.layers.1.self_attn.k_proj.weight"].shape == (4 * 16, 256)
    assert files["model.layers.1.self_attn.o_proj.weight"].shape == (256, 8 * 16)
    assert files["model.embed_tokens.weight"].shape == (512, 256)


def test_sharding_splits_and_indexes_every_tensor(make_ckpt, tiny_ckpt):
    ckpt = make_ckpt(shard_max_gb=0.002)
    shards = sorted(p.name for p in ckpt.glob("*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for p in ckpt.glob("*.safetensors"):
        assert p.stat().st_size < 0.002e9 + 64 * 1024 or len(safe_open(str(p), "pt").keys()) == 1
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    files = _file_tensors(ckpt)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in files.values())
    assert set(index["weight_map"].values()) == set(shards)
    single = _file_tensors(tiny_ckpt)  # same seed: sharding does not change a single value
    assert set(single) == set(files) and all(torch.equal(single[k], files[k]) for k in files)


def test_weights_depend_on_seed_and_name_only():
    spec = synth.TensorSpec("x", (2 * synth.CHUNK + 5,), 0.0, 1.0)
    with ThreadPoolExecutor(1) as one, ThreadPoolExecutor(3) as three:
        a = synth.generate(spec, torch.float32, 7, one)
        b = synth.generate(spec, torch.float32, 7, three)
        c = synth.generate(spec, torch.float32, 8, three)
        d = synth.generate(synth.TensorSpec("y", spec.shape, 0.0, 1.0), torch.float32, 7, three)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    assert not torch.equal(a[: synth.CHUNK], a[synth.CHUNK: 2 * synth.CHUNK])  # chunks are not repeats
    assert abs(a.std().item() - 1.0) < 0.01 and abs(a.mean().item()) < 0.01


def test_weight_scales_are_sensible(tiny_ckpt):
    files = _file_tensors(tiny_ckpt)
    norm = files["model.layers.0.input_layernorm.weight"]
    assert 0.9 < norm.mean().item() < 1.1 and 0.01 < norm.std().item() < 0.2  # near 1, not exactly 1
    v = files["model.layers.0.self_attn.v_proj.weight"]
    assert abs(v.std().item() * 256 ** 0.5 - 1.0) < 0.05  # N(0, 1/fan_in)
    q = files["model.layers.0.self_attn.q_proj.weight"]
    assert abs(q.std().item() / v.std().item() - synth.QK_GAIN) < 0.1
    o = files["model.layers.0.self_attn.o_proj.weight"]
    assert abs(o.std().item() * 256 ** 0.5 * (2 * 2) ** 0.5 - 1.0) < 0.05  # branches: / sqrt(2 * layers)
    embed = files["model.embed_tokens.weight"]
    assert abs(embed[:900].std().item() - 1.0) < 0.02
    head = files["lm_head.weight"]
    assert torch.count_nonzero(head[984:]) == 0 and torch.count_nonzero(embed[984:]) > 0  # specials unpredicted
    assert abs(head[:984].std().item() * 256 ** 0.5 - 1.0) < 0.05


def _greedy(ckpt: Path, dtype: torch.dtype, n_new: int = 32):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(ckpt), dtype=dtype).eval()
    ids = torch.tensor(load_tokenizer(ckpt).encode(["the quick brown fox jumps over the lazy dog"], False))  # (1, seq)
    with torch.no_grad():
        logits = model(ids).logits  # (1, seq, vocab)
        out = model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
    return logits.float(), out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_generation_is_not_degenerate(make_ckpt, dtype):
    logits, new = _greedy(make_ckpt(dtype=dtype), getattr(torch, dtype))
    assert torch.isfinite(logits).all()
    assert 0.3 < logits.std().item() < 3.0  # logits ~N(0, 1): neither flat nor one-hot
    assert len(new) == 32 and len(set(new)) >= 8, new
    assert max(new) < 984  # special tokens (EOS included) are never predicted: runs decode every token


def test_default_tiny_preset_generates(tmp_path):
    ckpt = synth.make_model(tmp_path / "tiny")  # the real default: 4 layers, bf16, vocab 128256
    cfg = ModelConfig.from_hf_dir(ckpt)
    assert (cfg.num_hidden_layers, cfg.vocab_size, cfg.dtype) == (4, 128256, "bfloat16")
    logits, new = _greedy(ckpt, torch.float32, n_new=16)  # bf16 weights, fp32 compute: CPU bf16 is slow
    assert torch.isfinite(logits).all() and 0.3 < logits.std().item() < 3.0
    assert len(set(new)) >= 6, new


# ---- refusals and atomicity ------------------------------------------------------------------------


def test_non_empty_output_is_refused_unless_forced(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not empty.*--force"):
        synth.make_model(out, layers=1, overrides={"vocab_size": 384})
    assert (out / "keep.txt").is_file()
    synth.make_model(out, layers=1, overrides={"vocab_size": 384}, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp or old dirs left


def test_failure_leaves_nothing_half_written(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(synth, "write_weights", boom)
    with pytest.raises(OSError):
        synth.make_model(tmp_path / "m", layers=1, overrides={"vocab_size": 384})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, match", [
    ({"preset": "llama2"}, "tiny, llama3.1-8b, llama3.1-70b"),
    ({"dtype": "int8"}, "dtype"),
    ({"layers": 0}, "layers"),
    ({"overrides": {"num_attention_heads": 7}}, "multiple"),
    ({"overrides": {"num_key_value_heads": 3}}, "num_key_value_heads"),
    ({"overrides": {"vocab_size": 100}}, "too small"),
    ({"shard_max_gb": 0}, "shard_max_gb"),
])
def test_bad_arguments_are_user_errors(tmp_path, kwargs, match):
    with pytest.raises(UserError, match=match):
        synth.make_model(tmp_path / "m", **kwargs)
    assert not (tmp_path / "m").exists()


# ---- CLI -----------------------------------------------------------------------------------------------


def test_cli_make_model(tmp_path, monkeypatch, capsys):
    r = bench_inprocess(monkeypatch, capsys, "-v", "WARNING", "make-model", str(tmp_path / "m"), "--layers", "1",
                        "--dtype", "float16", "--seed", "3", "--tie-embeddings")
    assert r.returncode == 0 and str(tmp_path / "m") in r.stdout and "GB" in r.stdout
    cfg = ModelConfig.from_hf_dir(tmp_path / "m")
    assert cfg.num_hidden_layers == 1 and cfg.dtype == "float16" and cfg.tie_word_embeddings
    assert "lm_head.weight" not in _file_tensors(tmp_path / "m")


def test_cli_presets_match_the_library():
    choices = cli.bench.commands["make-model"].params[1].type.choices
    assert tuple(choices) == (*synth.PRESETS, *TRAINED_PRESETS)


def test_cli_user_error_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x").write_text("x")
    r = bench_inprocess(monkeypatch, capsys, "make-model", str(tmp_path / "m"))
    assert r.returncode == 2
    assert r.stderr.startswith("error:") and "--force" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
