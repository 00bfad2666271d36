"""The checkpoint tokenizer without transformers (worker.text.checkpoint): the same ids and text as
AutoTokenizer on every tokenizer the project makes and on Llama-3.1-style configs, the fallback
where it would not be, and no transformers import on a run's path."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from worker.text.checkpoint import DirectTokenizer, HFTokenizer, direct_refusal, load_tokenizer, special_token_policy
from worker.text.prompts import encode_batch, synth_prompts
from worker.text.tokenizer import BOS, EOS, build_tokenizer, save_tokenizer

TEXTS = ["Hello, world!", "  leading and trailing  ", "tabs\tand\nnew\r\nlines", "héllo wörld — ünïcödé",
         "漢字とかな 🙂👍🏽", "x=1; y = x**2 # don't", "it 's here , isn't it ? yes .", "",
         "<|begin_of_text|>starts", "x<|begin_of_text|>y", "a <|end_of_text|> b", " <|eot_id|> ",
         "<pad> padded <pad>", "f01 k002 Q a17", "f01<|begin_of_text|>k002", "<|reserved_special_token_3|>"]


def _edit_json(path: Path, **changes) -> None:
    doc = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            doc.pop(k, None)
        else:
            doc[k] = v
    path.write_text(json.dumps(doc))


def _synth(d: Path, vocab: int = 1000, **config) -> Path:
    save_tokenizer(build_tokenizer(vocab), d, model_max_length=4096)
    _edit_json(d / "tokenizer_config.json", **config)
    return d


def _truncating(d: Path) -> Path:
    """A tokenizer.json that truncates and pads: AutoTokenizer encodes without either unless asked."""
    raw = build_tokenizer(1000)
    raw.enable_truncation(max_length=3)
    raw.enable_padding(length=24, pad_id=0, pad_token="!")
    save_tokenizer(raw, d, model_max_length=4096)
    return d


def _llama31(d: Path, **config) -> Path:
    """What Meta's Llama 3.1 ships: a post-processor that writes BOS, every special token listed in
    added_tokens_decoder, a chat template, clean_up_tokenization_spaces true, no add_bos_token."""
    raw = build_tokenizer(1000)
    bos = raw.token_to_id(BOS)
    raw.post_processor = processors.TemplateProcessing(single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                                                       special_tokens=[(BOS, bos)])
    save_tokenizer(raw, d, model_max_length=131072)
    decoder = {str(i): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True}
               for i, t in sorted(raw.get_added_tokens_decoder().items())}
    _edit_json(d / "tokenizer_config.json", **{
        "add_bos_token": None, "add_eos_token": None, "added_tokens_decoder": decoder, "eos_token": "<|eot_id|>",
        "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
        "clean_up_tokenization_spaces": True, **config})
    return d


def _recall(d: Path, **config) -> Path:
    """The recall preset's committed tokenizer (word level; BOS / EOS only in the model's vocabulary)."""
    from worker.recall.build import REFERENCE

    d.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REFERENCE / name, d / name)
    _edit_json(d / "tokenizer_config.json", **config)
    return d


def _wordlevel(d: Path, **config) -> Path:
    """A non-BPE model where clean_up_tokenization_spaces does apply."""
    words = ["hello", "world", ".", ",", "?", "n't", "'s", "it", "is", BOS, EOS, "[UNK]"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.json").write_text(tok.to_str())
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                         "bos_token": BOS, "eos_token": EOS, **config}))
    return d


CASES = {
    "synth-1000": lambda d: _synth(d),
    "synth-128256": lambda d: _synth(d, vocab=128256),
    "synth-add-bos": lambda d: _synth(d, add_bos_token=True),
    "synth-pad-existing": lambda d: _synth(d, pad_token="<|finetune_right_pad_id|>"),
    "synth-pad-new": lambda d: _synth(d, pad_token="<pad>", unk_token="<unk>"),
    "synth-no-bos-key": lambda d: _synth(d, add_bos_token=None, add_eos_token=None),
    "synth-truncating": _truncating,
    "llama3.1": lambda d: _llama31(d),
    "llama3.1-add-bos": lambda d: _llama31(d, add_bos_token=True),
    "llama3.1-dict-token": lambda d: _llama31(d, bos_token={"__type": "AddedToken", "content": BOS, "lstrip": False,
                                                            "normalized": False, "rstrip": False,
                                                            "single_word": False, "special": True}),
    "recall": lambda d: _recall(d),
    "recall-pad-new": lambda d: _recall(d, pad_token="<pad>"),
    "wordlevel-clean-up": lambda d: _wordlevel(d, clean_up_tokenization_spaces=True),
}


def _ids_to_decode(hf, texts) -> list[list[int]]:
    """Each text's ids with the special ids around them, and a few random id sequences."""
    specials = [i for i in (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) if i is not None]
    out = [specials + hf.encode(t, add_special_tokens=False) + specials[::-1] for t in texts]
    rng = random.Random(0)
    return out + [[rng.randrange(len(hf)) for _ in range(rng.randrange(1, 40))] for _ in range(20)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_direct_tokenizer_equals_auto_tokenizer(case, tmp_path):
    from transformers import AutoTokenizer

    d = CASES[case](tmp_path / case)
    hf = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    tok = load_tokenizer(d)
    assert isinstance(tok, DirectTokenizer), case
    for special in (False, True):
        assert tok.encode(TEXTS, special) == hf(TEXTS, add_special_tokens=special)["input_ids"], (case, special)
    for ids in _ids_to_decode(hf, TEXTS):
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), (ids, skip)
    assert tok.get_vocab() == hf.get_vocab() and len(tok) == len(hf)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == \
        (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id)
    assert special_token_policy(tok) == special_token_policy(hf)
    policy = special_token_policy(tok)  # the batch as the engine feeds it
    assert encode_batch(tok, TEXTS[:7], 16, policy) == [ids[-16:] for ids in hf(TEXTS[:7], add_special_tokens=policy)
                                                        ["input_ids"]]


