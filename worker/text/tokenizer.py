"""A real byte-level BPE tokenizer built locally, for synthetic checkpoints.

Synthetic checkpoints need a tokenizer that behaves like Llama 3's (byte-level BPE, the Llama 3
pre-tokenizer split, special tokens at the top of the id range) without downloading one. Training
on a corpus would be slow and data-dependent, so the vocabulary is constructed: the 256 byte
symbols, then lowercase-letter strings with and without the byte-level space marker `Ġ`, level by
level in order of length (a level only starts once the previous one is complete, so each token's
merge `(s[:-1], s[-1])` joins two tokens already in the vocabulary). Like Llama 3, the BPE model has
`ignore_merges`: a pre-token that is itself in the vocabulary is one token, so " word" is a single
token whenever `Ġword` is in the vocabulary.
"""

from __future__ import annotations

import json
import logging
import random
import string
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from worker.errors import UserError
from worker.files import write_atomic

log = logging.getLogger(__name__)

SPACE = "Ġ"  # the byte-level symbol of b" "
LETTERS = string.ascii_lowercase
# Llama 3's pre-tokenizer split (tokenizer.json of Meta-Llama-3.1); ByteLevel then maps bytes.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Llama 3.1's named special tokens by offset from the first special id; other offsets are reserved.
LLAMA3_NAMED = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>",
                6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>",
                10: "<|python_tag|>"}
LARGE_VOCAB = 32768  # from here on: Llama 3's 256 special tokens; below: 16 (same offsets)
BOS, EOS = LLAMA3_NAMED[0], LLAMA3_NAMED[1]


@dataclass(frozen=True)
class SpecialLayout:
    """Where the special tokens sit for a vocabulary size: ids `first .. vocab_size-1`."""

    vocab_size: int
    count: int

    @property
    def first(self) -> int:
        return self.vocab_size - self.count

    @property
    def names(self) -> list[str]:
        """Special token names in id order; the reserved ones are numbered as in Llama 3.1."""
        out, reserved = [], 0
        for off in range(self.count):
            if off in LLAMA3_NAMED:
                out.append(LLAMA3_NAMED[off])
            else:
                out.append(f"<|reserved_special_token_{reserved}|>")
                reserved += 1
        return out

    @property
    def bos_id(self) -> int:
        return self.first

    @property
    def eos_ids(self) -> list[int]:
        """end_of_text, eom, eot: Llama 3.1's generation_config eos list."""
        return [self.first + 1, self.first + 8, self.first + 9]


def special_layout(vocab_size: int) -> SpecialLayout:
    """Special-token layout for `vocab_size`; refuses sizes that cannot hold bytes + specials + a-z."""
    count = 256 if vocab_size >= LARGE_VOCAB else 16
    minimum = 256 + 16 + len(LETTERS)
    if vocab_size < minimum:
        raise UserError(f"vocab_size {vocab_size} is too small: a byte-level tokenizer needs at least {minimum} "
                        "(256 bytes + 16 special tokens + the 26 single-letter words); use a larger vocab_size")
    return SpecialLayout(vocab_size, count)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-character map (byte-level BPE's alphabet), in GPT-2 id order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


_PAIRS = [a + b for a in LETTERS for b in LETTERS]


def _word(index: int, length: int) -> str:
    """The `index`-th lowercase string of `length` letters in lexicographic order."""
    parts = []
    while length >= 2:
        index, r = divmod(index, len(_PAIRS))
        parts.append(_PAIRS[r])
        length -= 2
    if length:
        parts.append(LETTERS[index % len(LETTERS)])
    return "".join(reversed(parts))


def _merged_tokens(budget: int) -> list[str]:
    """`budget` merged tokens, level by level (token length in symbols), `Ġ`-words first in a level.

    A group that does not fit whole is a deterministic sample of it (so a large vocabulary does not
    consist only of words starting with 'a'); levels after it are never started.
    """
    out: list[str] = []
    level = 2
    while len(out) < budget:
        for prefix, letters in ((SPACE, level - 1), ("", level)):
            size = len(LETTERS) ** letters
            room = budget - len(out)
            if room <= 0:
                break
            if size <= room:
                picks = range(size)
            else:
                picks = sorted(random.Random(f"{prefix}{letters}").sample(range(size), room))
            out.extend(prefix + _word(i, letters) for i in picks)
        level += 1
    return out


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """A deterministic Llama-3-style byte-level BPE tokenizer with exactly `vocab_size` tokens."""
    layout = special_layout(vocab_size)
    byte_syms = list(bytes_to_unicode().values())
    merged = _merged_tokens(layout.first - len(byte_syms))
    vocab = {tok: i for i, tok in enumerate(byte_syms + merged)}
    merges = [(tok[:-1], tok[-1]) for tok in merged]
    assert all(a in vocab and b in vocab for a, b in merges), "a merge joins tokens not yet in the vocab"
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # No template: encoding adds no BOS, so prompts are tokenized exactly as the seed does.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in layout.names])
    got = tok.get_vocab_size(with_added_tokens=True)
    assert got == vocab_size and tok.token_to_id(BOS) == layout.bos_id, (got, vocab_size)
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: str | Path, model_max_length: int) -> None:
    """Write tokenizer.json + tokenizer_config.json so `AutoTokenizer` loads them offline.

    `add_bos_token` is false and the post-processor adds nothing: the engine tokenizes prompts
    without special tokens unless a checkpoint's config asks for them (`special_token_policy`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "tokenizer.json", tok.to_str(pretty=False), "tokenizer")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # keep decode(encode(x)) == x
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": int(model_max_length),
    }
    write_atomic(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n", "tokenizer config")
