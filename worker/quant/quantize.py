"""Dense weight → the parts of a quantized format, on the CPU, row block by row block.

Every row (output channel) is quantized from its own values only, so a tensor can be quantized in
blocks of rows and give the same bytes as all at once: that is how the packer bounds its memory.
The error bound each format promises, |w - dequant(q)| <= s / 2 per channel (int8) or per group
(int4), holds by construction: int8's scale is the row's max |w| / 127, and int4's range always
contains 0 (so the zero point is a whole level in 0..15) and its bfloat16 scale is rounded up,
never down, so the group's range fits in 15 levels of the stored scale.
"""

from __future__ import annotations

import torch

from worker.quant.formats import INT4_LEVELS

ROWS_PER_BLOCK_BYTES = 256 << 20  # float32 bytes of one block of rows being quantized


def quantize(fmt: str, w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """w (out, in), any float dtype → part suffix → tensor (formats.parts' shapes and dtypes)."""
    rows = max(1, ROWS_PER_BLOCK_BYTES // (4 * w.shape[1]))
    fn = {"int8": _int8, "fp8": _fp8, "int4": lambda x: _int4(x, group_size)}[fmt]
    blocks = [fn(w[r:r + rows].float()) for r in range(0, w.shape[0], rows)]
    return {k: torch.cat([b[k] for b in blocks]) for k in blocks[0]}


def _int8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric per output channel: w (R, in) float32 → qweight int8 (R, in), scales float32 (R,)."""
    s = w.abs().amax(dim=1) / 127  # (R,)
    s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row: any scale gives q = 0
    q = torch.round(w / s[:, None]).clamp_(-127, 127).to(torch.int8)  # (R, in)
    return {"qweight": q, "scales": s}


def _fp8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """float8 e4m3 per output channel: w (R, in) float32 → qweight float8_e4m3fn (R, in), scales float32 (R,).
    The row's max |w| maps to the largest finite e4m3 value, so nothing saturates."""
    s = w.abs().amax(dim=1) / torch.finfo(torch.float8_e4m3fn).max  # (R,)
    s = torch.where(s > 0, s, torch.ones_like(s))
    return {"qweight": (w / s[:, None]).to(torch.float8_e4m3fn), "scales": s}


def _int4(w: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """Asymmetric per group of `group` inputs: w (R, in) float32 → qweight uint8 (R, in / 2) of nibbles,
    scales bfloat16 (R, in / group), zeros uint8 (R, in / group)."""
    r, inn = w.shape
    g = w.reshape(r, inn // group, group)  # (R, G, group)
    lo = g.amin(dim=-1).clamp(max=0)  # (R, G): the range holds 0
    hi = g.amax(dim=-1).clamp(min=0)
    s = round_up_bf16((hi - lo) / INT4_LEVELS)  # (R, G) bfloat16, >= the exact scale
    s = torch.where(s > 0, s, torch.ones_like(s))
    s32 = s.float()
    z = torch.round(-lo / s32).clamp_(0, INT4_LEVELS)  # (R, G)
    q = (torch.round(g / s32[..., None]) + z[..., None]).clamp_(0, INT4_LEVELS).to(torch.uint8)
    return {"qweight": pack_nibbles(q.reshape(r, inn)), "scales": s, "zeros": z.to(torch.uint8)}


def round_up_bf16(x: torch.Tensor) -> torch.Tensor:
    """float32 (>= 0) → the smallest bfloat16 not below it (plain rounding may round down)."""
    b = x.to(torch.bfloat16)
    low = b.float() < x
    bumped = (b.view(torch.int16) + 1).view(torch.bfloat16)  # next representable up, for x >= 0
    return torch.where(low, bumped, b)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(R, in) uint8 values 0..15 → (R, in / 2) bytes: even column in the low nibble, odd in the high."""
    return q[:, 0::2] | (q[:, 1::2] << 4)
