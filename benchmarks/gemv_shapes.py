"""Batch-1 projections of the 8B geometry: which way of computing x·Wᵀ reads the weights fastest.

A batch-1 decode step is a chain of matrix-vector products, and the profile of the compiled, graphed
step showed cuBLAS reading some shapes at half the bandwidth of others (o_proj, 4096x4096, at
~2.2 TB/s while gate_up read at ~4.1). Each variant runs inside a CUDA graph over several copies of
the weight (more bytes than L2 holds, so every call reads HBM), timed with CUDA events; the table
gives microseconds per call and the read bandwidth.

What it showed on an H200 (results/gemv_shapes.txt): Inductor's max-autotune was fastest on every
shape (o_proj 10.4 us against cuBLAS's 13.4), but it chooses kernels by timing them in each new
process, which makes bf16 results differ between processes; a Triton row reduction beat cuBLAS on
o_proj and down_proj alone but lost that once fused with its neighbours in the layer
(results/decode_profile_experiments.txt). The engine keeps cuBLAS.

    python benchmarks/gemv_shapes.py
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

SHAPES = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096),
          "down_proj": (4096, 14336), "lm_head": (128256, 4096)}


def linear(x, w):
    return F.linear(x, w)


def gemv(x, w):
    return torch.matmul(w, x[0])[None]  # (N, K) @ (K,): cuBLAS gemv on the row-major weight


def reduce(x, w):
    return (w.float() * x.float()).sum(-1).to(x.dtype)[None]  # Triton row reduction when compiled


def variants(autotune: bool) -> dict:
    det = {"deterministic": True}  # Inductor: fixed reduction configs, no timing-based choice
    out = {"F.linear": linear, "matmul W@x": gemv,
           "compiled F.linear": torch.compile(linear, dynamic=False),
           "compiled reduction": torch.compile(reduce, dynamic=False),
           "compiled reduction, deterministic": torch.compile(reduce, dynamic=False, options=det)}
    if autotune:  # Inductor's Triton matmul templates, benchmarked per shape
        out["max-autotune"] = torch.compile(linear, dynamic=False, mode="max-autotune-no-cudagraphs")
    return out


def time_call(fn, x, ws, reps: int) -> float:
    """Microseconds per call, replaying a graph of `reps` rounds over every weight copy."""
    for w in ws:  # compile / load kernels outside capture
        fn(x, w)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for w in ws:
            fn(x, w)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(g):
        for _ in range(reps):
            for w in ws:
                fn(x, w)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / (reps * len(ws)))
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies-gb", type=float, default=2.0, help="weight bytes per shape (beyond L2)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--autotune", action="store_true", help="also Inductor max-autotune (slow to compile)")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch._dynamo.config.recompile_limit = 64  # one variant per shape
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'shape':14} {'variant':34} {'us/call':>8} {'GB/s':>7}  max|diff| vs F.linear")
    for name, (n, k) in SHAPES.items():
        nbytes = n * k * 2
        copies = max(2, int(args.copies_gb * 1e9 // nbytes))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x, ws[0]).float()
        for vname, fn in variants(args.autotune).items():
            us = time_call(fn, x, ws, args.reps)
            diff = (fn(x, ws[0]).float() - ref).abs().max().item()
            print(f"{name:14} {vname:34} {us:8.2f} {nbytes / us / 1e3:7.0f}  {diff:.2e}", flush=True)
        del ws
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
