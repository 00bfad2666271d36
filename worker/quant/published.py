"""Published pre-quantized checkpoints, read as they are: AWQ int4 GEMM → the pack's int4 parts.

An AWQ checkpoint (`quantization_config.quant_method: awq`, `version: gemm`, `zero_point: true`)
stores each projection as `qweight` int32 (in, out / 8), `qzeros` int32 (in / group, out / 8) and
`scales` float16 (in / group, out), eight 4-bit values per int32 in AWQ's interleaved order
(nibble i holds column `AWQ_ORDER[i]` of its 8), and means w[o, i] = (q - z) * s. That is the int4
format of `worker.quant.formats` up to layout, so packing it moves the same values into the pack's
layout (transposed, two values per byte) and keeps the float16 scales as they are: nothing is
re-quantized and the pack dequantizes to exactly what AWQ's own dequantization gives. `bench run
--checkpoints AWQ_DIR` packs it so without being asked; its pack is `int4` with the checkpoint's
group size.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from worker.errors import UserError
from worker.quant.formats import WeightSpec

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an int32 holds column AWQ_ORDER[i] of its 8
AWQ_PARTS = ("qweight", "qzeros", "scales")
ST_SIZES = {"I32": 4, "float16": 2, "bfloat16": 2, "float32": 4}


@dataclass(frozen=True)
class Published:
    """A checkpoint's own quantization, as its config.json's `quantization_config` says."""

    method: str  # "awq"
    group_size: int

    @property
    def weights(self) -> WeightSpec:
        return WeightSpec("int4", self.group_size, quantize_head=False)


def detect(checkpoint_dir: str | Path) -> Published | None:
    """The checkpoint's published quantization, or None; anything this engine cannot read exactly is
    refused in one line naming the setting (config.json was validated by ModelConfig before)."""
    cfg_file = Path(checkpoint_dir) / "config.json"
    q = json.loads(cfg_file.read_text()).get("quantization_config")
    if q is None:
        return None
    where = f"{cfg_file}: quantization_config"
    method = q.get("quant_method")
    if method != "awq":
        raise UserError(f"{where}.quant_method {method!r} is not supported (supported: 'awq'); use the "
                        "unquantized checkpoint and pack it with --weight-format int8 or int4")
    bits, group = q.get("bits", q.get("w_bit")), q.get("group_size", q.get("q_group_size"))
    version = str(q.get("version", "gemm")).lower()
    if bits != 4 or version != "gemm" or q.get("zero_point", True) is not True:
        raise UserError(f"{where}: AWQ bits={bits}, version={version!r}, zero_point={q.get('zero_point')} is not "
                        "supported; only 4-bit GEMM with zero points (the AutoAWQ default) is read")
    if not isinstance(group, int) or group < 2 or group % 2:
        raise UserError(f"{where}.group_size {group!r} must be an even number >= 2 (-1, one group per row, "
                        "is not supported)")
    return Published("awq", group)


def resolve(published: Published | None, weights: WeightSpec, where: str) -> WeightSpec:
    """The format a checkpoint packs as: its own when it is pre-quantized (the default native means
    "as the checkpoint is"); asking for another is refused, since its dense weights are not there."""
    if published is None:
        return weights
    own = published.weights
    if weights.native or weights == own:
        return own
    raise UserError(f"{where} is an AWQ int4 checkpoint (group {own.group_size}); it packs only as it is "
                    f"(--weight-format int4 --quant-group-size {own.group_size}, or leave --weight-format out), "
                    f"not as {weights.format}" + (" with a quantized head" if weights.quantize_head else ""))


def source_names(hf_name: str) -> dict[str, str]:
    """`...q_proj.weight` → the checkpoint names of its AWQ tensors."""
    base = hf_name.removesuffix(".weight")
    return {p: f"{base}.{p}" for p in AWQ_PARTS}


def check_source(index: dict, hf_name: str, dense: tuple[int, int], group: int) -> str | None:
    """Why the checkpoint's AWQ tensors of `hf_name` cannot be the (out, in) weight `dense`, or None."""
    out, inn = dense
    if inn % group or out % 8:
        return f"{hf_name}: AWQ group {group} must divide the input dimension {inn} and 8 the output {out}"
    want = {"qweight": ((inn, out // 8), "I32"), "qzeros": ((inn // group, out // 8), "I32"),
            "scales": ((inn // group, out), "float16")}
    for part, name in source_names(hf_name).items():
        src = index.get(name)
        if src is None:
            return f"tensor {name} is missing"
        shape, dtype = want[part]
        if src.shape != shape or src.dtype != dtype:
            return (f"tensor {name} is {list(src.shape)} {src.dtype}, but a {list(dense)} weight needs "
                    f"{list(shape)} {dtype}")
        if src.nbytes != math.prod(shape) * ST_SIZES[dtype]:
            return f"tensor {name} spans {src.nbytes} bytes, not {list(shape)} × {dtype} (truncated)"
    return None


def to_int4(qweight, qzeros, scales) -> dict:
    """AWQ tensors → the pack's int4 parts: qweight uint8 (out, in/2), scales float16 (out, G), zeros uint8 (out, G)."""
    import torch

    from worker.quant.quantize import pack_nibbles

    q = _unpack(qweight).t().contiguous()  # (out, in)
    z = _unpack(qzeros).t().contiguous()  # (out, G)
    return {"qweight": pack_nibbles(q), "scales": scales.t().contiguous(), "zeros": z.to(torch.uint8)}


def _unpack(packed):
    """int32 (R, C/8) in AWQ order → uint8 values (R, C) in column order."""
    import torch

    shifts = torch.arange(0, 32, 4, dtype=torch.int32)  # (8,)
    nib = (packed[:, :, None] >> shifts) & 15  # (R, C/8, 8): nibble i = column AWQ_ORDER[i]
    cols = torch.empty_like(nib)
    cols[:, :, list(AWQ_ORDER)] = nib
    return cols.reshape(packed.shape[0], -1).to(torch.uint8)
