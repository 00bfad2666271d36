"""Triton kernels for `worker.quant.fused`: y = x @ dequant(W)^T straight from a weight's packed parts.

One program computes a (BLOCK_N, BLOCK_M) tile of y^T: BLOCK_N output channels of one part for all
BLOCK_M rows of x, over its share of the input dimension. The weight tile is the left operand, so
the dot's long side is the weight's and the few rows of x are its short side. Every element is
dequantized as `worker.quant.dequant` does it, (q - z) * s in float32 and one cast to the compute
dtype; products in the compute dtype, sums in float32. Integers become floats by the exponent trick
(the bits of 2^23 OR-ed with q are the float 2^23 + q, exactly): a logic operation and a subtraction
instead of a conversion instruction, which runs at a fraction of the rate. int4 reads its bytes as
32-bit words of eight nibbles, so one AND extracts a nibble already under the float's exponent.

Projections that share an input (q|k|v, gate|up) arrive as up to three parts: the first grid axis
walks their output blocks in order and each program picks its part, so one launch writes the
concatenated output. With a split along K (`SPLIT > 1`, grid axis 1), each program writes a float32
partial sum to its slice of a (SPLIT, M, N) buffer and `sum_splits` adds the slices in index order:
no atomics, so the bits depend on the shape and the configuration only.

Needs Triton; imported only when a fused matmul runs (`worker.quant.fused`).
"""

from __future__ import annotations

import triton
import triton.language as tl

MAGIC = tl.constexpr(0x4B000000)  # the float32 2^23: OR-ing in an integer 0 <= v < 2^23 gives 2^23 + v
SUM_BLOCK = 1024

