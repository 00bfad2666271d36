"""Issue 17 on a GPU: the fused dequantize-matmul against the native matmul and the scratch path.

Batch-1 (and batch-16) projections of the 70B geometry, per weight format: the native bf16
F.linear, the scratch path the engine takes without the fused kernels (the compiled dequantization
to a dense bf16 weight, then F.linear), and the fused kernel (`worker.quant.fused`, the fixed
configuration of its table). Each variant runs inside a CUDA graph over enough copies of its weight
that they outgrow L2 (every call reads HBM, as a decode step does), timed with CUDA events; GB/s is
the bytes the variant's weight holds (packed bytes for the quantized ones) over its time.

Checks, each failing the run (exit 1): every element the kernel dequantizes equals the scratch
path's (one-hot rows of x read columns of the weight back, bit for bit); the products are the
float32 product of the bf16 values rounded once (within a bf16 rounding plus float32 reordering);
two calls give the same bits; and torch.compile (fullgraph, the engine's settings) of the matmul,
captured in a CUDA graph and replayed, equals the eager call bit for bit.

`--sweep` also times other block sizes and K splits of the fused kernel per shape and prints the
fastest next to the table's choice, with whether its bits equal the table's (a different split sums
in another order): a better table is an edit of `fused.config_for`, which must stay a fixed choice
per shape (never timed at run time: that would make bits differ between processes).

    # on the GPU machine (PYTHONPATH=<repo>); minutes, most of it compiling (Triton, Inductor) once per shape
    python benchmarks/quant_kernels.py                          # int4 and int8, rows 1 and 16
    python benchmarks/quant_kernels.py --formats fp8 --rows 1 16 64
    python benchmarks/quant_kernels.py --sweep --formats int4   # the table's alternatives (longer)
    python benchmarks/quant_kernels.py --formats int4 --variants    # int4 kernel variants (~3-4 min)

`--variants` (int4) times each kernel variant of `fused.VARIANTS` over a small grid (`VARIANT_GRID`,
each at `variant_splits(k)`; "gemv" at one row only, as it reads the weight once per row) and prints
the fastest per variant with its checks (dequant, products, repeat), then the layer's total of each
variant's fastest per row count. A winner goes into `fused.MEASURED` as (rows, Config) entries.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys

import torch
import torch.nn.functional as F

from gemv_shapes import time_call  # benchmarks/, this script's folder
from worker.model.compiled import compiled
from worker.quant import fused
from worker.quant.dequant import DENSE, SUFFIXES, Packed
from worker.quant.matmul import linear
from worker.quant.quantize import quantize

SHAPES = {  # name → output sizes of its parts, input size (Llama-3.1-70B)
    "qkv_proj": ((8192, 1024, 1024), 8192),
    "o_proj": ((8192,), 8192),
    "gate_up_proj": ((28672, 28672), 8192),
    "down_proj": ((8192,), 28672),
}
L2_BYTES = 60 << 20
BLOCK_N, SPLITS, WARPS_STAGES = (64, 128, 256), (1, 2, 4, 8, 16), ((4, 3), (4, 5), (8, 4))  # --sweep
VARIANT_GRID = {  # --variants: (block_n, block_k, warps, stages); a dot of block_n < 64 (or warps not 4k) is
    # Hopper's register-operand mma, otherwise a wgmma from shared memory
    "dot": ((64, 128, 4, 3),),
    "dot1": ((32, 128, 2, 3), (64, 128, 4, 3), (128, 128, 8, 3), (64, 256, 4, 3), (32, 256, 2, 3)),
    "gemv": ((64, 128, 4, 2), (128, 128, 4, 2), (64, 256, 4, 2), (128, 256, 8, 2), (256, 128, 8, 2)),
}
GEMV_ROWS = 1  # rows of x up to which --variants times "gemv"


def variant_splits(k: int) -> tuple[int, ...]:
    return (2, 4, 8) if k <= 8192 else (4, 8, 16)


def make_parts(fmt: str, sizes, k: int, group: int, dev) -> tuple:
    """Quantized parts of random N(0, 0.02) weights, made on the GPU (the quantizer is plain torch)."""
    out = []
    for n in sizes:
        w = torch.randn(n, k, device=dev, dtype=torch.float32) * 0.02
        p = quantize(fmt, w, group)
        out.append(tuple(p[s].contiguous() for s in SUFFIXES[fmt]))
        del w
    return tuple(out)


def nbytes(parts) -> int:
    return sum(t.numel() * t.element_size() for p in parts for t in p)


def copies_of(make, one_bytes: int) -> list:
    """Enough copies that they do not fit in L2 together (at least two)."""
    return [make() for _ in range(max(2, math.ceil(4 * L2_BYTES / one_bytes)))]


def time_graph(fn, x, ws, reps: int = 10) -> float:
    """Microseconds per call of fn(x, w), replaying a graph of `reps` rounds over the copies `ws`
    (`gemv_shapes.time_call`, the timing behind the native rows of results/gemv_shapes.txt)."""
    return time_call(fn, x, ws, reps)


def check_products(fmt, x, parts, got) -> tuple[bool, float]:
    """got = x @ dense^T rounded once to bf16, within float32 reordering; (ok, max |err| / max |exact|)."""
    w = DENSE[fmt](parts, x.dtype).double()
    exact = x.double() @ w.t()
    slack = x.shape[1] * 2.0 ** -24 * (x.double().abs() @ w.abs().t())
    err = (got.double() - exact).abs()
    return bool((err <= 2.0 ** -8 * exact.abs() + 2 * slack).all()), float(err.max() / exact.abs().max())


def check_dequant(fmt, parts, k: int, dev, cfg: fused.Config | None = None) -> bool:
    """One-hot rows at 64 columns (both nibbles, several groups) read the weight back bit for bit."""
    cols = torch.randperm(k, generator=torch.Generator().manual_seed(0))[:64].to(dev)
    x = torch.zeros(64, k, dtype=torch.bfloat16, device=dev)
    x[torch.arange(64, device=dev), cols] = 1
    want = DENSE[fmt](parts, torch.bfloat16)[:, cols].t()
    return torch.equal(fused.matmul(fmt, x, parts, cfg), want)


def check_graphed_compile(fmt, x, parts) -> bool:
    """The engine's torch.compile of the matmul, captured in a CUDA graph and replayed, equals eager."""
    w = Packed(fmt, parts)
    eager = linear(x, w)
    fn = compiled(linear)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warm = fn(x, w)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn(x, w)
    g.replay()
    torch.cuda.synchronize()
    return torch.equal(warm, eager) and torch.equal(out, eager)


