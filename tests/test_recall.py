"""The recall model (issue 14.1): its task, tokenizer, training script, the committed reference
checkpoint, and the CI proof that top-k block attention retrieves what exact attention retrieves.

The claim tested here goes through the project's engine (`worker.run.run`, the `bench run` path):
on the committed cpu-size model, passkey retrieval at 2k tokens with the KV cache offloaded to the
CPU tier and a 256-token top-k budget equals exact attention's.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from benchcli import bench_inprocess

from worker.recall.build import (
    REFERENCE,
    SIZES,
    copy_reference,
    make_recall_model,
    read_meta,
    task_of,
)
from worker.recall.passkey import run_passkeys, write_passkeys
from worker.recall.task import IGNORE, RecallTask, accuracy, passkey_prompts, sample
from worker.recall.train import Stage, TrainConfig
from worker.recall.vocab import build_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TASK = RecallTask(pairs=3, value_tokens=2, keys=8, values_per_slot=5, fillers=4)


# ---- the task --------------------------------------------------------------------------------------


def test_rows_hold_every_record_once_and_the_queries_ask_for_them():
    v = TASK.vocab
    b = sample(TASK, 16, 40, 2, torch.Generator().manual_seed(0))
    assert b.ids.shape == (16, 40 + 2 * TASK.query - 2) and b.answers.shape == (16, 2, TASK.value_tokens)
    for ids, labels, answers in zip(b.ids.tolist(), b.labels.tolist(), b.answers.tolist()):
        ctx = ids[:38]
        keys = [i for i, t in enumerate(ctx) if t in v.key_ids]
        assert len(keys) == TASK.pairs and len({ctx[i] for i in keys}) == TASK.pairs  # distinct keys, once each
        for s in range(TASK.value_tokens):
            vals = [t for t in ctx if t in v.value_ids(s)]
            assert len(vals) == len(set(vals)) == TASK.pairs  # a slot's symbols are distinct in a context
        records = {ctx[i]: ctx[i + 1:i + TASK.record] for i in keys}
        tail = ids[38:]
        for q, ans in enumerate(answers):
            part = tail[q * TASK.query:(q + 1) * TASK.query]
            assert part[0] == v.query_id and records[part[1]] == ans == part[2:]
        assert [t for t in labels if t != IGNORE] == [t for a in answers for t in a]  # loss on the answers only


def test_passkey_prompts_have_the_exact_length_and_end_with_a_query():
    prompts, answers = passkey_prompts(TASK, 4, 30, seed=1)
    assert [len(p) for p in prompts] == [30] * 4 and all(p[-2] == TASK.vocab.query_id for p in prompts)
    assert passkey_prompts(TASK, 4, 30, seed=1) == (prompts, answers)  # deterministic in the seed
    assert accuracy([a + [0] for a in answers], answers) == 1.0 and accuracy([[0, 0]] * 4, answers) == 0.0


def test_bad_task_sizes_are_refused():
    with pytest.raises(ValueError, match="pairs must be"):
        RecallTask(pairs=9, keys=8)
    with pytest.raises(ValueError, match="too short"):
        sample(TASK, 1, TASK.min_length() - 1, 1, torch.Generator())
    with pytest.raises(ValueError, match="queries must be"):
        sample(TASK, 1, 40, 0, torch.Generator())


def test_the_tokenizer_is_one_token_per_word_and_round_trips(tmp_path):
    from worker.recall.vocab import save_tokenizer
    from worker.text.checkpoint import load_tokenizer

    vocab = TASK.vocab
    assert vocab.size % 64 == 0 and len(set(vocab.words)) == vocab.size
    prompts, _ = passkey_prompts(TASK, 3, 25, seed=2)
    tok = build_tokenizer(vocab)
    save_tokenizer(vocab, tmp_path, 4096)
    loaded = load_tokenizer(tmp_path)  # what the engine loads, local files only
    for p in prompts:
        text = tok.decode(p)
        assert len(text.split()) == 25 and tok.encode(text).ids == p
        assert loaded.encode([text], False) == [p]


# ---- training and the checkpoint ------------------------------------------------------------------


def test_the_training_script_writes_an_hf_checkpoint(tmp_path):
    from transformers import LlamaForCausalLM

    base = SIZES["cpu"]
    cfg = TrainConfig(base.geometry, (Stage(24, 3, 4),), task=TASK, queries=2, eval_prompts=4)
    out = make_recall_model(tmp_path / "m", cfg=cfg, device=torch.device("cpu"))
    model = LlamaForCausalLM.from_pretrained(out)
    c = model.config
    assert c.num_key_value_heads < c.num_attention_heads and c.rope_parameters["rope_type"] == "llama3"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "recall.json", "tokenizer.json", "tokenizer_config.json"]
    meta = read_meta(out)
    assert task_of(out) == TASK and meta["stages"][0]["steps"] == 3 and "exact_accuracy" in meta["stages"][0]
    assert meta["model_sha256"] == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()


def test_the_committed_reference_is_small_and_solved_2k_with_exact_attention():
    meta = read_meta(REFERENCE)
    assert (REFERENCE / "model.safetensors").stat().st_size <= 20e6
    assert meta["model_sha256"] == hashlib.sha256((REFERENCE / "model.safetensors").read_bytes()).hexdigest()
    assert meta["train"] == json.loads(json.dumps(SIZES["cpu"].to_dict()))  # trained by the committed recipe
    last = meta["stages"][-1]
    assert last["length"] == 2048 and last["exact_accuracy"] >= 0.9


# ---- the CI proof: through the engine ------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return copy_reference(tmp_path_factory.mktemp("recall") / "ref")


def test_the_engine_computes_what_hf_computes_on_the_reference(reference):
    """Tied embeddings, RoPE base 10000 with llama3 scaling and transformers-5 config keys: the engine's
    logits equal HF's on the trained model (fp32)."""
    from transformers import LlamaForCausalLM

    from worker.engine import build_engine
    from worker.model.step import Step
    from worker.pack.cache import ensure_pack
    from worker.run import resolve_config

    prompts, _ = passkey_prompts(task_of(reference), 2, 300, seed=3)
    ids = torch.tensor(prompts)
    engine = build_engine(resolve_config({"checkpoints": str(reference), "max_seq_len": 320, "batch_size": 2}),
                          ensure_pack(reference), torch.device("cpu"))
    try:
        got = engine.model.forward(ids, Step(torch.arange(300).expand(2, 300), 300, (300, 300)),
                                   engine.new_cache(2, 320), logits_at=torch.tensor([299, 299]))
    finally:
        engine.close()
    with torch.no_grad():
        want = LlamaForCausalLM.from_pretrained(reference).eval()(input_ids=ids).logits[:, -1]
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4), (got - want).abs().max()