def test_prompt_synthesis_is_the_same_through_either_loader(tmp_path):
    d = _synth(tmp_path / "t")
    direct, hf = load_tokenizer(d), HFTokenizer(d)
    assert synth_prompts(direct, 3, 40, seed=1) == synth_prompts(hf, 3, 40, seed=1)


@pytest.mark.parametrize("change, why", [
    ({"tokenizer_class": "LlamaTokenizerFast"}, "tokenizer_class 'LlamaTokenizerFast'"),
    ({"split_special_tokens": True}, "keys split_special_tokens"),
    ({"additional_special_tokens": ["<x>"]}, "keys additional_special_tokens"),
    ({"auto_map": {"AutoTokenizer": ["a.B", None]}}, "keys auto_map"),
])
def test_anything_else_is_refused_with_its_reason(tmp_path, change, why):
    assert why in direct_refusal(_synth(tmp_path / "t", **change))


def test_the_fallback_is_auto_tokenizer_and_says_why(tmp_path, caplog):
    d = _synth(tmp_path / "t", split_special_tokens=False)
    with caplog.at_level("INFO", logger="worker.text.checkpoint"):
        tok = load_tokenizer(d)
    assert isinstance(tok, HFTokenizer) and tok.via == "transformers"
    assert "AutoTokenizer (tokenizer_config.json keys split_special_tokens)" in caplog.text
    assert tok.encode(TEXTS, False) == load_tokenizer(_synth(tmp_path / "u")).encode(TEXTS, False)


def test_fallback_without_tokenizer_json_or_config(tmp_path):
    d = _synth(tmp_path / "t")
    (d / "tokenizer_config.json").unlink()
    assert "no tokenizer_config.json" in direct_refusal(d)
    (d / "tokenizer.json").unlink()
    assert direct_refusal(d) == "no tokenizer.json"


def test_a_broken_tokenizer_json_is_a_user_error(tmp_path):
    from worker.errors import UserError

    d = _synth(tmp_path / "t")
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot load the tokenizer"):
        load_tokenizer(d)


def _python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def test_loading_a_tokenizer_does_not_import_transformers(tiny_ckpt):
    r = _python(f"""
import sys
from worker.text.checkpoint import load_tokenizer
from worker.text.prompts import synth_prompts
tok = load_tokenizer({str(tiny_ckpt)!r})
synth_prompts(tok, 2, 16, seed=0)
assert tok.via == "tokenizers", tok.via
assert "transformers" not in sys.modules, "transformers imported"
""")
    assert r.returncode == 0, r.stderr


def test_a_run_does_not_import_transformers(tiny_ckpt, tmp_path):
    """A whole `bench run` (gpu mode on the CPU) in a fresh process, then sys.modules."""
    r = _python(f"""
import os, sys
os.environ["STREAMBENCH_CACHE"] = {str(tmp_path / "cache")!r}
from worker.run import run_from_overrides
run_from_overrides({{"checkpoints": {str(tiny_ckpt)!r}, "mode": "gpu", "prompt_len": 8, "max_new_tokens": 2,
                    "max_seq_len": 32, "warmup_rounds": 0, "roofline": False, "out_json": None,
                    "pack_dir": {str(tmp_path / "pack")!r}}})
heavy = sorted(m for m in ("transformers", "accelerate", "jinja2", "ray", "pandas", "pyarrow", "ruptures",
                           "matplotlib", "torch._dynamo") if m in sys.modules)
assert not heavy, heavy
""", timeout=170)
    assert r.returncode == 0, r.stderr[-3000:]
