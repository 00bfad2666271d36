"""A suite's `reuse: weights`: one engine kept on a worker between runs that would build the same one.

Building an engine is most of a run's wall time (the CPU tier's fill, the GPU slots, compiling); a
suite of repeats and sweeps over measurement-only settings rebuilds the same engine again and again.
`EngineCache` keeps the last engine, the device locks it was built under and the tokenizers a worker
loaded, and hands them to the next run whose *engine key* matches.

The engine key is everything that goes into building an engine: the run config minus the settings
that only steer the measurement (`MEASUREMENT_ONLY`: prompts, token counts, sampling, warm-up rounds,
floor probing, output), the pack's identity (its files' inode, size and mtime, so a re-pack or a
changed blob never reuses the old tiers), the device and the longest prompt (it sizes the activation
workspace). A setting not listed as measurement-only is part of the key, so a new config field can
only make reuse rarer, never wrong.

What the measured round sees is unchanged: every run makes its own KV cache, runs its own warm-up
rounds and resets the counters before measuring, so a reused engine is in the state it is in between
a fresh run's last warm-up round and its measured round (weights placed and streaming, kernels
compiled). A run that fails drops the kept engine: its state is unknown.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from worker.config import RunConfig

log = logging.getLogger(__name__)

MEASUREMENT_ONLY = frozenset({
    "prompt", "prompts", "prompt_len", "max_new_tokens", "temperature", "top_p", "seed", "warmup_rounds",
    "roofline", "floor_window_s", "device_wait_s", "pack_verify_days", "out_json", "verbose",
    "accuracy_ref",  # computed after the measured round, from the same engine
    "gc_freeze", "switch_interval_us",  # the interpreter during the rounds (worker/host/interp.py), not the engine
    # where the pack comes from: the pack's own identity stands in for these
    "checkpoints", "pack_dir", "manifest", "raw_device",
})
MODES = ("none", "weights")


def record(mode: str = "none", reused: bool = False, key: str | None = None, runs: int = 1) -> dict[str, Any]:
    """The run JSON's `reuse` section (the peer, which never reuses, writes it too: same shape)."""
    return {"mode": mode, "reused_engine": reused, "engine_key": key, "engine_runs": runs}


def file_identity(path: str | os.PathLike) -> list[int] | None:
    """(device, inode, size, mtime_ns) of a file or block device; None when it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def engine_key(cfg: RunConfig, pack, device, prompt_tokens: int) -> str:
    """What must match for a kept engine to serve a run (see the module docstring)."""
    doc = {"config": {k: v for k, v in sorted(cfg.to_flat().items()) if k not in MEASUREMENT_ONLY},
           "manifest": [str(Path(pack.manifest_path).resolve()), file_identity(pack.manifest_path)],
           "blob": [str(Path(pack.blob_path).resolve()), file_identity(pack.blob_path)],
           "device": str(device), "prompt_tokens": int(prompt_tokens)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass
class Kept:
    key: str
    engine: Any
    held: Any  # devlock.Held: the locks stay taken while the engine lives
    locks: contextlib.ExitStack
    runs: int = 0


@dataclass
class EngineCache:
    """The engine (and tokenizers) one worker keeps between runs; `close()` releases everything."""

    kept: Kept | None = None
    tokenizers: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    built: int = 0

    def tokenizer(self, checkpoints: str, load: Callable[[str], Any]) -> Any:
        """The checkpoint's tokenizer, loaded again only when its files changed."""
        path = Path(checkpoints)
        stamp = [file_identity(path / name) for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")]
        hit = self.tokenizers.get(str(path.resolve()))
        if hit is not None and hit[0] == stamp:
            return hit[1]
        tok = load(checkpoints)
        self.tokenizers[str(path.resolve())] = (stamp, tok)
        return tok

    def take(self, key: str) -> Kept | None:
        """The kept engine if it is the one `key` builds; a different one is closed first (its memory
        and device locks are needed for the new build)."""
        if self.kept is not None and self.kept.key != key:
            log.info("reuse: the kept engine does not match this run; closing it")
            self.close()
        if self.kept is not None:
            self.kept.runs += 1
        return self.kept

    def keep(self, key: str, engine: Any, held: Any, locks: contextlib.ExitStack) -> Kept:
        self.close()
        self.kept = Kept(key, engine, held, locks)
        self.built += 1
        return self.kept

    def drop(self) -> None:
        """After a failed run: the engine's state is unknown, so nothing of it is reused."""
        self.close()

    def close(self) -> None:
        kept, self.kept = self.kept, None
        if kept is None:
            return
        try:
            kept.engine.close()
        finally:
            kept.locks.close()