OFFLOAD = {"kv_offload": "cpu", "kv_gpu_blocks": 4, "kv_block_tokens": 16}


@pytest.fixture(scope="module")
def passkeys_2k(reference, tmp_path_factory):
    """32 passkeys at 2k tokens and the exact run over them, the KV cache offloaded to the CPU tier."""
    keys = write_passkeys(reference, 32, 2048, seed=7, path=tmp_path_factory.mktemp("pk") / "passkeys.txt")
    exact = run_passkeys(reference, keys, OFFLOAD)
    assert exact["result"]["metrics"]["topk_blocks"] == 0
    assert exact["accuracy"] >= 0.9, exact["accuracy"]  # the model retrieves with exact attention
    return keys, exact


@pytest.mark.side
def test_passkeys_at_2k_with_a_256_token_budget_equal_exact(reference, passkeys_2k):
    """Top-k selection by the current query (every block on the device) retrieves what exact does."""
    keys, exact = passkeys_2k
    topk = run_passkeys(reference, keys, {"kv_offload": "none", "kv_block_tokens": 16, "topk_tokens": 256})
    assert topk["result"]["metrics"]["topk_budget_tokens"] == 256
    assert topk["hits"] == exact["hits"] and topk["accuracy"] == exact["accuracy"]


@pytest.mark.side
def test_passkeys_at_2k_with_a_256_token_budget_offloaded_equal_exact(reference, passkeys_2k):
    keys, exact = passkeys_2k
    topk = run_passkeys(reference, keys, {**OFFLOAD, "topk_tokens": 256})
    assert topk["result"]["metrics"]["topk_budget_tokens"] == 256
    assert topk["result"]["metrics"]["kv_blocks_read_per_step"] < exact["result"]["metrics"]["kv_blocks_read_per_step"]
    assert topk["hits"] == exact["hits"] and topk["accuracy"] == exact["accuracy"]