def sweep(fmt, x, ws, ref: torch.Tensor) -> tuple[fused.Config, float, bool]:
    """The fastest configuration (block sizes × splits at 4 warps and 4 stages, then other warps and
    stages at the best of those), its us/call and whether its bits equal the table's (`ref`)."""
    def timed(cfg):
        try:
            return time_graph(lambda x_, p: fused.matmul(fmt, x_, p, cfg), x, ws), cfg
        except Exception as e:  # e.g. out of shared memory for the largest blocks
            print(f"    {cfg}: {type(e).__name__}: {str(e)[:100]}", file=sys.stderr)
            return math.inf, cfg

    us, best = min((timed(fused.Config(bn, 128, split)) for bn, split in itertools.product(BLOCK_N, SPLITS)),
                   key=lambda t: t[0])
    for warps, stages in WARPS_STAGES:
        us, best = min((us, best), timed(fused.Config(best.block_n, 128, best.split, warps, stages)),
                       key=lambda t: t[0])
    return best, us, torch.equal(fused.matmul(fmt, x, ws[0], best), ref)


def sweep_variants(fmt, x, ws, k: int, rows: int) -> dict[str, tuple[fused.Config, float, dict[str, bool]]]:
    """Per int4 variant: its fastest configuration of `VARIANT_GRID` × `variant_splits`, us/call, and the
    checks of that configuration (every dequantized element, the products, the same bits twice)."""
    best = {}
    for variant, grid in VARIANT_GRID.items():
        if variant == "gemv" and rows > GEMV_ROWS:
            continue
        timed = []
        for (bn, bk, warps, stages), split in itertools.product(grid, variant_splits(k)):
            cfg = fused.Config(bn, bk, split, warps, stages, variant)
            try:
                timed.append((time_graph(lambda x_, p, c=cfg: fused.matmul(fmt, x_, p, c), x, ws), cfg))
            except Exception as e:  # e.g. out of registers or shared memory
                print(f"    {cfg}: {type(e).__name__}: {str(e)[:100]}", file=sys.stderr, flush=True)
        if not timed:
            continue
        us, cfg = min(timed, key=lambda t: t[0])
        got = fused.matmul(fmt, x, ws[0], cfg)
        checks = {"dequant": check_dequant(fmt, ws[0], k, x.device, cfg),
                  "products": check_products(fmt, x, ws[0], got)[0],
                  "repeat": torch.equal(fused.matmul(fmt, x, ws[0], cfg), got)}
        best[variant] = (cfg, us, checks)
        print(f"  {variant:5} fastest {us:8.1f} us {cfg} of {len(timed)}; "
              + " ".join(f"{c}={'ok' if v else 'FAIL'}" for c, v in checks.items()), flush=True)
    return best


