"""Where a decode step's time goes: torch.profiler over the all-resident decode, per dtype.

Prints the step time and the top CUDA kernels by total time for each dtype, so a slow path (a
kernel choice, a sync, launch gaps) shows by name. Used to investigate gpu-mode decode attainment.

    python benchmarks/decode_profile.py --layers 4 --dtype bfloat16 float32
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from worker.bench import resolve_config
from worker.engine import build_engine
from worker.kvcache import Step
from worker.pack_cache import ensure_pack
from worker.synth import make_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/sb-profile")
    ap.add_argument("--preset", default="llama3.1-8b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    dev = torch.device("cuda")
    for dtype in args.dtype:
        ckpt = make_model(Path(args.work) / f"{args.preset}-{args.layers}L-{dtype}", preset=args.preset,
                          layers=args.layers, dtype=dtype, force=True)
        cfg = resolve_config({"checkpoints": str(ckpt), "mode": "gpu"})
        engine = build_engine(cfg, ensure_pack(ckpt), dev)
        cache = engine.new_cache(1, 2048)
        n = args.context
        engine.model.forward(torch.randint(0, 1000, (1, n), device=dev), Step(torch.arange(n, device=dev)[None], n),
                             cache, logits_at=torch.tensor([n - 1], device=dev))
        tok = torch.tensor([[5]], device=dev)

        def step(i: int) -> None:
            engine.model.forward(tok, Step(torch.tensor([[n + i]], device=dev), n + i + 1), cache)[:, 0].argmax(-1)

        for i in range(5):
            step(i)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(args.steps):
            step(i)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / args.steps * 1e3
        weights = sum(t.numel() * t.element_size() for g in engine.weights.groups.values() for t in g.values())
        print(f"\n== {dtype}: {ms:.2f} ms/step host-timed, weights {weights / 1e9:.2f} GB, "
              f"HBM floor ~{weights / 4.2e12 * 1e3:.2f} ms")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(5):
                step(i)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70))
        del engine, cache
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
