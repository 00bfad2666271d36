"""The fused dequantize-matmul: y = x @ dequant(W)^T read straight from a quantized weight's parts.

Why: with a few rows of x (a decode step) a matmul is one pass over its weight's bytes. Dequantizing
to a dense scratch weight first reads the packed bytes, writes a dense weight and reads that again,
more bytes than the native matmul reads, so resident quantized weights ran slower than native ones.
The kernels here (`worker.quant.kernels`, Triton) read each packed byte once and dequantize in
registers. With many rows (a prefill) the matmul is bound by arithmetic, not bytes, and the dense
matmul after a scratch dequantization is the better kernel: `applies` is the rule, by rows
(`FUSED_ROWS`), format, dtype and device, never by mode, and `worker.quant.matmul.linear` is the one
place that asks it.

Exactness: each element is dequantized as `worker.quant.dequant` does it ((q - z) * s in float32,
one cast), multiplied in the compute dtype and summed in float32, so the kernels differ from the
scratch path only in the order of the sums. The kernel variant (int4: `Config.variant`), block sizes
and split along K come from a fixed table by shape and rows of x (`config_for`), never from timing,
and a split is summed in a fixed order without atomics: one shape gives the same bits in every
process and every mode. `benchmarks/quant_kernels.py` times the table's alternatives (`--sweep`, and
`--variants` for the int4 variants of `worker.quant.kernels_int4`), so a better table is a measured
edit of `config_for`'s tables.

The kernels are custom ops (`torch.ops.streambench.int4_linear`, `int8_linear`) with shape-only fake
implementations, so torch.compile (fullgraph) traces them as opaque calls and a CUDA graph captures
their launches. float32 compute and CPU tensors keep the scratch path.
"""

import contextlib
import importlib.util
from dataclasses import dataclass

import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None
DEVICES = ("cuda",)  # where the kernels run (the CPU tests add "cpu" under Triton's interpreter)
DTYPES = (torch.bfloat16, torch.float16)
FUSED_ROWS = 64  # rows of x (batch × tokens) up to which the fused kernels run
MAX_PARTS = 3  # q|k|v
TARGET_PROGRAMS = 512  # split K until about this many programs: ~4 per SM of an H100/H200 keeps HBM busy
MIN_STEPS = 4  # ... while every split keeps at least this many K steps


VARIANTS = ("dot", "dot1", "gemv")  # int4 kernels: kernels.int4_kernel, then kernels_int4's two


@dataclass(frozen=True)
class Config:
    """A launch: output channels per program, inputs per K step, splits of K, warps, pipeline stages, and
    for int4 the kernel (`VARIANTS`): "dot" `kernels.int4_kernel` (one dot per nibble plane), "dot1" one dot
    per K step, "gemv" FMAs without a dot, one row of x per program (`worker.quant.kernels_int4`). int8
    and fp8 have one kernel and take "dot" only."""

    block_n: int
    block_k: int
    split: int
    warps: int = 4
    stages: int = 4
    variant: str = "dot"

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant: {self.variant!r} is none of {VARIANTS}")


# Launches measured fastest per 70B projection (benchmarks/results/quant_h200/quant_kernels_sweep1.txt)
# where the rule below picks another split: (format, n, k) → split.
MEASURED_SPLIT = {("int4", 57344, 8192): 8, ("int8", 10240, 8192): 8, ("int8", 8192, 8192): 2}
# Whole launches measured fastest (`benchmarks/quant_kernels.py --variants`), by (format, n, k): entries
# (most rows of x, Config) in increasing rows, the first that covers x's rows taken. int4 on the 70B
# shapes from benchmarks/results/quant_h200/quant_kernels_int4_variants.txt (rows 1 and 16 measured;
# more rows take the rule).
_G, _D = "gemv", "dot1"
MEASURED: dict[tuple[str, int, int], tuple[tuple[int, Config], ...]] = {
    ("int4", 10240, 8192): ((1, Config(64, 128, 8, 4, 2, _G)), (16, Config(32, 128, 8, 2, 3, _D))),
    ("int4", 8192, 8192): ((1, Config(64, 128, 4, 4, 2, _G)), (16, Config(32, 128, 4, 2, 3, _D))),
    ("int4", 57344, 8192): ((1, Config(32, 128, 4, 2, 3, _D)), (16, Config(32, 128, 2, 2, 3, _D))),
    ("int4", 8192, 28672): ((1, Config(32, 128, 8, 2, 3, _D)), (16, Config(32, 128, 8, 2, 3, _D))),
}


