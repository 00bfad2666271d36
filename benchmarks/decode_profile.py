"""Where a batch-1 decode step's GPU time goes: torch.profiler over the all-resident decode.

For each variant (eager, CUDA graphs, torch.compile + CUDA graphs) it prints the step time (CUDA
events), the GPU kernel time per step split into matrix products and everything else, the kernel
count per step, and the top kernels by total time, so the cost of the small kernels between the
weight reads shows by name. Used to work on issue 4 (a): decode attainment of the HBM floor.

    python benchmarks/decode_profile.py --layers 4 --variants eager graphs compiled+graphs
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from worker.engine import build_engine
from worker.model.graphs import GraphedDecode
from worker.model.step import Step
from worker.pack.cache import ensure_pack
from worker.run import resolve_config
from worker.synth.checkpoints import make_model

GEMM = ("gemm", "gemv", "nvjet", "cutlass", "sm90_xmma", "splitk")
FLAGS = {"eager": dict(compile=False, cuda_graphs=False), "graphs": dict(compile=False, cuda_graphs=True),
         "compiled": dict(compile=True, cuda_graphs=False), "compiled+graphs": dict(compile=True, cuda_graphs=True)}


def kernel_events(prof) -> list:
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/sb-profile")
    ap.add_argument("--preset", default="llama3.1-8b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--no-deterministic", action="store_true", help="Inductor's default (timed) reduction configs")
    ap.add_argument("--variants", nargs="+", default=["eager", "graphs", "compiled+graphs"], choices=list(FLAGS))
    args = ap.parse_args()
    dev = torch.device("cuda", torch.cuda.current_device())
    import worker.model.compiled
    worker.model.compiled.DETERMINISTIC = not args.no_deterministic
    ckpt = Path(args.work) / f"{args.preset}-{args.layers}L-{args.dtype}"
    if not (ckpt / "config.json").exists():
        make_model(ckpt, preset=args.preset, layers=args.layers, dtype=args.dtype)
    pack = ensure_pack(ckpt)
    n = args.context
    for name in args.variants:
        cfg = resolve_config({"checkpoints": str(ckpt), "mode": "gpu", **FLAGS[name]})
        engine = build_engine(cfg, pack, dev)
        cache = engine.new_cache(1, 2048)
        engine.model.forward(torch.randint(0, 1000, (1, n), device=dev), Step(torch.arange(n, device=dev)[None], n),
                             cache, logits_at=torch.tensor([n - 1], device=dev))
        tok = torch.tensor([[5]], device=dev)
        pos = torch.tensor([[n]], device=dev)
        span = -(-(n + 1) // 256) * 256
        graphs = GraphedDecode(engine.model, cache, 1, dev) if cfg.cuda_graphs else None

        def step() -> None:
            s = Step(pos, span)
            logits = graphs(tok, s) if graphs else engine.model.forward(tok, s, cache)[:, 0]
            tok.copy_(logits.argmax(-1, keepdim=True))

        for _ in range(5):
            step()
        torch.cuda.synchronize()
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(args.steps):
            step()
        t1.record()
        torch.cuda.synchronize()
        ms = t0.elapsed_time(t1) / args.steps
        weights = sum(t.numel() * t.element_size() for g in engine.weights.groups.values() for t in g.values())
        prof_steps = 5
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(prof_steps):
                step()
            torch.cuda.synchronize()
        ev = kernel_events(prof)
        total = sum(e.time_range.elapsed_us() for e in ev) / prof_steps / 1e3
        gemm = sum(e.time_range.elapsed_us() for e in ev if any(g in e.name.lower() for g in GEMM)) / prof_steps / 1e3
        print(f"\n== {name} (deterministic {worker.model.compiled.DETERMINISTIC}), "
              f"{args.layers} layers {args.dtype}, context {n}: {ms:.3f} ms/step (CUDA events); "
              f"weights {weights / 1e9:.2f} GB; kernels per step {len(ev) / prof_steps:.0f}, kernel time "
              f"{total:.3f} ms: matmul {gemm:.3f} ms, other {total - gemm:.3f} ms", flush=True)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90))
        engine = cache = graphs = None  # free the weights before the next variant builds its own
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
