"""Quantized parts → what a projection's matmul multiplies by, the same function in every mode.

The weight source hands the compute a group as it sits in its slot: a quantized projection is its
parts (`q_proj.qweight`, `q_proj.scales`, ...), so only the small bytes crossed the SSD and PCIe.
`joined` gives the layer the weight of projections that share an input (q|k|v, gate|up) as one:
the zero-copy fused view of a packed native group, native tensors concatenated, or the parts of
quantized ones as a `Packed` weight, which `worker.quant.matmul.linear` multiplies by (fused with
its dequantization, or after dequantizing to a dense scratch weight). Dequantization (`DENSE`) is
elementwise (an exact integer difference, one float32 product, one cast), so it is the same
function on every device and in every mode: modes stay bit-identical, `bench dequantize`
(`worker.quant.export`) writes exactly these values for HF to run on, and the fused kernels
dequantize each element the same way in registers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

Group = dict[str, torch.Tensor]


def dense_int8(parts: tuple[tuple[torch.Tensor, torch.Tensor], ...], dtype: torch.dtype) -> torch.Tensor:
    """((qweight int8 (o, in), scales float32 (o,)), ...) → the weights stacked by rows (Σo, in), dtype."""
    return torch.cat([(q.to(torch.float32) * s.to(torch.float32)[:, None]).to(dtype) for q, s in parts])


def dense_fp8(parts: tuple[tuple[torch.Tensor, torch.Tensor], ...], dtype: torch.dtype) -> torch.Tensor:
    """((qweight float8_e4m3fn (o, in), scales (o,)), ...) → (Σo, in), dtype (the same product as int8)."""
    return torch.cat([(q.to(torch.float32) * s.to(torch.float32)[:, None]).to(dtype) for q, s in parts])


def dense_int4(parts: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...],
               dtype: torch.dtype) -> torch.Tensor:
    """((qweight uint8 (o, in/2), scales bf16 (o, G), zeros uint8 (o, G)), ...) → (Σo, in), dtype."""
    out = []
    for p, s, z in parts:
        o, ng = s.shape
        q = torch.stack((p & 15, p >> 4), dim=-1).reshape(o, ng, -1)  # (o, G, group): low nibble first
        w = (q.to(torch.float32) - z.to(torch.float32)[..., None]) * s.to(torch.float32)[..., None]
        out.append(w.reshape(o, -1).to(dtype))
    return torch.cat(out)


DENSE = {"int8": dense_int8, "int4": dense_int4, "fp8": dense_fp8}
SUFFIXES = {"int8": ("qweight", "scales"), "fp8": ("qweight", "scales"), "int4": ("qweight", "scales", "zeros")}


class Packed(NamedTuple):
    """A quantized weight as its parts, one tuple per projection stacked by rows (int4: qweight,
    scales, zeros; int8 and fp8: qweight, scales): `DENSE[fmt](parts, dtype)` is its dense weight."""

    fmt: str
    parts: tuple[tuple[torch.Tensor, ...], ...]


Weight = torch.Tensor | Packed  # what a projection's matmul multiplies by (worker.quant.matmul)


def format_of(g: Group, name: str) -> str:
    """How the group holds `name`: native (a dense tensor), int8, fp8 or int4 (its parts)."""
    if name in g:
        return "native"
    if f"{name}.zeros" in g:
        return "int4"
    if f"{name}.scales" in g:
        return "fp8" if g[f"{name}.qweight"].dtype == torch.float8_e4m3fn else "int8"
    raise KeyError(name)


def has(g: Group, name: str) -> bool:
    return name in g or f"{name}.qweight" in g


def weight(g: Group, name: str) -> Weight:
    """One projection's weight (out, in): the tensor itself when native."""
    return joined(g, name, (name,))


def joined(g: Group, fused_name: str, names: tuple[str, ...]) -> Weight:
    """Projections sharing an input as one weight stacked by rows: the zero-copy fused view of a packed
    native group, a concatenation of native tensors (groups built from separate tensors), or their
    parts."""
    if fused_name in g:
        return g[fused_name]
    fmts = {format_of(g, n) for n in names}
    if fmts == {"native"}:
        return g[names[0]] if len(names) == 1 else torch.cat([g[n] for n in names])
    if len(fmts) != 1:
        raise AssertionError(f"{names} mix formats {sorted(fmts)} in one group")
    fmt = fmts.pop()
    return Packed(fmt, tuple(tuple(g[f"{n}.{s}"] for s in SUFFIXES[fmt]) for n in names))
