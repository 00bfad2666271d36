"""x @ W^T for every projection, whatever its weight's format: the one place that picks the kernel.

A native weight is a dense matmul. A quantized one (`worker.quant.dequant.Packed`) runs the fused
dequantize-matmul (`worker.quant.fused`) where `fused.applies` (decode-sized rows of x on CUDA, in
bfloat16 or float16), and otherwise is dequantized to a dense scratch weight of x's dtype right
before a dense matmul. The choice reads only shapes, dtypes and the device, so every mode runs the
same kernels on the same shapes and modes stay bit-identical. `linear` runs inside the layer's
compiled functions: the scratch dequantization compiles with the layer's other code (Inductor fuses
the unpacking, scaling and concatenation into one kernel per weight), the fused kernels are opaque
custom ops to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.quant import fused
from worker.quant.dequant import DENSE, Weight


def linear(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """x (..., in) @ w^T → (..., out); w dense (out, in) or the parts of a quantized (out, in)."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w)
    if fused.applies(w, x):
        return fused.linear(x, w)
    return F.linear(x, DENSE[w.fmt](w.parts, x.dtype))
