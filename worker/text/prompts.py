"""Prompts: synthesizing exact-length prompt files (`bench make-prompts`) and the seed's handling.

The seed benchmarks with a file of 512 prompts of 2048 tokens (`prompts_batch512_len2048.txt`).
Synthesized prompts are words drawn from the tokenizer's own vocabulary: single-token words with a
leading space (`Ġword`), so a prompt's token count is the sum of its words' counts and a prompt of
exactly N tokens is built directly, then checked by encoding it (and repaired if a tokenizer does
not add up). The seed's rules for a batch: encode each prompt on its own, keep the last
`max_prompt_tokens` tokens of a longer one; prompts cycle when there are fewer than the batch size.
`prompt_ids_for` applies them to a run's config, and `eos_ids` / `pad_id` are the tokenizer's stop and
pad tokens; both engines (`run` and `peer`) feed the same batch through these.
"""

from __future__ import annotations

import contextlib
import logging
import random
import weakref
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer

from worker.config import RunConfig
from worker.errors import UserError
from worker.files import write_atomic
from worker.text import poolcache
from worker.text.checkpoint import load_tokenizer, special_token_policy

log = logging.getLogger(__name__)

WORD_MARKERS = ("Ġ", "▁")  # byte-level BPE and sentencepiece spellings of a leading space
POOL_CANDIDATES = 8192  # vocabulary words examined for the pool (bounded: prompt making takes seconds)
MAX_REPAIRS = 64
_POOLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def encode_texts(tokenizer, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
    """Token ids of each text, encoded separately (a checkpoint's tokenizer, `worker.text.checkpoint`,
    or a bare `tokenizers.Tokenizer`)."""
    if not texts:
        return []
    if isinstance(tokenizer, Tokenizer):
        return [e.ids for e in tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)]
    return tokenizer.encode(texts, add_special_tokens)


def word_pool(tokenizer) -> tuple[list[str], dict[str, int]]:
    """Lowercase words that are one token after a space, and each word's cost at the start of a text.

    Deterministic for a given vocabulary (sorted, then a fixed sample when the vocabulary is large).
    Kept per tokenizer object and on disk per tokenizer (`worker.text.poolcache`): for a 128k
    vocabulary it costs about as much as loading the tokenizer, which a worker that keeps its
    tokenizer (`reuse: weights`) would otherwise pay every run, and a fresh process every time.
    """
    try:
        return _POOLS[tokenizer]
    except (KeyError, TypeError):  # TypeError: not weak-referenceable (then not kept)
        pass
    pool = poolcache.cached_pool(tokenizer, _word_pool, Path(__file__))
    with contextlib.suppress(TypeError):
        _POOLS[tokenizer] = pool
    return pool


def _word_pool(tokenizer) -> tuple[list[str], dict[str, int]]:
    vocab = tokenizer.get_vocab()
    words = sorted({t[1:] for t in vocab if t[:1] in WORD_MARKERS and t[1:].isascii() and t[1:].isalpha()
                    and t[1:].islower()})
    if len(words) > POOL_CANDIDATES:
        words = sorted(random.Random(0).sample(words, POOL_CANDIDATES))
    spaced = encode_texts(tokenizer, [" " + w for w in words])
    bare = encode_texts(tokenizer, words)
    pool = [w for w, ids in zip(words, spaced) if len(ids) == 1]
    if not pool:
        raise UserError("the tokenizer has no single-token words (' word' as one token), so prompts of an exact "
                        "length cannot be synthesized; pass a prompt file with --prompts instead")
    single = set(pool)
    first_cost = {w: len(ids) for w, ids in zip(words, bare) if w in single}
    return pool, first_cost


def synth_prompts(tokenizer, n: int, length: int, seed: int) -> list[str]:
    """`n` single-line prompts of exactly `length` tokens each (no special tokens), deterministic in `seed`."""
    if n < 1:
        raise UserError(f"number of prompts must be >= 1 (got {n})")
    if length < 1:
        raise UserError(f"prompt length must be >= 1 token (got {length})")
    pool, first_cost = word_pool(tokenizer)
    openers = [w for w in pool if first_cost[w] <= length]
    if not openers:
        raise UserError(f"no word of the tokenizer fits a prompt of {length} token(s); use a longer --len")
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        first = rng.choice(openers)
        texts.append(" ".join([first, *rng.choices(pool, k=length - first_cost[first])]))
    for i, ids in enumerate(encode_texts(tokenizer, texts)):
        if len(ids) != length:
            texts[i] = _repair(tokenizer, texts[i], length, pool, rng)
    return texts