def config_for(fmt: str, n: int, k: int, rows: int = 1) -> Config:
    """The fixed configuration of a shape: n output channels (all parts), k inputs, `rows` rows of x. A
    measured entry (`MEASURED`) where one covers the rows; else the rule: a K step is 128 columns (for
    int4 16 words, the least a dot takes) whatever the group size, 64 channels per program and 3 stages
    (the fastest on every 70B shape swept), K split until there are about `TARGET_PROGRAMS` programs
    unless the sweep measured another split for the shape."""
    for most, cfg in MEASURED.get((fmt, n, k), ()):
        if rows <= most:
            return cfg
    block_n, block_k = 64, 128
    blocks, steps = cdiv(n, block_n), cdiv(k, block_k)
    split = 1
    while split < 16 and blocks * split < TARGET_PROGRAMS and steps >= 2 * split * MIN_STEPS:
        split *= 2
    split = MEASURED_SPLIT.get((fmt, n, k), split)
    return Config(block_n, block_k, split, stages=3)


def block_m(rows: int) -> int:
    """Rows of x per program: a power of two from 16 (the dot's least) to 64."""
    return min(64, max(16, 1 << max(0, rows - 1).bit_length()))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _fp8_capable(index: int) -> bool:
    """float8 e4m3 → float32 in registers needs compute capability 8.9 (Ada, Hopper) or later.

    `torch.cuda.get_device_properties` is one of the calls Dynamo folds to a constant, so this traces
    without a graph break and without `torch.compiler.assume_constant_result`, whose use at import
    would import torch._dynamo into every run (a second of start-up that a run without compile skips)."""
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor) >= (8, 9)


