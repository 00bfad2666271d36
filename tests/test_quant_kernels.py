"""The fused dequantize-matmul (`worker.quant.fused`) against the scratch path it replaces.

On CUDA the kernels run as the engine runs them. Without CUDA they run under Triton's interpreter,
which is chosen when a kernel is defined (`TRITON_INTERPRET=1`), so in a process of its own:
`test_kernels_under_the_triton_interpreter` runs this file again there, with the CPU added to the
kernels' devices. The interpreter does not support bfloat16 arithmetic (its `tl.dot` multiplies the
raw bit patterns, triton-lang/triton#11584, its float32 → bfloat16 cast truncates, and its bfloat16
add, subtract and multiply work on the bit patterns as integers), so under it those operations are
patched to what the GPU computes (`_interpreter`); float16 runs unpatched.
What the interpreter does not check is the GPU compiler's own rules (a dot needs 16 x 16 at least:
`fused.matmul` asserts it, so the interpreter fails where the GPU would).

What is checked: every element dequantizes to exactly what `DENSE` gives (a one-hot x reads the
weight back bit for bit, all 16 nibble values in both halves of a byte, zero points 0..15, scales of
every dtype the formats store), decode-shaped products (rows 1, 3, 16, 33; output sizes that are no
multiple of the block; one to three parts; K splits) are the float32 product rounded once, repeated
calls give the same bits, and the same for each int4 kernel variant (`fused.VARIANTS`: the
compute-dtype dequantization where the scales are stored in it, the float32 one where not), the
custom ops trace under torch.compile (fullgraph) to the eager bits,
a bfloat16 int4 engine gives the same logits in every mode with the kernels in its matmuls, and (on
CUDA) its graphed decode step replays to the eager step's bits.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from worker.quant import fused
from worker.quant.dequant import DENSE, Packed
from worker.quant.matmul import linear

CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEV = torch.device("cuda" if CUDA else "cpu")
kernels_run = pytest.mark.skipif(not (CUDA or INTERPRETED), reason="without CUDA these run under Triton's "
                                 "interpreter, in test_kernels_under_the_triton_interpreter")
DTYPES = [torch.bfloat16, torch.float16]
UNIT = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}  # the largest relative rounding error


def _triton_version() -> tuple[int, ...] | None:
    if importlib.util.find_spec("triton") is None:
        return None
    from importlib.metadata import version

    return tuple(int(p) for p in version("triton").split(".")[:2])


INTERPRETER_TEST = "test_kernels_under_the_triton_interpreter"
_interpreter_run: dict[str, tuple[subprocess.Popen, Path]] = {}


def interpreter_run_wanted() -> bool:
    """Whether this process would run the file again under the interpreter (the entry point's skips)."""
    return not CUDA and not INTERPRETED and (_triton_version() or (0,)) >= (3, 9)


def start_interpreter_run(out_dir: Path) -> None:
    """Start the interpreter's run of this file in a process of its own, once. conftest.py calls this at
    collection when the entry point is selected (and not under xdist, whose workers each collect), so
    its ~2 minutes of one core run beside the serial suite, which keeps a 2-core machine's second core
    mostly idle; the entry point then only waits for it. The child runs at the lowest priority (nice
    19) on one thread, so it takes only what the suite leaves idle: the suite's timing checks that do not
    hold beside a busy second core (README, on `-n 2`) keep their core. Output goes to a file, so a long
    failure cannot fill a pipe."""
    if "run" in _interpreter_run:
        return
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{root}:{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "interpreter-run.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                                cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=lambda: os.nice(19))
    _interpreter_run["run"] = (proc, log)


def stop_interpreter_run() -> None:
    """At the session's end: a run the entry point did not wait for (interrupted) is killed, not orphaned,
    and the log directory goes."""
    run = _interpreter_run.pop("run", None)
    if run is not None:
        if run[0].poll() is None:
            run[0].kill()
            run[0].wait()
        shutil.rmtree(run[1].parent, ignore_errors=True)


@pytest.mark.skipif(CUDA, reason="CUDA runs the kernel tests directly")
@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter's run")
@pytest.mark.skipif(_triton_version() is None,
                    reason="triton is not installed (it is in the test extras: pip install -e '.[test]')")
@pytest.mark.skipif((_triton_version() or (99,)) < (3, 9),
                    reason="Triton's interpreter before 3.9 fails on these kernels under numpy 2 (seen with 3.6: "
                    "int() of a 1-element array in a loop bound); CPU checks need triton>=3.9")
@pytest.mark.timeout(900)
def test_kernels_under_the_triton_interpreter(tmp_path):
    start_interpreter_run(tmp_path)  # a no-op where conftest started it at collection
    proc, log = _interpreter_run["run"]
    code = proc.wait()
    out = log.read_text()
    assert code == 0, out[-9000:]
    assert " passed" in out and " skipped" in out  # only the entry point skips there


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    """Under the interpreter: CPU tensors take the fused path, and bfloat16 behaves as on the GPU. The
    interpreter keeps bfloat16 as raw 16-bit integers; its `tl.dot` multiplies those bit patterns and
    its float32 → bfloat16 cast truncates. Here a dot multiplies the values (exact products, float32
    sums, as the GPU's matrix units), the cast rounds to nearest even (as `cvt.rn.bf16.f32`), and an add,
    subtract or multiply of two bfloat16 is the float32 result rounded so (correct for the exact
    differences and single products the kernels form)."""
    if not INTERPRETED:
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    monkeypatch.setattr(fused, "DEVICES", ("cuda", "cpu"))
    builder = interpreter.InterpreterBuilder
    dot, cast = builder.create_dot, builder.cast_impl
    arith = {name: getattr(builder, name) for name in ("create_fadd", "create_fsub", "create_fmul")}

    def value(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        f32 = interpreter._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interpreter.TensorHandle(f32, tl.float32)

    def create_dot(self, a, b, d, *args):
        return dot(self, value(a), value(b), d, *args)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bf16 = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return interpreter.TensorHandle(bf16.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return cast(self, src, dst_type)

    def bf16_op(name):
        def op(self, lhs, rhs):
            if lhs.dtype.scalar != tl.bfloat16:
                return arith[name](self, lhs, rhs)
            return cast_impl(self, arith[name](self, value(lhs), value(rhs)), tl.bfloat16)
        return op

    monkeypatch.setattr(builder, "create_dot", create_dot)
    monkeypatch.setattr(builder, "cast_impl", cast_impl)
    for name in arith:
        monkeypatch.setattr(builder, name, bf16_op(name))


def random_parts(fmt: str, sizes: tuple[int, ...], k: int, group: int = 64, scale_dtype=None, seed: int = 0):
    """Parts of `fmt` for weights of `sizes` output channels and k inputs, every code drawn at random:
    int4 bytes 0..255 (both nibbles 0..15) and zeros 0..15, int8 -128..127, fp8 every finite code."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for n in sizes:
        if fmt == "int4":
            q = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
            s = (torch.rand(n, k // group, generator=g) * 0.02 + 1e-3).to(scale_dtype or torch.bfloat16)
            parts.append((q, s, torch.randint(0, 16, (n, k // group), generator=g, dtype=torch.uint8)))
        else:
            raw = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
            if fmt == "fp8":
                raw = torch.where((raw & 0x7F) == 0x7F, torch.zeros_like(raw), raw)  # no NaN codes
                q = raw.view(torch.float8_e4m3fn)
            else:
                q = raw
            parts.append((q, (torch.rand(n, generator=g) * 0.01 + 1e-4).to(scale_dtype or torch.float32)))
    return tuple(tuple(t.to(DEV) for t in p) for p in parts)


CASES = [  # (format, output sizes of the parts, K, int4 group, scale dtype)
    ("int4", (200,), 256, 64, None),
    ("int4", (72, 40, 40), 256, 128, None),  # q|k|v
    ("int4", (130, 130), 160, 32, torch.float16),  # gate|up; AWQ's float16 scales; K not a multiple of a step
    ("int4", (48,), 384, 128, torch.float32),
    ("int4", (48,), 264, 24, None),  # groups of 3 words
    ("int8", (200,), 256, 0, None),
    ("int8", (72, 40, 40), 200, 0, torch.bfloat16),  # K not a multiple of the block
    ("fp8", (130, 130), 256, 0, None),
    ("fp8", (40,), 136, 0, torch.float16),
]
SPLIT = {"int4": fused.Config(64, 128, 3), "int8": fused.Config(64, 64, 3), "fp8": fused.Config(16, 32, 3)}
VARIANTS = (fused.Config(32, 64, 2, variant="dot1"), fused.Config(64, 32, 3, variant="gemv"))  # int4's others
GEMV_ROWS = 4  # "gemv" runs a program per row of x: under the interpreter, only for a few rows


def configs(fmt, dtype, rows=1):
    """The fixed table's configuration, and in bfloat16 a 3-way split of K with other blocks too (under
    the interpreter every program is Python: the split runs once per case); for int4 the other kernel
    variants, split, with blocks that K and N are no multiple of in every case (bfloat16 only, for CI's
    time: the cases' scale dtypes take them through both dequantizations)."""
    if dtype != torch.bfloat16:
        return (None,)
    variants = tuple(c for c in VARIANTS if c.variant != "gemv" or rows <= GEMV_ROWS) if fmt == "int4" else ()
    return (None, SPLIT[fmt]) + variants


@kernels_run
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{len(c[1])}parts-k{c[2]}")
def test_every_element_dequantizes_as_the_scratch_path(case, dtype):
    fmt, sizes, k, group, scale_dtype = case
    parts = random_parts(fmt, sizes, k, group, scale_dtype)
    dense = DENSE[fmt](parts, dtype)  # (Σ N, K)
    eye = torch.eye(k, dtype=dtype, device=DEV)  # row i reads column i of the weight: one exact product
    for cfg in configs(fmt, dtype, rows=k):
        got = fused.matmul(fmt, eye, parts, cfg)
        assert got.dtype == dtype and got.shape == (k, sum(sizes))
        assert torch.equal(got, dense.t()), f"{cfg}: {(got.float() - dense.t().float()).abs().max()}"
    if fmt == "int4" and dtype == torch.bfloat16:  # "gemv" (a program per row): first and last word, a few between
        between = torch.randperm(k - 16, generator=torch.Generator().manual_seed(1))[:8] + 8
        cols = torch.cat([torch.arange(8), between, torch.arange(k - 8, k)]).to(DEV)
        got, want = fused.matmul(fmt, eye[cols], parts, fused.Config(256, 128, 1, variant="gemv")), dense.t()[cols]
        assert torch.equal(got, want), f"gemv: {(got.float() - want.float()).abs().max()}"


@kernels_run
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 3, 16, 33])
@pytest.mark.parametrize("case", CASES[1:3] + CASES[6:8], ids=lambda c: f"{c[0]}-{len(c[1])}parts-k{c[2]}")
def test_decode_products_are_the_float32_product_rounded_once(case, rows, dtype):
    fmt, sizes, k, group, scale_dtype = case
    parts = random_parts(fmt, sizes, k, group, scale_dtype, seed=rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(dtype).to(DEV)
    w = DENSE[fmt](parts, dtype)
    exact = x.double() @ w.double().t()  # products of the compute dtype's values, summed without error
    slack = k * 2.0 ** -24 * (x.double().abs() @ w.double().abs().t())  # float32 sums in another order
    scratch = torch.nn.functional.linear(x, w)
    for cfg in configs(fmt, dtype, rows):
        got = fused.matmul(fmt, x, parts, cfg)
        err = (got.double() - exact).abs()
        assert (err <= UNIT[dtype] * exact.abs() + 2 * slack).all(), f"{cfg}: max |err| {err.max():.3e}"
        assert (got.double() - scratch.double()).abs().max() <= 2 * UNIT[dtype] * exact.abs().max()
    assert torch.equal(fused.matmul(fmt, x, parts, cfg), got)  # the same bits on every call


@kernels_run
@pytest.mark.skipif(not CUDA and not (shutil.which("g++") or shutil.which("cc")),
                    reason="Inductor's CPU backend needs a C compiler")
def test_the_ops_trace_under_torch_compile_to_the_eager_bits():
    from worker.model.compiled import compiled

    def layer(x, w4, w8):
        return linear(torch.nn.functional.silu(linear(x, w4)), w8)  # (B, T, 64)

    w4 = Packed("int4", random_parts("int4", (72, 40, 40), 128, 32))
    w8 = Packed("int8", random_parts("int8", (64,), 152))
    x = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16).to(DEV)
    assert fused.applies(w4, x)
    eager = layer(x, w4, w8)
    assert eager.shape == (2, 3, 64)
    assert torch.equal(compiled(layer)(x, w4, w8), eager)


def _packed(fmt, rows=1, k=256, group=64, dtype=torch.bfloat16, device="cpu"):
    parts = random_parts(fmt, (48,), k, group)
    return Packed(fmt, tuple(tuple(t.to(device) for t in p) for p in parts)), torch.zeros(rows, k, dtype=dtype,
                                                                                           device=device)


def test_the_fused_path_is_chosen_by_rows_dtype_format_and_device_alone(monkeypatch):
    monkeypatch.setattr(fused, "DEVICES", ("cuda",))
    assert not fused.applies(*_packed("int4"))  # CPU tensors keep the scratch path
    monkeypatch.setattr(fused, "DEVICES", ("cpu",))
    monkeypatch.setattr(fused, "HAVE_TRITON", True)
    for fmt in ("int4", "int8", "fp8"):
        assert fused.applies(*_packed(fmt, rows=fused.FUSED_ROWS))
        assert not fused.applies(*_packed(fmt, rows=fused.FUSED_ROWS + 1))  # a prefill: scratch + dense matmul
        assert not fused.applies(*_packed(fmt, dtype=torch.float32))  # float32: the reference path
    assert fused.applies(*_packed("int4", dtype=torch.float16, group=32))
    assert not fused.applies(*_packed("int4", group=4))  # a word of nibbles would span two groups
    w, x = _packed("int4")
    assert not fused.applies(Packed("int4", w.parts * 4), x)  # more parts than a launch takes
    monkeypatch.setattr(fused, "HAVE_TRITON", False)
    assert not fused.applies(*_packed("int4"))


def test_the_fixed_configurations_fill_the_gpu_and_split_only_long_inputs():
    for n, k in ((10240, 8192), (8192, 8192), (57344, 8192), (8192, 28672)):
        for fmt in ("int4", "int8"):
            for rows in (1, 16, 17, 64):
                cfg = fused.config_for(fmt, n, k, rows)
                assert cfg == fused.config_for(fmt, n, k, rows)
                programs = -(-n // cfg.block_n) * cfg.split
                assert programs >= 256 and k // cfg.block_k // cfg.split >= fused.MIN_STEPS, (fmt, n, k, cfg)
                assert cfg.variant != "gemv" or rows == 1, (fmt, n, k, rows, cfg)  # gemv: one row per program
        # The measured int4 launches (rows 1 and 16) are taken; 17 rows and more fall back to the rule.
        assert fused.config_for("int4", n, k, 16).variant == "dot1"
        assert fused.config_for("int4", n, k, 17).variant == "dot"
    assert fused.config_for("int4", 200, 256).split == 1  # too short to split
    assert [fused.block_m(m) for m in (1, 16, 17, 33, 64, 65)] == [16, 16, 32, 64, 64, 64]


@kernels_run
def test_a_bf16_int4_engine_gives_the_same_logits_in_every_mode(make_ckpt, monkeypatch, tmp_path):
    """The kernels in the layer's matmuls (a prefill of 2 × 11 rows, a decode step of 2): `gpu` mode equals the
    streaming modes bit for bit, and is close to the scratch path's logits."""
    from worker.engine import build_engine
    from worker.generate import generate
    from worker.pack.cache import ensure_pack
    from worker.run import resolve_config

    monkeypatch.setenv("STREAMBENCH_CACHE", str(tmp_path / "cache"))
    ckpt = make_ckpt(layers=2, dtype="bfloat16", intermediate_size=512)
    prompts = [list(range(5, 16)), list(range(40, 47))]

    def logits(**flat):
        cfg = resolve_config({"checkpoints": str(ckpt), "weight_format": "int4", "quant_group_size": 64,
                              "max_new_tokens": 2, "max_seq_len": 32, **flat})
        engine = build_engine(cfg, ensure_pack(cfg.checkpoints, weights=cfg.weights), DEV)
        try:
            gen = generate(engine.model, engine.new_cache(2, 32), prompts, 3, 0.0, 1.0, 0, (), 0, DEV,
                           keep_logits=True)
            return torch.stack(gen.logits).float()
        finally:
            engine.close()

    launches, launch = [], fused.matmul

    def counted(fmt, x, parts, cfg=None):
        launches.append(tuple(x.shape))
        return launch(fmt, x, parts, cfg)

    monkeypatch.setattr(fused, "matmul", counted)
    ref = logits(mode="gpu")
    assert (22, 256) in launches and (2, 512) in launches  # prefill and decode, down_proj's input among them
    for mode in (dict(mode="cpu", gpu_max_groups=2, group_prefetch_depth=1),
                 dict(mode="ssd", staging_mb=1, ssd_readers=2)):
        assert torch.equal(logits(**mode), ref), mode
    monkeypatch.setattr(fused, "DEVICES", ())
    torch._dynamo.reset()  # compiled layers (CUDA) were traced with the kernels in
    launches.clear()
    scratch = logits(mode="gpu")
    assert not launches
    assert (scratch - ref).abs().max() <= 0.05 * ref.abs().max()


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need CUDA")
def test_graph_replay_of_a_fused_int4_decode_equals_eager(make_ckpt, monkeypatch, tmp_path):
    """The decode step's CUDA graph (gpu mode) captures the kernels' launches: a replay computes what the
    eager step computes, bit for bit (the prefill, 2 × 40 rows, takes the scratch path)."""
    from worker.engine import build_engine
    from worker.generate import decode_spans, generate
    from worker.model.graphs import GraphedDecode
    from worker.pack.cache import ensure_pack
    from worker.run import resolve_config

    monkeypatch.setenv("STREAMBENCH_CACHE", str(tmp_path / "cache"))
    ckpt = make_ckpt(layers=2, dtype="bfloat16", intermediate_size=512)
    cfg = resolve_config({"checkpoints": str(ckpt), "mode": "gpu", "weight_format": "int4", "quant_group_size": 64})
    engine = build_engine(cfg, ensure_pack(cfg.checkpoints, weights=cfg.weights), DEV)
    try:
        prompts = [list(range(5, 45)), list(range(7, 20))]
        cache = engine.new_cache(2, 128)
        run = dict(keep_logits=True, capacity=128)
        eager = generate(engine.model, cache, prompts, 12, 0.0, 1.0, 0, (), 0, DEV, **run)
        graphs = GraphedDecode(engine.model, cache, 2, DEV)
        graphs.prepare(decode_spans(40, 12, 128))
        replay = generate(engine.model, cache, prompts, 12, 0.0, 1.0, 0, (), 0, DEV, decode=graphs, **run)
        assert graphs.graphs
        assert all(torch.equal(a, b) for a, b in zip(eager.logits, replay.logits))
        assert eager.token_ids == replay.token_ids
    finally:
        engine.close()
