"""The prompt word pool kept on disk per tokenizer, so a fresh process does not derive it again.

Why: deriving the pool (`prompts._word_pool`) encodes up to 16k words through the tokenizer; for a
128k vocabulary that costs about as much as loading the tokenizer, in every fresh `bench run`
(issue 13's `tokenizer` setup phase). The pool is a pure function of the tokenizer's files, of the
library that encodes with them and of the code that derives it, so an entry is keyed by a hash of
all three: another tokenizer, a new `tokenizers` / `transformers`, or an edit of `prompts.py` finds
no entry and derives (and stores) its own. A tokenizer without a directory (a bare
`tokenizers.Tokenizer`) is not kept.

An entry that cannot be read or does not parse is derived again and rewritten; one that cannot be
written (a read-only cache directory) only costs the next process the derivation. Entries are
written whole or not at all (`worker.files.write_atomic`), so two processes racing on one key both
end with a complete file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

from worker import envs
from worker.files import write_atomic
from worker.host.hostinfo import dist_version
from worker.text.checkpoint import LEGACY_FILES, TOKENIZER_FILES

log = logging.getLogger(__name__)

Pool = tuple[list[str], dict[str, int]]
FILES = (*TOKENIZER_FILES, *LEGACY_FILES)


def pool_key(tokenizer, code: Path) -> str | None:
    """The entry's key, or None where the tokenizer has no directory of files to key it by."""
    path = getattr(tokenizer, "name_or_path", None)
    if not path or not Path(path).is_dir():
        return None
    h = hashlib.sha256()
    for name in FILES:
        f = Path(path) / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    versions = f"{dist_version('tokenizers')}\0{dist_version('transformers')}"
    h.update(f"{type(tokenizer).__name__}\0{versions}\0".encode())
    h.update(code.read_bytes())
    return h.hexdigest()[:32]


def entry_path(key: str) -> Path:
    return Path(envs.cache_dir()) / "prompt-pools" / f"{key}.json"


def cached_pool(tokenizer, derive: Callable[[object], Pool], code: Path) -> Pool:
    """The pool from its entry, else `derive(tokenizer)`, stored for the next process."""
    key = pool_key(tokenizer, code)
    if key is None:
        return derive(tokenizer)
    path = entry_path(key)
    try:
        doc = json.loads(path.read_text())
        pool, first_cost = doc["pool"], doc["first_cost"]
        if isinstance(pool, list) and isinstance(first_cost, dict) and pool:
            return [str(w) for w in pool], {str(w): int(c) for w, c in first_cost.items()}
        log.debug("prompt pool %s: malformed entry, deriving again", path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.debug("prompt pool %s: unreadable (%s), deriving again", path, e)
    pool, first_cost = derive(tokenizer)
    try:
        write_atomic(path, json.dumps({"pool": pool, "first_cost": first_cost}), what="prompt word pool")
    except Exception as e:  # noqa: BLE001 - a cache that cannot be written costs only the next derivation
        log.debug("prompt pool %s: not stored (%s)", path, e)
    return pool, first_cost
