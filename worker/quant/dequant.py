"""Quantized parts → dense weights, inside the layer's compute, the same function in every mode.

The weight source hands the compute a group as it sits in its slot: a quantized projection is its
parts (`q_proj.qweight`, `q_proj.scales`, ...), so only the small bytes crossed the SSD and PCIe.
Just before a projection's matmul, its parts are turned into a dense weight of the compute dtype
(a scratch tensor the allocator reuses), and projections that share an input (q|k|v, gate|up) are
turned into one concatenated weight, as packed native groups give one fused view. Dequantization is
elementwise (an exact integer difference, one float32 product, one cast), so it is the same
function on every device and in every mode: modes stay bit-identical, and `bench dequantize`
(`worker.quant.export`) writes exactly these values for HF to run on. Compiled runs compile these
functions with the layer's other code (Inductor fuses the unpacking, scaling and concatenation
into one kernel per weight).
"""

from __future__ import annotations

from collections.abc import Callable

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


def format_of(g: Group, name: str) -> str:
    """How the group holds `name`: native (a dense tensor), int8 or int4 (its parts)."""
    if name in g:
        return "native"
    if f"{name}.zeros" in g:
        return "int4"
    if f"{name}.scales" in g:
        return "fp8" if g[f"{name}.qweight"].dtype == torch.float8_e4m3fn else "int8"
    raise KeyError(name)


def has(g: Group, name: str) -> bool:
    return name in g or f"{name}.qweight" in g


class Dequantizer:
    """Dense weights of a group for the compute; `wrap` is the model's compile wrapper (or identity)."""

    def __init__(self, wrap: Callable = lambda f: f):
        self._fns = {"int8": wrap(dense_int8), "int4": wrap(dense_int4), "fp8": wrap(dense_fp8)}

    def weight(self, g: Group, name: str, dtype: torch.dtype) -> torch.Tensor:
        """One projection's dense weight (out, in): the tensor itself when native."""
        return self.joined(g, name, (name,), dtype)

    def joined(self, g: Group, fused_name: str, names: tuple[str, ...], dtype: torch.dtype) -> torch.Tensor:
        """Projections sharing an input as one weight stacked by rows: the zero-copy fused view of a packed
        native group, a concatenation of native tensors (groups built from separate tensors), or the
        dequantization of their parts."""
        if fused_name in g:
            return g[fused_name]
        fmts = {format_of(g, n) for n in names}
        if fmts == {"native"}:
            return g[names[0]] if len(names) == 1 else torch.cat([g[n] for n in names])
        if len(fmts) != 1:
            raise AssertionError(f"{names} mix formats {sorted(fmts)} in one group")
        fmt = fmts.pop()
        suffixes = ("qweight", "scales", "zeros") if fmt == "int4" else ("qweight", "scales")
        return self._fns[fmt](tuple(tuple(g[f"{n}.{s}"] for s in suffixes) for n in names), dtype)