@triton.jit
def int4_step(w_rows, s_ptr, z_ptr, sz_rows, k0, rw, n_ok, K, GROUP: tl.constexpr, EVEN_K: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """One K step of an int4 part, shared by every int4 kernel (here and `kernels_int4`): the step's
    words (WORDS,) of the row, the words (BN, WORDS) uint32 at w_rows (BN, 1), and their scales and zeros
    as stored: (BN, 1) when BLOCK_K divides GROUP (one group for the step), else (BN, WORDS)."""
    col = k0 // 8 + rw  # (WORDS,) words of the row
    w_ok = n_ok[:, None]  # (BN, 1), or (BN, WORDS) where the step runs past K
    if not EVEN_K:
        w_ok = w_ok & (col < K // 8)[None, :]
    word = tl.load(w_rows + col[None, :], mask=w_ok, other=0)  # (BN, WORDS) uint32
    if GROUP % BLOCK_K == 0:
        g = k0 // GROUP  # one group for the whole step
    else:
        g = (8 * col // GROUP)[None, :]  # (1, WORDS)
    s = tl.load(s_ptr + sz_rows + g, mask=w_ok, other=0)
    z = tl.load(z_ptr + sz_rows + g, mask=w_ok, other=0)
    return col, word, s, z


@triton.jit
def _int4_tile(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, N, col0, pid_n, M, K, stride_xm, stride_om, stride_os,
               iters, GROUP: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """One tile of an int4 part: qweight read as 32-bit words (N, K/8), each holding columns 8j..8j+7 in
    its nibbles from the lowest up; scales (N, K/GROUP), zeros uint8 (N, K/GROUP). Nibble i of every
    word is one (BN, BLOCK_K/8) plane of the weight, dotted with the columns 8j + i of x. When
    BLOCK_K divides GROUP a step needs one scale and one zero per row, else one per word (GROUP is a
    multiple of 8, so a word never straddles two groups)."""
    WORDS: tl.constexpr = BLOCK_K // 8
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) output channels of the part
    rm = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,) rows of x
    rw = tl.arange(0, WORDS)  # (WORDS,) words of a step
    n_ok, m_ok = rn < N, rm < M
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * (K // 8)  # (BN, 1)
    sz_rows = rn.to(tl.int64)[:, None] * (K // GROUP)  # (BN, 1)
    x_cols = x_ptr + rm[None, :] * stride_xm  # (1, BM)
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    start = pid_k * iters
    for it in range(start, tl.minimum(start + iters, tl.cdiv(K, BLOCK_K))):
        k0 = it * BLOCK_K
        col, word, s, z = int4_step(w_rows, s_ptr, z_ptr, sz_rows, k0, rw, n_ok, K, GROUP, EVEN_K, BLOCK_K)
        s, z = s.to(tl.float32), z.to(tl.float32)
        x_ok = m_ok[None, :]
        if not EVEN_K:
            x_ok = x_ok & (col < K // 8)[:, None]
        # the low and the high half of each word under the bits of 2^23: nibble i is then one AND away
        # from the float32 2^23 + q * 2^sh (sh = 4 (i mod 4)), an exact integer
        lo = (word & 0xFFFF) | MAGIC
        hi = (word >> 16) | MAGIC
        for i in tl.static_range(8):
            sh = 4 * (i % 4)
            if i < 4:
                f = (lo & (MAGIC | (15 << sh))).to(tl.float32, bitcast=True)  # (BN, WORDS)
            else:
                f = (hi & (MAGIC | (15 << sh))).to(tl.float32, bitcast=True)
            # minus 2^23 + z * 2^sh (exact: (q - z) * 2^sh), times s / 2^sh: (q - z) * s rounded once, as the
            # scratch path rounds it; then the one cast to the compute dtype. Column k0 + 8j + i.
            w = ((f - (z * (1 << sh) + 8388608.0)) * (s * (1.0 / (1 << sh)))).to(dt)
            xt = tl.load(x_cols + (8 * col + i)[:, None], mask=x_ok, other=0.0)  # (WORDS, BM)
            acc = tl.dot(w, xt, acc)
    out = out_ptr + pid_k * stride_os + rm[None, :] * stride_om + (col0 + rn)[:, None]  # y[m, col0 + n]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


@triton.jit
def int4_kernel(x_ptr, out_ptr, w0, s0, z0, w1, s1, z1, w2, s2, z2, N0, N1, N2, M, K, stride_xm, stride_om,
                stride_os, iters, PARTS: tl.constexpr, GROUP: tl.constexpr, EVEN_K: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    nb0 = tl.cdiv(N0, BLOCK_N)
    if PARTS == 1:
        _int4_tile(x_ptr, w0, s0, z0, out_ptr, N0, 0, pid, M, K, stride_xm, stride_om, stride_os, iters,
                   GROUP, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
    elif pid < nb0:
        _int4_tile(x_ptr, w0, s0, z0, out_ptr, N0, 0, pid, M, K, stride_xm, stride_om, stride_os, iters,
                   GROUP, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        nb1 = tl.cdiv(N1, BLOCK_N)
        if PARTS == 2:
            _int4_tile(x_ptr, w1, s1, z1, out_ptr, N1, N0, pid - nb0, M, K, stride_xm, stride_om, stride_os,
                       iters, GROUP, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
        elif pid < nb0 + nb1:
            _int4_tile(x_ptr, w1, s1, z1, out_ptr, N1, N0, pid - nb0, M, K, stride_xm, stride_om, stride_os,
                       iters, GROUP, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
        else:
            _int4_tile(x_ptr, w2, s2, z2, out_ptr, N2, N0 + N1, pid - nb0 - nb1, M, K, stride_xm, stride_om,
                       stride_os, iters, GROUP, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _int8_tile(x_ptr, w_ptr, s_ptr, out_ptr, N, col0, pid_n, M, K, stride_xm, stride_om, stride_os, iters,
               FP8: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """One tile of a per-channel part: qweight (N, K) int8, or float8 e4m3 read as its bytes (FP8),
    and scales (N,): w = q * s."""
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    rm = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    rk = tl.arange(0, BLOCK_K)  # (BK,)
    n_ok, m_ok = rn < N, rm < M
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * K  # (BN, 1)
    x_cols = x_ptr + rm[None, :] * stride_xm  # (1, BM)
    dt = x_ptr.dtype.element_ty
    s = tl.load(s_ptr + rn, mask=n_ok, other=0).to(tl.float32)[:, None]  # (BN, 1)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    start = pid_k * iters
    for it in range(start, tl.minimum(start + iters, tl.cdiv(K, BLOCK_K))):
        kk = it * BLOCK_K + rk
        if EVEN_K:
            q = tl.load(w_rows + kk[None, :], mask=n_ok[:, None], other=0)  # (BN, BK)
            xt = tl.load(x_cols + kk[:, None], mask=m_ok[None, :], other=0.0)  # (BK, BM)
        else:
            k_ok = kk < K
            q = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
            xt = tl.load(x_cols + kk[:, None], mask=m_ok[None, :] & k_ok[:, None], other=0.0)
        if FP8:
            qf = q.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        else:  # 2^23 + (q + 128), then minus 2^23 + 128: q exactly
            qf = (q.to(tl.int32) + (MAGIC + 128)).to(tl.float32, bitcast=True) - 8388736.0
        acc = tl.dot((qf * s).to(dt), xt, acc)
    out = out_ptr + pid_k * stride_os + rm[None, :] * stride_om + (col0 + rn)[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


@triton.jit
def int8_kernel(x_ptr, out_ptr, w0, s0, w1, s1, w2, s2, N0, N1, N2, M, K, stride_xm, stride_om, stride_os,
                iters, PARTS: tl.constexpr, FP8: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    nb0 = tl.cdiv(N0, BLOCK_N)
    if PARTS == 1:
        _int8_tile(x_ptr, w0, s0, out_ptr, N0, 0, pid, M, K, stride_xm, stride_om, stride_os, iters,
                   FP8, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
    elif pid < nb0:
        _int8_tile(x_ptr, w0, s0, out_ptr, N0, 0, pid, M, K, stride_xm, stride_om, stride_os, iters,
                   FP8, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        nb1 = tl.cdiv(N1, BLOCK_N)
        if PARTS == 2:
            _int8_tile(x_ptr, w1, s1, out_ptr, N1, N0, pid - nb0, M, K, stride_xm, stride_om, stride_os, iters,
                       FP8, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
        elif pid < nb0 + nb1:
            _int8_tile(x_ptr, w1, s1, out_ptr, N1, N0, pid - nb0, M, K, stride_xm, stride_om, stride_os, iters,
                       FP8, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
        else:
            _int8_tile(x_ptr, w2, s2, out_ptr, N2, N0 + N1, pid - nb0 - nb1, M, K, stride_xm, stride_om,
                       stride_os, iters, FP8, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def sum_splits(p_ptr, y_ptr, numel, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """y = p[0] + p[1] + ... + p[SPLIT - 1], in that order, float32, then one cast: p (SPLIT, numel)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    acc = tl.load(p_ptr + offs, mask=ok, other=0.0)
    for i in tl.static_range(1, SPLIT):
        acc += tl.load(p_ptr + i * numel + offs, mask=ok, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)
