"""Passkey retrieval through the project's engine: prompts as a file, `worker.run.run`, answers checked.

This is the path every accuracy claim about top-k goes through: the prompts are written as text and
fed by `bench run`'s own prompt handling (each prompt tokenized alone, its tail kept), the engine
generates greedily with the KV settings under test (exact, or `topk_tokens` with the cache
offloaded to the CPU tier), and each row's first `value_tokens` generated tokens are compared with
the answer. Every row of a batch is one prompt, so one run measures `n` passkeys.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.files import write_atomic
from worker.recall.build import task_of
from worker.recall.task import accuracy, passkey_prompts
from worker.recall.vocab import build_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Passkeys:
    """`n` prompts of `length` tokens written to `path`, with their answers."""

    path: Path
    length: int
    prompts: list[list[int]]
    answers: list[list[int]]


def write_passkeys(ckpt: str | Path, n: int, length: int, seed: int, path: str | Path) -> Passkeys:
    """The prompt file `bench run --prompts` reads (one prompt per line) for the checkpoint's task."""
    task = task_of(ckpt)
    prompts, answers = passkey_prompts(task, n, length, seed)
    tok = build_tokenizer(task.vocab)
    text = "\n".join(tok.decode(p) for p in prompts) + "\n"
    return Passkeys(write_atomic(path, text, "passkey prompts"), length, prompts, answers)


def run_passkeys(ckpt: str | Path, keys: Passkeys, kv: dict[str, Any], **settings: Any) -> dict[str, Any]:
    """One `worker.run.run` over every passkey (batch = all of them) → accuracy, per-row hits, the run's
    generated tokens and its result dict. `kv`: the KV settings (`kv_offload`, `topk_tokens`, ...)."""
    from worker.run import resolve_config, run

    new = len(keys.answers[0])
    flat = {"checkpoints": str(ckpt), "prompts": str(keys.path), "batch_size": len(keys.prompts),
            "max_new_tokens": new, "max_seq_len": keys.length + new, "temperature": 0.0, "warmup_rounds": 0,
            "roofline": False, **kv, **settings}
    result = run(resolve_config(flat, where="passkey run"))
    fed = [o["prompt_token_ids"] for o in result["outputs"]]
    if fed != keys.prompts:
        raise RuntimeError("the engine fed other tokens than the passkey prompts (tokenizer round trip broken)")
    generated = [o["token_ids"] for o in result["outputs"]]
    hits = [list(g[:len(a)]) == list(a) for g, a in zip(generated, keys.answers)]
    acc = accuracy(generated, keys.answers)
    log.info("passkeys at %d tokens, %s: accuracy %.3f", keys.length, kv, acc)
    return {"accuracy": acc, "hits": hits, "generated": generated, "result": result}