def applies(w, x: torch.Tensor) -> bool:
    """Whether `x @ dequant(w)^T` runs fused: `w` is a `worker.quant.dequant.Packed`, x (..., in)."""
    if not HAVE_TRITON or x.device.type not in DEVICES or x.dtype not in DTYPES or len(w.parts) > MAX_PARTS:
        return False
    if x.numel() // x.shape[-1] > FUSED_ROWS:
        return False
    if w.fmt == "int4":
        qweight, scales, _ = w.parts[0]
        return (2 * qweight.shape[1] // scales.shape[1]) % 8 == 0  # no 32-bit word of nibbles spans two groups
    if w.fmt == "fp8":
        return x.device.type != "cuda" or _fp8_capable(x.device.index)
    return w.fmt == "int8"


def linear(x: torch.Tensor, w) -> torch.Tensor:
    """x (..., in) @ dequant(w)^T → (..., Σ out) through the custom ops, one launch for all parts."""
    x2 = x.reshape(-1, x.shape[-1])  # (M, in)
    qweights, scales = [p[0] for p in w.parts], [p[1] for p in w.parts]
    if w.fmt == "int4":
        y = torch.ops.streambench.int4_linear(x2, qweights, scales, [p[2] for p in w.parts])
    else:
        y = torch.ops.streambench.int8_linear(x2, qweights, scales)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def matmul(fmt: str, x: torch.Tensor, parts: tuple[tuple[torch.Tensor, ...], ...],
           cfg: Config | None = None) -> torch.Tensor:
    """The launch behind the ops: x (M, K) → (M, Σ N) in x's dtype; `cfg` None is `config_for`'s
    (a benchmark passes others)."""
    from worker.quant import kernels

    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    ns = [p[0].shape[0] for p in parts]
    n = sum(ns)
    group = k // parts[0][1].shape[1] if fmt == "int4" else 0
    cfg = cfg or config_for(fmt, n, k, m)
    check_config(fmt, cfg)
    bm = 1 if cfg.variant == "gemv" else block_m(m)
    y = x.new_empty(m, n)
    out = y if cfg.split == 1 else torch.empty(cfg.split, m, n, dtype=torch.float32, device=x.device)
    grid = (sum(cdiv(ni, cfg.block_n) for ni in ns), cfg.split, cdiv(m, bm))
    iters = cdiv(cdiv(k, cfg.block_k), cfg.split)  # K steps per split
    pad = list(parts) + [parts[0]] * (MAX_PARTS - len(parts))
    sizes = ns + [0] * (MAX_PARTS - len(parts))
    strides = (x.stride(0), n, 0 if cfg.split == 1 else m * n)  # x's rows, y's rows, the splits' slices
    meta = dict(PARTS=len(parts), EVEN_K=k % cfg.block_k == 0, BLOCK_M=bm, BLOCK_N=cfg.block_n,
                BLOCK_K=cfg.block_k, num_warps=cfg.warps, num_stages=cfg.stages)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        if fmt == "int4":
            flat = [t for q, s, z in pad for t in (q.view(torch.uint32), s, z)]  # 8 nibbles a word
            if cfg.variant == "dot":
                kernels.int4_kernel[grid](x, out, *flat, *sizes, m, k, *strides, iters, GROUP=group, **meta)
            else:
                from worker.quant import kernels_int4

                same = all(p[1].dtype == x.dtype for p in parts)  # scales stored in the compute dtype
                magic = kernels_int4.HALF_MAGICS[str(x.dtype).removeprefix("torch.")] if same else 0
                kernels_int4.int4_tile_kernel[grid](x, out, *flat, *sizes, m, k, k // 8, *strides, iters,
                                                    GROUP=group, GEMV=cfg.variant == "gemv", HALF_MAGIC=magic,
                                                    **meta)
        else:
            fp8 = parts[0][0].dtype == torch.float8_e4m3fn
            flat = [t for q, s in pad for t in (q.view(torch.uint8) if fp8 else q, s)]
            kernels.int8_kernel[grid](x, out, *flat, *sizes, m, k, *strides, iters, FP8=fp8, **meta)
        if cfg.split > 1:
            kernels.sum_splits[(cdiv(m * n, kernels.SUM_BLOCK),)](out, y, m * n, SPLIT=cfg.split,
                                                                  BLOCK=kernels.SUM_BLOCK)
    return y


def check_config(fmt: str, cfg: Config) -> None:
    """The GPU compiler's rules for a launch, asserted so that the interpreter fails where the GPU would:
    a dot needs 16 x 16 at least (the "dot" int4 kernel dots 16-word planes), sizes are powers of two."""
    unit = 8 if fmt == "int4" and cfg.variant == "dot" else 1  # columns per element a dot's K counts
    assert fmt == "int4" or cfg.variant == "dot", f"{cfg}: {fmt} has one kernel"
    assert all(v & (v - 1) == 0 for v in (cfg.block_n, cfg.block_k)), f"{cfg}: blocks are powers of two"
    if cfg.variant == "gemv":
        assert cfg.block_k >= 8, f"{cfg}: a step is whole words"
    else:
        assert cfg.block_n >= 16 and cfg.block_k // unit >= 16, f"{cfg}: a dot needs 16 x 16 at least"


@torch.library.custom_op("streambench::int4_linear", mutates_args=())
def int4_linear(x: torch.Tensor, qweight: list[torch.Tensor], scales: list[torch.Tensor],
                zeros: list[torch.Tensor]) -> torch.Tensor:
    """x (M, K) @ dequant(int4 parts)^T → (M, Σ N): qweight uint8 (N, K/2), scales (N, G), zeros uint8 (N, G)."""
    return matmul("int4", x, tuple(zip(qweight, scales, zeros)))


@int4_linear.register_fake
def _(x, qweight, scales, zeros):
    return x.new_empty(x.shape[0], sum(q.shape[0] for q in qweight))


@torch.library.custom_op("streambench::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, qweight: list[torch.Tensor], scales: list[torch.Tensor]) -> torch.Tensor:
    """x (M, K) @ dequant(per-channel parts)^T → (M, Σ N): qweight int8 or float8_e4m3fn (N, K), scales (N,)."""
    return matmul("int8", x, tuple(zip(qweight, scales)))


@int8_linear.register_fake
def _(x, qweight, scales):
    return x.new_empty(x.shape[0], sum(q.shape[0] for q in qweight))
