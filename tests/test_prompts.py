"""Prompts: exact-length synthesis, prompt files, the seed's truncation and cycling, the CLI."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from benchcli import bench
from tokenizers import Tokenizer, processors

import cli
from worker.errors import UserError
from worker.text.prompts import (
    encode_batch,
    encode_texts,
    make_prompts,
    read_prompt_file,
    select_prompts,
    synth_prompts,
    word_pool,
)
from worker.text.checkpoint import load_tokenizer
from worker.text.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    """The tiny checkpoint's tokenizer as the engine loads it (tokenizers, vocabulary 1000)."""
    return load_tokenizer(tiny_ckpt)


@pytest.fixture(scope="module")
def big_tok():
    return build_tokenizer(128256)


def _lengths(tokenizer, texts):
    return [len(ids) for ids in encode_texts(tokenizer, texts)]


# ---- synthesis --------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 2, 3, 17, 256])
def test_synth_prompts_have_exact_length(tok, big_tok, length):
    for tokenizer in (tok, big_tok, build_tokenizer(298)):
        texts = synth_prompts(tokenizer, 6, length, seed=1)
        assert _lengths(tokenizer, texts) == [length] * 6
        assert all("\n" not in t and "\r" not in t and t == t.strip() for t in texts)


def test_synth_prompts_are_deterministic_and_varied(tok):
    a = synth_prompts(tok, 4, 200, seed=0)
    assert a == synth_prompts(tok, 4, 200, seed=0)
    assert a != synth_prompts(tok, 4, 200, seed=1)
    assert len(set(a)) == 4
    for text in a:
        assert len(set(text.split())) >= 20  # not one word repeated


def test_word_pool_holds_single_token_words(big_tok):
    pool, first_cost = word_pool(big_tok)
    assert len(pool) >= 1000 and pool == sorted(pool)
    assert _lengths(big_tok, [" " + w for w in pool[:200]]) == [1] * 200
    assert all(first_cost[w] >= 1 for w in pool)


def test_tokenizer_without_single_token_words_is_refused():
    bare = Tokenizer.from_str(build_tokenizer(298).to_str())
    vocab = {t: i for t, i in bare.get_vocab().items() if not (t.startswith("Ġ") and len(t) > 1)}
    from tokenizers import models
    bare.model = models.BPE(vocab=vocab, merges=[])
    with pytest.raises(UserError, match="single-token"):
        synth_prompts(bare, 1, 10, seed=0)


@pytest.mark.parametrize("n, length", [(0, 10), (3, 0)])
def test_synth_prompts_bad_sizes(tok, n, length):
    with pytest.raises(UserError):
        synth_prompts(tok, n, length, seed=0)


# ---- prompt files ----------------------------------------------------------------------------------------


def test_make_prompts_writes_exact_prompts_atomically(tiny_ckpt, tok, tmp_path):
    out = make_prompts(tiny_ckpt, 5, 64, tmp_path / "sub" / "p.txt", seed=3)
    lines = out.read_text().split("\n")
    assert len(lines) == 6 and lines[-1] == ""  # 5 prompts, newline-terminated
    prompts = read_prompt_file(out)
    assert prompts == synth_prompts(tok, 5, 64, seed=3)
    assert _lengths(tok, prompts) == [64] * 5
    assert sorted(p.name for p in out.parent.iterdir()) == ["p.txt"]  # no temp files left


def test_seed_size_prompt_file_takes_seconds(tiny_ckpt, tok, tmp_path):
    t0 = time.perf_counter()
    out = make_prompts(tiny_ckpt, 512, 2048, tmp_path / "p.txt")
    elapsed = time.perf_counter() - t0
    prompts = read_prompt_file(out)
    assert len(prompts) == 512 and set(_lengths(tok, prompts)) == {2048}
    assert len(set(prompts)) == 512
    assert elapsed < 30, f"512 x 2048 prompts took {elapsed:.1f} s"


def test_read_prompt_file_skips_blank_lines_and_keeps_text(tmp_path):
    p = tmp_path / "p.txt"
    p.write_bytes("first prompt\r\n\n   \n  second, with spaces  \nthird\n".encode())
    assert read_prompt_file(p) == ["first prompt", "  second, with spaces  ", "third"]


@pytest.mark.parametrize("content, match", [(None, "does not exist"), ("", "is empty"), ("\n \n\t\n", "is empty"),
                                            (b"\xff\xfe bad", "UTF-8")])
def test_read_prompt_file_errors(tmp_path, content, match):
    p = tmp_path / "p.txt"
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif content is not None:
        p.write_text(content)
    with pytest.raises(UserError, match=match) as e:
        read_prompt_file(p)
    assert str(p) in str(e.value)


# ---- the seed's batch rules ---------------------------------------------------------------------------------


def test_encode_batch_keeps_the_tail_of_long_prompts(tok):
    long_text, short_text = synth_prompts(tok, 1, 50, seed=0)[0], "Hello, world!"
    full = encode_texts(tok, [long_text, short_text])
    got = encode_batch(tok, [long_text, short_text], max_prompt_tokens=20, add_special_tokens=False)
    assert got[0] == full[0][-20:] and len(got[0]) == 20 and got[0] != full[0][:20]
    assert got[1] == full[1]  # shorter prompts are untouched
    assert encode_batch(tok, [long_text], 50, False)[0] == full[0]