# ---- the command line --------------------------------------------------------------------------


def test_make_model_recall_writes_the_reference(tmp_path, monkeypatch, capsys):
    r = bench_inprocess(monkeypatch, capsys, "-v", "WARNING", "make-model", str(tmp_path / "m"), "--preset", "recall")
    assert r.returncode == 0 and str(tmp_path / "m") in r.stdout
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == (REFERENCE / "model.safetensors").read_bytes()


@pytest.mark.parametrize("args, expected", [
    (["--preset", "tiny", "--train-size", "cpu"], "--train-size applies to the recall preset only"),
    (["--preset", "recall", "--layers", "3"], "--layers does not apply"),
    (["--preset", "recall", "--dtype", "bfloat16"], "--dtype does not apply"),
    (["--preset", "recall", "--seed", "3"], "--seed needs --train-size"),
])
def test_make_model_recall_bad_options_are_one_line(tmp_path, monkeypatch, capsys, args, expected):
    r = bench_inprocess(monkeypatch, capsys, "make-model", str(tmp_path / "m"), *args)
    assert r.returncode == 2 and r.stderr.startswith("error:") and expected in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "m").exists()


@pytest.mark.parametrize("args, expected", [
    (["--budgets", "16"], "is not more than --block-tokens"),
    (["--dry-run", "--size", "gpu"], "drop --size gpu"),
    (["--n", "0"], "must be >= 1"),
])
def test_the_benchmark_refuses_bad_arguments_in_one_line(tmp_path, args, expected):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "topk_recall.py"), "--work", str(tmp_path), *args],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 2 and expected in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_the_benchmarks_mass_probe_measures_the_topk_step(tmp_path):
    """benchmarks/topk_recall.py's teacher-forced attention mass (`MassProbe` wraps the eager top-k step)
    on the committed model: it sees every (layer, step) and kept mass never exceeds the oracle's. The
    wrapper must follow the step's signature (it broke once when the step took the host tier's view)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import topk_recall

    from worker.engine import build_engine
    from worker.pack.cache import ensure_pack
    from worker.run import resolve_config

    ckpt = copy_reference(tmp_path / "recall")
    task = task_of(ckpt)
    prompts, answers = passkey_prompts(task, 4, 512, seed=3)
    a = topk_recall.parse(["--dry-run", "--mass-batch", "2", "--dtype", "auto"])  # the benchmark's own settings
    flat = {"checkpoints": str(ckpt), "max_seq_len": 512 + task.value_tokens, "batch_size": 2, "compile": False,
            "dtype": "float32"}
    engine = build_engine(resolve_config(flat), ensure_pack(ckpt, dtype="float32"), torch.device("cpu"))
    try:
        kept, oracle, per_layer = topk_recall.forced_mass(engine, a, prompts, answers, 128, torch.device("cpu"))
    finally:
        engine.close()
    assert 0 < kept <= oracle + 1e-6 <= 1 + 1e-6
    assert len(per_layer) == engine.cfg.num_hidden_layers and all(0 < x <= 1 + 1e-6 for x in per_layer)


def test_the_benchmarks_target_counts_one_point_as_one_point():
    """97 of 100 passkeys against exact's 96 is +1.0 point: within the 1-point target. The difference of
    the accuracies (0.97 - 0.96) is 1.0000000000000009 points, which read the H200's measured +1.0 at 32k
    as missing it."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import topk_recall

    assert topk_recall.delta_points(97, 96, 100) == 1.0 and topk_recall.delta_points(94, 96, 100) == -2.0
    row = {"delta_points": topk_recall.delta_points(97, 96, 100), "mass_kept": 0.998, "oracle": 1.0}
    assert topk_recall.target_met(row) is True
    assert topk_recall.target_met({**row, "delta_points": -2.0}) is False
    assert topk_recall.target_met({**row, "mass_kept": 0.85}) is False
    assert topk_recall.target_met({"delta_points": 1.0}) is None  # no mass figure: no verdict
