"""How the engine uses torch.compile: one setting for every compiled function.

- `dynamic=False, fullgraph=True`: one specialised variant per shape (the decode buckets keep the count
  small); a graph break would silently fall back to eager kernels and break mode-to-mode exactness.
- Inductor's deterministic mode: by default Inductor times several block sizes for each reduction
  kernel (norms, softmax) in every new process and keeps the fastest, so two processes may sum in a
  different order and a bf16 greedy decode drifts apart after a few dozen tokens (seen on an H200
  before this setting). A fixed choice costs nothing measurable in a graphed decode step
  (measured: benchmarks/results/README.md) and makes a run reproducible across processes: gpu mode in
  one worker equals a streaming mode in another (benchmarks/results/kv_decode_a.txt: two processes,
  same tokens).
- A high recompile limit: a worker process runs many runs and sees many (batch, tokens) shapes.
- The on-disk caches under the project's cache directory (`compile_cache.prepare`, before the first
  compile), so the next process of the same commit on this host loads the kernels instead; and whole
  compiled functions there too, so it does not trace them again (worker.model.aot; off with
  STREAMBENCH_COMPILE_WHOLE=0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from worker.model import aot, compile_cache

Fn = TypeVar("Fn", bound=Callable)

RECOMPILE_LIMIT = 4096
DETERMINISTIC = True  # module-level so a benchmark can measure its cost (benchmarks/decode_profile.py)


def compiled(fn: Fn) -> Fn:
    compile_cache.prepare()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    import torch._inductor.config as inductor

    options = {"deterministic": True} if DETERMINISTIC and hasattr(inductor, "deterministic") else {}
    jit = torch.compile(fn, dynamic=False, fullgraph=True, options=options)
    return aot.aot_compiled(fn, jit, options, compile_cache.aot_dir()) if aot.enabled() else jit