def gbps(nbytes_: int, us: float) -> float:
    return nbytes_ / us / 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", nargs="+", default=["int4", "int8"], choices=["int4", "int8", "fp8"])
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 16], help="rows of x (batch × tokens)")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--group", type=int, default=128, help="int4 group size")
    ap.add_argument("--sweep", action="store_true", help="also time other block sizes and K splits")
    ap.add_argument("--variants", action="store_true", help="int4: also time the kernel variants (fused.VARIANTS)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, triton "
          f"{__import__('triton').__version__}; us per call inside CUDA graphs, weights > L2; fused rows <= "
          f"{fused.FUSED_ROWS}")
    head = (f"{'shape':13} {'fmt':4} {'M':>3} {'native us':>9} {'GB/s':>6} {'scratch us':>10} {'GB/s':>6} "
            f"{'fused us':>8} {'GB/s':>6} {'vs native':>9} {'vs scratch':>10} {'max|f-s|':>9} {'config':26} checks")
    print(head)
    failed, layer, fastest = [], {}, {}
    for name in args.shapes:
        sizes, k = SHAPES[name]
        n = sum(sizes)
        natives = copies_of(lambda: torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02, n * k * 2)
        xs = {m: torch.randn(m, k, device=dev, dtype=torch.bfloat16) for m in args.rows}
        t_nat = {m: time_graph(F.linear, xs[m], natives) for m in args.rows}
        del natives
        for m in args.rows:
            layer[(m, "native")] = layer.get((m, "native"), 0.0) + t_nat[m]
        for fmt in args.formats:
            one = make_parts(fmt, sizes, k, args.group, dev)
            qws = [one] + copies_of(lambda: make_parts(fmt, sizes, k, args.group, dev), nbytes(one))[1:]
            dense = compiled(DENSE[fmt])
            cfg = fused.config_for(fmt, n, k)
            for m, x in xs.items():
                t_scr = time_graph(lambda x_, p: F.linear(x_, dense(p, x_.dtype)), x, qws)
                t_fus = time_graph(lambda x_, p: linear(x_, Packed(fmt, p)), x, qws)
                got, scratch = linear(x, Packed(fmt, one)), F.linear(x, DENSE[fmt](one, x.dtype))
                ok_prod, _ = check_products(fmt, x, one, got)
                checks = {"dequant": check_dequant(fmt, one, k, dev), "products": ok_prod,
                          "repeat": torch.equal(linear(x, Packed(fmt, one)), got),
                          "graph+compile": check_graphed_compile(fmt, x, one)}
                print(f"{name:13} {fmt:4} {m:3} {t_nat[m]:9.1f} {gbps(n * k * 2, t_nat[m]):6.0f} {t_scr:10.1f} "
                      f"{gbps(nbytes(one), t_scr):6.0f} {t_fus:8.1f} {gbps(nbytes(one), t_fus):6.0f} "
                      f"{t_nat[m] / t_fus:8.2f}x {t_scr / t_fus:9.2f}x {(got - scratch).abs().max().item():9.2e} "
                      f"{f'n{cfg.block_n} k{cfg.block_k} s{cfg.split} w{cfg.warps} st{cfg.stages}':26} "
                      + " ".join(f"{c}={'ok' if v else 'FAIL'}" for c, v in checks.items()), flush=True)
                failed += [f"{name} {fmt} M={m}: {c}" for c, v in checks.items() if not v]
                for key, t in ((f"{fmt} scratch", t_scr), (f"{fmt} fused", t_fus)):
                    layer[(m, key)] = layer.get((m, key), 0.0) + t
                if args.sweep:
                    best, us, same = sweep(fmt, x, qws, got)
                    print(f"  sweep: fastest {best} {us:.1f} us ({t_fus / us:.2f}x the table's); bits equal the "
                          f"table's: {same}", flush=True)
                if args.variants and fmt == "int4":
                    for variant, (vcfg, us, vchecks) in sweep_variants(fmt, x, qws, k, m).items():
                        layer[(m, f"int4 {variant}")] = layer.get((m, f"int4 {variant}"), 0.0) + us
                        fastest.setdefault((m, variant), []).append(f"{name}: {vcfg}")
                        failed += [f"{name} {variant} M={m}: {c}" for c, v in vchecks.items() if not v]
            del qws, one
        torch.cuda.empty_cache()
    if set(args.shapes) == set(SHAPES):
        print("# one decoder layer (the four projections), us:")
        for (m, key), t in sorted(layer.items()):
            print(f"  M={m:<3} {key:14} {t:9.1f}")
        for (m, variant), cfgs in sorted(fastest.items()):
            print(f"# M={m} {variant} fastest: " + "; ".join(cfgs))
    if failed:
        print("FAILED: " + "; ".join(failed))
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
