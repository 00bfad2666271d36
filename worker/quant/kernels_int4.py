"""int4 kernel variants that a launch-table entry can pick (`worker.quant.fused.Config.variant`).

`kernels.int4_kernel` (variant "dot") dequantizes one nibble plane of a K step at a time and dots each:
eight dots per step, and on Hopper each is a wgmma whose operand goes through shared memory behind a
barrier, so one step waits eight times. The kernel here builds a step's whole (BLOCK_N, BLOCK_K) tile
first, as a (BLOCK_N, WORDS, 8) tensor whose [n, j, i] is nibble i of word j (column 8j + i), then

- variant "dot1" (`GEMV` off): one dot per step, the tile reshaped to (BLOCK_N, BLOCK_K) against the
  step's (BLOCK_K, BLOCK_M) columns of x read once and contiguously;
- variant "gemv" (`GEMV` on): no dot. Each product is a float32 FMA of the two compute-dtype values: the
  product of two bfloat16 (float16) numbers is exact in float32, so it is the product a tensor core forms,
  and the sums are float32. For one row of x, where a dot pads x to 16 rows and wastes 15/16 of its work,
  the accumulator is (BLOCK_N, WORDS, 8), summed over its last two axes once at the end; for a few rows
  it is (BLOCK_N, WORDS, BLOCK_M), the eight nibbles summed each step.

Either dequantizes every element to the value `worker.quant.dequant` gives, in one of two ways. With
`HALF_MAGIC` 0 as `kernels` does: (q - z) * s in float32 and one cast to the compute dtype. With
`HALF_MAGIC` the bits of 128 in bfloat16 (0x4300) or 1024 in float16 (0x6400), used only when the scales
are stored in the compute dtype: the nibble OR-ed under those bits is the number 128 + q (1024 + q)
exactly, minus 128 + z exactly is q - z, and one product by s in the compute dtype rounds the exact
(q - z) * s once, which is what the float32 product cast once gives. The same bits, fewer instructions
(no float32 → 16-bit conversion). So every variant multiplies by the same weight values; only the order
of the float32 sums differs, fixed by the variant and the configuration.

Grid and splits as in `kernels` (parts on axis 0, `SPLIT` float32 partial sums on axis 1 summed by
`kernels.sum_splits`, rows of x on axis 2).
"""

from __future__ import annotations

import triton
import triton.language as tl

from worker.quant.kernels import MAGIC, int4_step
HALF_MAGICS = {"bfloat16": 0x4300, "float16": 0x6400}  # 128 and 1024: their last mantissa bits are zero


@triton.jit
def _nibble(word, i: tl.constexpr, h: tl.constexpr, s, z, dt: tl.constexpr, HALF_MAGIC: tl.constexpr):
    """Nibble i + 4h (i < 4) of every word (BN, WORDS), dequantized to the compute dtype `dt`; s and z are
    the words' scales (as stored) and zeros, (BN, 1) or (BN, WORDS)."""
    if HALF_MAGIC:  # one shift and one AND give nibbles i and i + 4 as 128 + q in the two halves of a word
        t = ((word >> (4 * i)) & 0x000F000F) | (HALF_MAGIC * 0x10001)
        if h == 1:
            t = t >> 16
        zh = (z.to(tl.uint32) | HALF_MAGIC).to(tl.uint16).to(dt, bitcast=True)  # 128 + z
        v = (t.to(tl.uint16).to(dt, bitcast=True) - zh) * s  # exact q - z, one rounding of (q - z) * s
    else:  # the half of each word under the bits of 2^23: the nibble is one AND away from the float32
        # 2^23 + q * 2^4i; minus 2^23 + z * 2^4i is exact; times s / 2^4i rounds once (as `kernels` does)
        if h == 0:
            f = (word & 0xFFFF) | MAGIC
        else:
            f = (word >> 16) | MAGIC
        f = (f & (MAGIC | (15 << (4 * i)))).to(tl.float32, bitcast=True)
        v = ((f - (z.to(tl.float32) * (1 << (4 * i)) + 8388608.0)) * (s.to(tl.float32) * (1.0 / (1 << (4 * i))))).to(dt)
    return v


@triton.jit
def _quad(word, i0: tl.constexpr, h0: tl.constexpr, i1: tl.constexpr, h1: tl.constexpr, i2: tl.constexpr,
          h2: tl.constexpr, i3: tl.constexpr, h3: tl.constexpr, s, z, dt: tl.constexpr, HALF_MAGIC: tl.constexpr):
    """Four nibbles (i + 4h) of every word, dequantized, joined as [.., c, b] = the (2c + b)-th named."""
    return tl.join(tl.join(_nibble(word, i0, h0, s, z, dt, HALF_MAGIC), _nibble(word, i1, h1, s, z, dt, HALF_MAGIC)),
                   tl.join(_nibble(word, i2, h2, s, z, dt, HALF_MAGIC), _nibble(word, i3, h3, s, z, dt, HALF_MAGIC)))


@triton.jit
def _natural_tile(word, s, z, dt: tl.constexpr, HALF_MAGIC: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """A step's (BLOCK_N, BLOCK_K) tile in column order from its words (BN, BK / 8), by joins (each a new
    innermost axis of 2 that one thread holds): [n, j, c, b, a] is nibble 4c + 2b + a of word j."""
    n0 = _quad(word, 0, 0, 0, 1, 2, 0, 2, 1, s, z, dt, HALF_MAGIC)  # nibbles 0, 4, 2, 6
    n1 = _quad(word, 1, 0, 1, 1, 3, 0, 3, 1, s, z, dt, HALF_MAGIC)  # nibbles 1, 5, 3, 7
    return tl.reshape(tl.join(n0, n1), (BLOCK_N, BLOCK_K))


@triton.jit
def _paired_tile(word, s, z, dt: tl.constexpr, HALF_MAGIC: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """The tile with nibbles i and i + 4 side by side, the two halves of `_nibble`'s one 32-bit AND, which
    a packed bfloat16x2 (float16x2) instruction can then dequantize together: column 8j + 4a + 2b + c is
    nibble a + 2b + 4c of word j, the three bits of the column order reversed."""
    lo = _quad(word, 0, 0, 1, 0, 2, 0, 3, 0, s, z, dt, HALF_MAGIC)  # nibbles 0, 1, 2, 3
    hi = _quad(word, 0, 1, 1, 1, 2, 1, 3, 1, s, z, dt, HALF_MAGIC)  # nibbles 4, 5, 6, 7
    return tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))


