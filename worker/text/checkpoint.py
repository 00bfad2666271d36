"""A checkpoint's tokenizer as the engine uses it, from local files only (never a hub).

The engine needs little of a tokenizer: encode each prompt, decode the generated ids, the vocabulary
(prompt synthesis), and the BOS / EOS / pad ids. A checkpoint with a `tokenizer.json` and a plain
`tokenizer_config.json` (class `PreTrainedTokenizerFast`, as Llama 3 / 3.1 ship and `bench make-model`
writes) is loaded with the `tokenizers` library directly (`DirectTokenizer`): it is the object
transformers' fast tokenizer wraps, and importing transformers costs seconds per process (about
10 s on an H200 host, 2 s on the CPU VM), which was most of the first run's `tokenizer` phase.

Identity with `AutoTokenizer` (transformers 5, checked by tests/test_tokenizer_direct.py): the
backend is built from the same file; the config's named special tokens (`bos_token`, `eos_token`,
`unk_token`, `pad_token`, the latter also from the file's padding) and `added_tokens_decoder` are
added to it with the same calls and in the same order as `TokenizersBackend` does (a token missing
from the vocabulary gets a new id, one only in the model's vocabulary becomes an added special
token), so the same text gives the same ids and `skip_special_tokens` skips the same ones; encoding
runs without the file's truncation and padding; the file's post-processor is used as is
(transformers 5 keeps it and ignores `add_bos_token`). Decoding is the backend's, plus
`clean_up_tokenization_spaces` where the config asks for it and the model is not BPE
(transformers 5 ignores it for BPE; transformers 4 would apply it to BPE too).

Anything else (no `tokenizer.json`, another tokenizer class, remote code, config keys outside
`DIRECT_KEYS`, a legacy `special_tokens_map.json` / `added_tokens.json` without
`added_tokens_decoder`) goes through `AutoTokenizer` (`HFTokenizer`, same interface), with a log
line naming the reason.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from tokenizers import AddedToken, Tokenizer

from worker.errors import UserError

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
DIRECT_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
NAMED = ("bos_token", "eos_token", "unk_token", "pad_token")  # the named special tokens DirectTokenizer adds
# tokenizer_config.json keys whose effect DirectTokenizer reproduces (or that have none on encode/decode)
DIRECT_KEYS = frozenset({"tokenizer_class", *NAMED, "added_tokens_decoder", "add_bos_token", "add_eos_token",
                         "clean_up_tokenization_spaces", "model_input_names", "model_max_length", "chat_template",
                         "padding_side", "truncation_side", "legacy"})
LEGACY_FILES = ("special_tokens_map.json", "added_tokens.json")  # read by AutoTokenizer without added_tokens_decoder


class DirectTokenizer:
    """tokenizer.json through the `tokenizers` library, configured as `AutoTokenizer` would (module doc)."""

    via = "tokenizers"

    def __init__(self, path: Path, config: dict[str, Any]):
        self.name_or_path = str(path)
        try:
            self.backend = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
            raise ValueError(f"tokenizer.json: {e}") from None
        padding = self.backend.padding
        if padding and config.get("pad_token") is None:  # transformers takes the file's padding token
            config = {**config, "pad_token": padding["pad_token"]}
        self.config = config
        self.backend.no_truncation()  # AutoTokenizer encodes without them unless asked
        self.backend.no_padding()
        self._add_config_tokens()
        self._clean_up = bool(config.get("clean_up_tokenization_spaces", False)) and not self._is_bpe()
        ids = {k: self._id(config.get(k)) for k in NAMED}
        self.bos_token_id, self.eos_token_id = ids["bos_token"], ids["eos_token"]
        self.pad_token_id, self.unk_token_id = ids["pad_token"], ids["unk_token"]

    def _add_config_tokens(self) -> None:
        """TokenizersBackend.__init__, then its _post_init: the added tokens the file lacks (the
        config's `added_tokens_decoder`; without one, transformers takes the file's own), then every
        named special token again, as special."""
        in_file = self.backend.get_added_tokens_decoder()  # id → AddedToken
        if "added_tokens_decoder" in self.config:
            decoder = {int(i): _added(t) for i, t in self.config["added_tokens_decoder"].items()}
        else:
            decoder = dict(in_file)
        named = [_named(self.config[k], decoder) for k in NAMED if self.config.get(k) is not None]
        have = {repr(t) for t in in_file.values()}
        new = [t for _, t in sorted(decoder.items()) if repr(t) not in have]
        known = {t.content for t in in_file.values()} | {str(t) for t in new}
        new += [t for t in named if str(t) not in known and t not in new]
        names = {str(t) for t in named}
        for tok in new:
            if not tok.special and str(tok) in names:
                tok.special = True  # as TokenizersBackend does, on the shared object
        if new:
            self.backend.add_tokens(new)
        self.backend.add_special_tokens(named)

    def _id(self, token: Any) -> int | None:
        """A named token's id (every named token is in the vocabulary once added)."""
        if token is None:
            return None
        return self.backend.token_to_id(token["content"] if isinstance(token, dict) else str(token))

    def _is_bpe(self) -> bool:
        return type(self.backend.model).__name__ == "BPE"

    def encode(self, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
        """Token ids of each text, encoded separately."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self._clean_up else text

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)


class HFTokenizer:
    """The fallback: transformers' `AutoTokenizer` behind the same interface as `DirectTokenizer`."""

    via = "transformers"

    def __init__(self, path: Path):
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.name_or_path = str(path)
        self.bos_token_id, self.eos_token_id = self.hf.bos_token_id, self.hf.eos_token_id
        self.pad_token_id, self.unk_token_id = self.hf.pad_token_id, self.hf.unk_token_id
        self.init_kwargs = getattr(self.hf, "init_kwargs", {})
        self.add_bos_token = getattr(self.hf, "add_bos_token", False)

    def encode(self, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
        return list(self.hf(list(texts), add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def get_vocab(self) -> dict[str, int]:
        return self.hf.get_vocab()

    def __len__(self) -> int:
        return len(self.hf)


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`: no space before punctuation and English contractions."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def _added(value: Any) -> AddedToken:
    """An AddedToken from its tokenizer_config.json form (a dict, possibly with `__type`)."""
    fields = {k: v for k, v in value.items() if k != "__type"}
    return AddedToken(**fields)


def _named(value: Any, decoder: dict[int, AddedToken]) -> AddedToken:
    """A named special token as transformers holds it: the added token of that text where there is
    one, else a new special token."""
    text = value["content"] if isinstance(value, dict) else str(value)
    for entry in decoder.values():
        if entry.content == text:
            return entry
    return _added(value) if isinstance(value, dict) else AddedToken(text, special=True, normalized=False)


def direct_refusal(path: Path) -> str | None:
    """Why `DirectTokenizer` would not be identical to AutoTokenizer for this checkpoint; None if it is."""
    if not (path / "tokenizer.json").is_file():
        return "no tokenizer.json"
    cfg_file = path / "tokenizer_config.json"
    if not cfg_file.is_file():
        return "no tokenizer_config.json (AutoTokenizer would pick the model type's tokenizer class)"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        return f"tokenizer_config.json unreadable ({e})"
    if not isinstance(cfg, dict):
        return "tokenizer_config.json is not an object"
    if cfg.get("tokenizer_class") not in DIRECT_CLASSES:
        return f"tokenizer_class {cfg.get('tokenizer_class')!r} is not one of {', '.join(DIRECT_CLASSES)}"
    extra = sorted(set(cfg) - DIRECT_KEYS)
    if extra:
        return f"tokenizer_config.json keys {', '.join(extra)}"
    if "added_tokens_decoder" not in cfg and any((path / f).is_file() for f in LEGACY_FILES):
        return f"a legacy {' / '.join(f for f in LEGACY_FILES if (path / f).is_file())}"
    return None


def load_tokenizer(checkpoint_dir: str | Path) -> DirectTokenizer | HFTokenizer:
    """The checkpoint's tokenizer: `DirectTokenizer` where it is identical to AutoTokenizer, else
    `HFTokenizer` (module doc)."""
    path = Path(checkpoint_dir)
    if not path.is_dir() or not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"no tokenizer in {str(path)!r} (expected tokenizer.json): point --checkpoints at a HF "
                        "checkpoint directory with its tokenizer, or make one with `bench make-model`")
    why = direct_refusal(path)
    try:
        if why is None:
            return DirectTokenizer(path, json.loads((path / "tokenizer_config.json").read_text()))
        log.info("tokenizer of %s: loading with transformers' AutoTokenizer (%s)", path, why)
        return HFTokenizer(path)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"cannot load the tokenizer in {str(path)!r}: {str(e).splitlines()[0]}") from None


def special_token_policy(tokenizer) -> bool:
    """Whether prompts get special tokens: only when the tokenizer config says `add_bos_token: true`.

    The seed encodes prompts with `add_special_tokens=False`; Llama 3.1's tokenizer_config has no
    `add_bos_token`, so real and synthetic Llama 3 checkpoints both follow the seed. transformers 5
    drops the key from a generic fast tokenizer's attributes, so the file is read when it is there.
    """
    cfg_file = Path(getattr(tokenizer, "name_or_path", "") or "") / "tokenizer_config.json"
    value = None
    if cfg_file.is_file():
        try:
            value = json.loads(cfg_file.read_text()).get("add_bos_token")
        except (OSError, ValueError, AttributeError):
            value = None
    if value is None:
        value = (getattr(tokenizer, "init_kwargs", None) or {}).get("add_bos_token")
    if value is None:
        value = getattr(tokenizer, "add_bos_token", False)
    return bool(value)