def test_encode_batch_each_prompt_alone(tok):
    texts = ["a b c", "Hello, world!", "a b c"]
    got = encode_batch(tok, texts, 100, False)
    assert got == [encode_texts(tok, [t])[0] for t in texts]


def test_encode_batch_passes_the_special_token_policy():
    raw = build_tokenizer(384)
    bos = raw.token_to_id("<|begin_of_text|>")
    raw.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    assert encode_batch(raw, ["hi"], 10, add_special_tokens=True)[0][0] == bos
    assert bos not in encode_batch(raw, ["hi"], 10, add_special_tokens=False)[0]


def test_empty_prompt_is_refused(tok):
    with pytest.raises(UserError, match="prompt 1 is empty"):
        encode_batch(tok, ["ok", ""], 10, False)
    with pytest.raises(UserError, match="max_prompt_tokens"):
        encode_batch(tok, ["ok"], 0, False)


def test_select_prompts_cycles():
    assert select_prompts(["a", "b", "c"], 2) == ["a", "b"]
    assert select_prompts(["a", "b"], 5) == ["a", "b", "a", "b", "a"]
    assert select_prompts(["a"], 1) == ["a"]
    with pytest.raises(UserError):
        select_prompts([], 2)
    with pytest.raises(UserError):
        select_prompts(["a"], 0)


# ---- CLI ------------------------------------------------------------------------------------------------------


def test_cli_make_prompts(tiny_ckpt, tok, tmp_path, monkeypatch, capsys):
    out = tmp_path / "p.txt"
    monkeypatch.setattr(sys, "argv", ["bench", "-v", "WARNING", "make-prompts", "--checkpoints", str(tiny_ckpt),
                                      "--n", "3", "--len", "40", "--out", str(out), "--seed", "2"])
    cli.main()
    assert str(out) in capsys.readouterr().out
    assert read_prompt_file(out) == synth_prompts(tok, 3, 40, seed=2)


def test_cli_missing_checkpoint_exits_2_without_traceback(tmp_path):
    res = bench("make-prompts", "--checkpoints", str(tmp_path / "nope"), "--out", str(tmp_path / "p.txt"))
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error:") and "make-model" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert not (tmp_path / "p.txt").exists()


# ---- the word pool on disk (worker.text.poolcache) ---------------------------------------------------


def _tokenizer_copy(tiny_ckpt, dst):
    import shutil

    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_ckpt / name, dst / name)
    return dst


def test_a_fresh_tokenizer_gets_its_word_pool_from_disk(tiny_ckpt, tmp_path, monkeypatch):
    """A second process (here: a new tokenizer object, the in-memory pool gone) reads the entry the
    first wrote instead of deriving the pool again, and gets the same pool and the same prompts."""
    from worker.text import poolcache, prompts

    monkeypatch.setenv("STREAMBENCH_CACHE", str(tmp_path / "cache"))
    path = _tokenizer_copy(tiny_ckpt, tmp_path / "tok")
    first = load_tokenizer(path)
    pool = word_pool(first)
    texts = synth_prompts(first, 3, 40, seed=1)
    entries = list((tmp_path / "cache" / "prompt-pools").glob("*.json"))
    assert len(entries) == 1 and entries[0] == poolcache.entry_path(poolcache.pool_key(first, Path(prompts.__file__)))

    def derive(_):
        raise AssertionError("derived again although the entry is on disk")

    monkeypatch.setattr(prompts, "_word_pool", derive)
    second = load_tokenizer(path)
    assert second is not first and word_pool(second) == pool
    assert synth_prompts(second, 3, 40, seed=1) == texts


def test_another_tokenizer_or_a_broken_entry_derives_the_pool_again(tiny_ckpt, tmp_path, monkeypatch):
    """The key covers the tokenizer's files: an edited tokenizer_config.json is another entry. An
    entry that does not parse is derived again (same pool) and rewritten, not trusted."""
    import json as json_

    from worker.text import poolcache, prompts

    monkeypatch.setenv("STREAMBENCH_CACHE", str(tmp_path / "cache"))
    code = Path(prompts.__file__)
    a = _tokenizer_copy(tiny_ckpt, tmp_path / "a")
    b = _tokenizer_copy(tiny_ckpt, tmp_path / "b")
    cfg = json_.loads((b / "tokenizer_config.json").read_text())
    (b / "tokenizer_config.json").write_text(json_.dumps(cfg, indent=4))  # same settings, other bytes
    ta, tb = load_tokenizer(a), load_tokenizer(b)
    assert poolcache.pool_key(ta, code) != poolcache.pool_key(tb, code)
    assert poolcache.pool_key(ta, code) == poolcache.pool_key(load_tokenizer(a), code)

    calls = []
    real = prompts._word_pool

    def counting(tok):
        calls.append(tok)
        return real(tok)

    monkeypatch.setattr(prompts, "_word_pool", counting)
    pool = word_pool(ta)
    entry = poolcache.entry_path(poolcache.pool_key(ta, code))
    entry.write_text('{"pool": ["trunc')  # a torn or foreign file
    assert word_pool(load_tokenizer(a)) == pool and len(calls) == 2
    assert json_.loads(entry.read_text())["pool"] == pool[0]  # rewritten whole
    assert word_pool(load_tokenizer(a)) == pool and len(calls) == 2  # and now read again