def _repair(tokenizer, text: str, length: int, pool: list[str], rng: random.Random) -> str:
    """Drop or append words until the text encodes to exactly `length` tokens."""
    words = text.split(" ")
    for _ in range(MAX_REPAIRS):
        got = len(encode_texts(tokenizer, [" ".join(words)])[0])
        if got == length:
            return " ".join(words)
        if got > length and len(words) > 1:
            words = words[:max(1, len(words) - (got - length))]
        elif got < length:
            words += rng.choices(pool, k=length - got)
        else:
            break
    raise RuntimeError(f"could not build a prompt of exactly {length} tokens with this tokenizer")


def make_prompts(checkpoint_dir: str | Path, n: int, length: int, out_path: str | Path, seed: int = 0) -> Path:
    """Write `n` prompts of exactly `length` tokens (the checkpoint's tokenizer), one per line, atomically."""
    tokenizer = load_tokenizer(checkpoint_dir)
    texts = synth_prompts(tokenizer, n, length, seed)
    out = write_atomic(out_path, "\n".join(texts) + "\n", "prompt file")
    log.info("wrote %d prompts of %d tokens to %s", n, length, out)
    return out


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per line (the line break removed, nothing else); blank lines are skipped."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompt file {str(p)!r} does not exist: pass an existing file to --prompts "
                        "(make one with `bench make-prompts`)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"prompt file {str(p)!r} is not UTF-8 text (byte {e.start}); re-save it as UTF-8") from None
    prompts = [line for line in text.split("\n") if line.strip()]
    if not prompts:
        raise UserError(f"prompt file {str(p)!r} is empty: write one prompt per line "
                        "(or make one with `bench make-prompts`)")
    return prompts


def encode_batch(tokenizer, texts: Sequence[str], max_prompt_tokens: int,
                 add_special_tokens: bool) -> list[list[int]]:
    """The seed's rule: encode each prompt separately and keep the LAST `max_prompt_tokens` tokens."""
    if max_prompt_tokens < 1:
        raise UserError(f"max_prompt_tokens must be >= 1 (got {max_prompt_tokens}): lower max_new_tokens "
                        "or raise max_seq_len")
    out = []
    for i, ids in enumerate(encode_texts(tokenizer, texts, add_special_tokens=add_special_tokens)):
        if not ids:
            raise UserError(f"prompt {i} is empty (0 tokens): remove it or give it some text")
        out.append(list(ids[-max_prompt_tokens:]))
    return out


def select_prompts(texts: Sequence[str], batch_size: int) -> list[str]:
    """The first `batch_size` prompts, cycling through them when there are fewer."""
    if not texts:
        raise UserError("no prompts given: pass --prompt TEXT, --prompts FILE or --prompt-len N")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1 (got {batch_size})")
    return [texts[i % len(texts)] for i in range(batch_size)]


def prompt_ids_for(tok, cfg: RunConfig) -> list[list[int]]:
    """The batch as fed: prompts chosen, each tokenized alone, keeping its last max_prompt_tokens."""
    if cfg.prompt is not None:
        texts = [cfg.prompt]
    elif cfg.prompts is not None:
        texts = read_prompt_file(cfg.prompts)
    else:
        texts = synth_prompts(tok, cfg.batch_size, cfg.prompt_len or min(128, cfg.max_prompt_tokens),
                              cfg.sampling.seed)
    return encode_batch(tok, select_prompts(texts, cfg.batch_size), cfg.max_prompt_tokens,
                        special_token_policy(tok))


def eos_ids(tok) -> tuple[int, ...]:
    """The tokenizer's stop token: the engines' fallback when config.json names no eos_token_id."""
    return (tok.eos_token_id,) if tok.eos_token_id is not None else ()


def pad_id(tok) -> int:
    """Filler of short prompts' rows and finished rows' tails; a tokenizer without a pad token (Llama's)
    pads with its EOS."""
    for cand in (tok.pad_token_id, tok.eos_token_id, 0):
        if cand is not None:
            return int(cand)
    return 0
