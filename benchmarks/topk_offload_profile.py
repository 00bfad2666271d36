"""Why top-k decode over an offloaded KV cache is slower than exact: where the host's time goes.

Runs `bench run` in-process (gpu weights, KV offloaded to CPU, long prompt) for top-k 0 and k, with
timers around the paged cache's decode pieces: the compute thread's wait for the KV worker
(`KVMover.ready`), the worker's fetch jobs (`run_fetch`), top-k scoring and selection (`_topk`), and
the exact path (`_exact`). Host milliseconds per decode step, next to the step's CUDA-event time.

    python benchmarks/topk_offload_profile.py --work /tmp/sbkv --layers 32 --prompt 8192
"""

from __future__ import annotations

import argparse
import collections
import functools
import threading
import time
from pathlib import Path

import torch

import worker.kv.fetch as fetch
import worker.kv.offload as offload
import worker.kv.paged as paged
import worker.run
from worker.run import resolve_config, run

TOTALS: collections.Counter = collections.Counter()
LOCK = threading.Lock()


def timed(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            with LOCK:
                TOTALS[name] += time.perf_counter() - t0
                TOTALS[name + " (calls)"] += 1
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/sbkv")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=8192)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--preset", default="llama3.1-8b")
    args = ap.parse_args()
    from worker.synth.checkpoints import make_model

    ckpt = Path(args.work) / f"{args.preset}-{args.layers}L"
    if not (ckpt / "config.json").exists():
        make_model(ckpt, preset=args.preset, layers=args.layers, dtype="bfloat16")
    offload.KVMover.ready = timed("compute thread waits for the KV worker (ready)", offload.KVMover.ready)
    paged.run_fetch = timed("KV worker: fetch job (run_fetch)", fetch.run_fetch)
    fetch.candidates = timed("KV worker: candidates on the host", fetch.candidates)
    paged.PagedKVCache._topk = timed("compute thread: _topk (score, select, gather, attend)", paged.PagedKVCache._topk)
    paged.PagedKVCache._exact = timed("compute thread: _exact (assemble, attend)", paged.PagedKVCache._exact)
    paged.PagedKVCache._decode = timed("compute thread: _decode (all of a layer's KV work)", paged.PagedKVCache._decode)
    generate = worker.run.generate

    def measured_only(*a, **kw):  # every round restarts the timers: what is left is the measured round's
        TOTALS.clear()
        return generate(*a, **kw)

    worker.run.generate = measured_only
    for k in (0, args.k):
        cfg = resolve_config({"checkpoints": str(ckpt), "mode": "gpu", "prompt_len": args.prompt,
                              "max_new_tokens": args.new_tokens, "max_seq_len": args.prompt + 64,
                              "kv_offload": "cpu", "kv_block_tokens": 16, "kv_gpu_blocks": 64, "topk_blk": k,
                              "temperature": 0, "warmup_rounds": 1, "roofline": False})
        r = run(cfg)
        steps = r["metrics"]["decode_steps"]
        per = steps
        print(f"\n== top-k {k}: {r['metrics']['decode_ms'] / steps:.2f} ms/token (CUDA events), "
              f"{args.layers} layers, prompt {args.prompt}; host ms per decode step:")
        for name, s in sorted(TOTALS.items()):
            if not name.endswith("(calls)"):
                print(f"  {name:58} {s / per * 1e3:8.2f} ms  ({TOTALS[name + ' (calls)']} calls)")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
