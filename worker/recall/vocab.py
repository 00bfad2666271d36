"""The recall task's tokenizer: a word-level vocabulary built locally with `tokenizers`.

The task needs a few hundred symbols (filler words, keys, value symbols, the query marker), not a byte
BPE: one whitespace-separated word is one token, so a prompt of N words is exactly N tokens, the
text is readable (`f07 f31 k042 a17 b03 c88 d41 ... Q k042`) and `bench run --prompts FILE` feeds the
model exactly what it was trained on. The vocabulary is a fixed function of the task's sizes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

from worker.files import write_atomic

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
QUERY = "Q"
VOCAB_ALIGN = 64  # the vocabulary is padded with reserved tokens to a multiple of this


@dataclass(frozen=True)
class Vocab:
    """Token ids of every kind of symbol; `filler`, `keys` and `values[slot]` are id ranges."""

    fillers: int
    keys: int
    value_tokens: int
    values_per_slot: int

    @property
    def words(self) -> list[str]:
        """Every token in id order."""
        out = [BOS, EOS, QUERY]
        out += [f"f{i:02d}" for i in range(self.fillers)]
        out += [f"k{i:03d}" for i in range(self.keys)]
        for s in range(self.value_tokens):
            out += [f"{chr(ord('a') + s)}{i:02d}" for i in range(self.values_per_slot)]
        out += [f"<|reserved_{i}|>" for i in range(-len(out) % VOCAB_ALIGN)]
        return out

    @property
    def size(self) -> int:
        return len(self.words)

    bos_id, eos_id, query_id = 0, 1, 2

    @property
    def filler_ids(self) -> range:
        return range(3, 3 + self.fillers)

    @property
    def key_ids(self) -> range:
        start = 3 + self.fillers
        return range(start, start + self.keys)

    def value_ids(self, slot: int) -> range:
        start = 3 + self.fillers + self.keys + slot * self.values_per_slot
        return range(start, start + self.values_per_slot)


def build_tokenizer(vocab: Vocab) -> Tokenizer:
    """Word level, split on whitespace; decoding joins tokens with single spaces."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab.words)}, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def save_tokenizer(vocab: Vocab, out_dir: str | Path, model_max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json, loadable offline by `AutoTokenizer`; no BOS is added
    (the engine feeds prompts as written, and the model was trained without one)."""
    out = Path(out_dir)
    write_atomic(out / "tokenizer.json", build_tokenizer(vocab).to_str(pretty=False), "tokenizer")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_input_names": ["input_ids", "attention_mask"], "model_max_length": int(model_max_length)}
    write_atomic(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n", "tokenizer config")