@triton.jit
def _tile(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, N, col0, pid_n, M, K, stride_w, stride_xm, stride_om, stride_os,
          iters, GROUP: tl.constexpr, EVEN_K: tl.constexpr, GEMV: tl.constexpr, HALF_MAGIC: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One (BLOCK_N, BLOCK_M) tile of y^T from an int4 part laid out as in `kernels._int4_tile` (GEMV:
    BLOCK_M is 1). `stride_w` is K / 8, the words of a row: an argument of its own so that Triton sees it
    divisible by 16 when it is and loads four words at a time."""
    WORDS: tl.constexpr = BLOCK_K // 8
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) output channels of the part
    rm = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,) rows of x
    rw = tl.arange(0, WORDS)  # (WORDS,) words of a step
    rk = tl.arange(0, BLOCK_K)  # (BK,) columns of a step
    n_ok, m_ok = rn < N, rm < M
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_w  # (BN, 1)
    sz_rows = rn.to(tl.int64)[:, None] * (K // GROUP)  # (BN, 1)
    dt = x_ptr.dtype.element_ty
    if GEMV:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    start = pid_k * iters
    for it in range(start, tl.minimum(start + iters, tl.cdiv(K, BLOCK_K))):
        k0 = it * BLOCK_K
        _, word, s, z = int4_step(w_rows, s_ptr, z_ptr, sz_rows, k0, rw, n_ok, K, GROUP, EVEN_K, BLOCK_K)
        kk = k0 + rk  # (BK,) columns of x
        if GEMV:  # one row, program_id(2) < M; the tile's columns in pair order
            w = _paired_tile(word, s, z, dt, HALF_MAGIC, BLOCK_N, BLOCK_K)
            xk = tl.load(x_ptr + tl.program_id(2) * stride_xm + kk, mask=kk < K, other=0.0)  # (BK,)
            # [j, p, q, r] is column 8j + 4p + 2q + r: reversing the three bits gives the tile's order
            xk = tl.reshape(tl.permute(tl.reshape(xk, (WORDS, 2, 2, 2)), (0, 3, 2, 1)), (BLOCK_K,))
            acc += w.to(tl.float32) * xk.to(tl.float32)[None, :]
        else:
            w = _natural_tile(word, s, z, dt, HALF_MAGIC, BLOCK_N, BLOCK_K)
            xt = tl.load(x_ptr + rm[None, :] * stride_xm + kk[:, None], mask=(kk < K)[:, None] & m_ok[None, :],
                         other=0.0)  # (BK, BM)
            acc = tl.dot(w, xt, acc)
    if GEMV:
        y = tl.sum(acc, axis=1)[:, None]  # (BN, 1)
    else:
        y = acc
    out = out_ptr + pid_k * stride_os + rm[None, :] * stride_om + (col0 + rn)[:, None]  # y[m, col0 + n]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


@triton.jit
def int4_tile_kernel(x_ptr, out_ptr, w0, s0, z0, w1, s1, z1, w2, s2, z2, N0, N1, N2, M, K, stride_w, stride_xm,
                     stride_om, stride_os, iters, PARTS: tl.constexpr, GROUP: tl.constexpr, EVEN_K: tl.constexpr,
                     GEMV: tl.constexpr, HALF_MAGIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    nb0 = tl.cdiv(N0, BLOCK_N)
    if PARTS == 1:
        _tile(x_ptr, w0, s0, z0, out_ptr, N0, 0, pid, M, K, stride_w, stride_xm, stride_om, stride_os, iters,
              GROUP, EVEN_K, GEMV, HALF_MAGIC, BLOCK_M, BLOCK_N, BLOCK_K)
    elif pid < nb0:
        _tile(x_ptr, w0, s0, z0, out_ptr, N0, 0, pid, M, K, stride_w, stride_xm, stride_om, stride_os, iters,
              GROUP, EVEN_K, GEMV, HALF_MAGIC, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        nb1 = tl.cdiv(N1, BLOCK_N)
        if PARTS == 2:
            _tile(x_ptr, w1, s1, z1, out_ptr, N1, N0, pid - nb0, M, K, stride_w, stride_xm, stride_om, stride_os, iters,
                  GROUP, EVEN_K, GEMV, HALF_MAGIC, BLOCK_M, BLOCK_N, BLOCK_K)
        elif pid < nb0 + nb1:
            _tile(x_ptr, w1, s1, z1, out_ptr, N1, N0, pid - nb0, M, K, stride_w, stride_xm, stride_om, stride_os, iters,
                  GROUP, EVEN_K, GEMV, HALF_MAGIC, BLOCK_M, BLOCK_N, BLOCK_K)
        else:
            _tile(x_ptr, w2, s2, z2, out_ptr, N2, N0 + N1, pid - nb0 - nb1, M, K, stride_w, stride_xm, stride_om,
                  stride_os, iters, GROUP, EVEN_K, GEMV, HALF_MAGIC, BLOCK_M, BLOCK_N, BLOCK_K)
