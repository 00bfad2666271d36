"""Published pre-quantized checkpoints, read as they are: AWQ int4 GEMM → the pack's int4 parts.

An AWQ checkpoint (`quantization_config.quant_method: awq`, `version: gemm`, `zero_point: true`)
stores each projection as `qweight` int32 (in, out / 8), `qzeros` int32 (in / group, out / 8) and
`scales` float16 (in / group, out), eight 4-bit values per int32 in AWQ's interleaved order
(nibble i holds column `AWQ_ORDER[i]` of its 8), and means w[o, i] = (q - z) * s. That is the int4
format of `worker.quant.formats` up to layout, so packing it moves the same values into the pack's
layout (transposed, two values per byte) and keeps the float16 scales as they are: nothing is
re-quantized and the pack dequantizes to exactly what AWQ's own dequantization gives. 
A compressed-tensors W4A16 checkpoint (`quant_method: compressed-tensors`, `format:
pack-quantized`, int4 weights in groups) stores `weight_packed` int32 (out, in / 8) with value i at
bits 4i..4i+3, offset by +8 (q + 8 in 0..15), `weight_scale` (out, in / group) and, when
asymmetric, `weight_zero_point` int32 (out / 8, in / group) packed the same way along the output
dimension; w = (q - zp) * s = ((q + 8) - (zp + 8)) * s. Its packed bytes are the pack's qweight
bytes as they are (little-endian: the low nibble is the even column), and zp + 8 is the pack's zero
point (8 when symmetric). compressed-tensors W8A16 (`int-quantized`, int8 per
channel) and FP8 weights (`float-quantized`, float8 e4m3 per channel or per tensor) store `weight`
in int8 / float8_e4m3fn (out, in) and `weight_scale`, w = q * s: the pack's `int8` and `fp8` formats
as they are. Schemes that also quantize activations (W8A8, FP8_DYNAMIC), or that this engine cannot
reproduce exactly, are refused in one line.

`bench run --checkpoints DIR` packs any of them without being asked; the pack is the checkpoint's
format (int4 with its group size), with its scales in their own dtype.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from worker.errors import UserError
from worker.quant.formats import WeightSpec

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an int32 holds column AWQ_ORDER[i] of its 8
AWQ_PARTS = ("qweight", "qzeros", "scales")
ST_SIZES = {"I32": 4, "I8": 1, "F8_E4M3": 1, "float16": 2, "bfloat16": 2, "float32": 4}
CT_SCHEMES = {  # compressed-tensors format → (num_bits, type, strategies, our format, stored weight dtype)
    "pack-quantized": (4, "int", ("group",), "int4", "I32"),
    "int-quantized": (8, "int", ("channel",), "int8", "I8"),
    "float-quantized": (8, "float", ("channel", "tensor"), "fp8", "F8_E4M3"),
}


SCALE_DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class Published:
    """A checkpoint's own quantization, as its config.json's `quantization_config` says."""

    method: str  # "awq" or "compressed-tensors"
    group_size: int  # int4's; 128 (unused) for the per-channel formats
    symmetric: bool = False  # compressed-tensors without zero points
    format: str = "int4"  # the pack format it is read as

    @property
    def weights(self) -> WeightSpec:
        return WeightSpec(self.format, self.group_size, quantize_head=False)


def detect(checkpoint_dir: str | Path) -> Published | None:
    """The checkpoint's published quantization, or None; anything this engine cannot read exactly is
    refused in one line naming the setting (config.json was validated by ModelConfig before)."""
    cfg_file = Path(checkpoint_dir) / "config.json"
    q = json.loads(cfg_file.read_text()).get("quantization_config")
    if q is None:
        return None
    where = f"{cfg_file}: quantization_config"
    method = q.get("quant_method")
    if method == "compressed-tensors":
        return _detect_ct(q, where)
    if method != "awq":
        raise UserError(f"{where}.quant_method {method!r} is not supported (supported: 'awq', "
                        "'compressed-tensors'); use the unquantized checkpoint and pack it with --weight-format "
                        "int8 or int4")
    bits, group = q.get("bits", q.get("w_bit")), q.get("group_size", q.get("q_group_size"))
    version = str(q.get("version", "gemm")).lower()
    if bits != 4 or version != "gemm" or q.get("zero_point", True) is not True:
        raise UserError(f"{where}: AWQ bits={bits}, version={version!r}, zero_point={q.get('zero_point')} is not "
                        "supported; only 4-bit GEMM with zero points (the AutoAWQ default) is read")
    if not isinstance(group, int) or group < 2 or group % 2:
        raise UserError(f"{where}.group_size {group!r} must be an even number >= 2 (-1, one group per row, "
                        "is not supported)")
    return Published("awq", group)


def _detect_ct(q: dict, where: str) -> Published:
    """compressed-tensors: weight-only schemes of CT_SCHEMES (no activation quantization)."""
    groups = list((q.get("config_groups") or {}).values())
    fmt = q.get("format") or (groups[0].get("format") if groups else None)
    weights = [g.get("weights") or {} for g in groups]
    w = weights[0] if weights else {}
    shape = (f"format {fmt!r}, weights num_bits={w.get('num_bits')} type={w.get('type')!r} "
             f"strategy={w.get('strategy')!r}")
    bits, kind, strategies, ours, _ = CT_SCHEMES.get(fmt, (None, None, (), None, None))
    ok = (ours is not None and len({json.dumps(x, sort_keys=True) for x in weights}) == 1
          and w.get("num_bits") == bits and w.get("type") == kind and w.get("strategy") in strategies
          and not w.get("dynamic") and (ours == "int4" or w.get("symmetric", True)))
    if not ok:
        raise UserError(f"{where}: compressed-tensors {shape} is not supported; read are weight-only W4A16 "
                        "(pack-quantized, int4 in groups), W8A16 (int-quantized, int8 per channel, symmetric) and "
                        "FP8 weights (float-quantized, per channel or tensor): use the unquantized checkpoint and "
                        "--weight-format int8, int4 or fp8")
    if any(g.get("input_activations") for g in groups):
        raise UserError(f"{where}: compressed-tensors {shape} also quantizes activations (input_activations), "
                        "which this engine does not reproduce; only weight-only checkpoints are read")
    ignored = " ".join(map(str, q.get("ignore") or []))
    if "lm_head" not in ignored:
        raise UserError(f"{where}: compressed-tensors quantizes lm_head too (it is not in `ignore`); only "
                        "checkpoints that keep lm_head unquantized are read")
    if ours != "int4":
        return Published("compressed-tensors", 128, True, ours)
    group = w.get("group_size")
    if not isinstance(group, int) or group < 2 or group % 2:
        raise UserError(f"{where}: compressed-tensors group_size {group!r} must be an even number >= 2")
    return Published("compressed-tensors", group, bool(w.get("symmetric", True)))


def resolve(published: Published | None, weights: WeightSpec, where: str) -> WeightSpec:
    """The format a checkpoint packs as: its own when it is pre-quantized (the default native means
    "as the checkpoint is"); asking for another is refused, since its dense weights are not there."""
    if published is None:
        return weights
    own = published.weights
    same = weights.format == own.format and not weights.quantize_head and (
        own.format != "int4" or weights.group_size == own.group_size)
    if weights.native or same:
        return own
    asked = f"--weight-format {own.format}" + (f" --quant-group-size {own.group_size}" if own.format == "int4" else "")
    what = own.format + (f" (group {own.group_size})" if own.format == "int4" else "")
    raise UserError(f"{where} holds {published.method} {what} weights; it packs only as it is ({asked}, or "
                    f"leave --weight-format out), not as {weights.format}"
                    + (" with a quantized head" if weights.quantize_head else ""))


def source_names(published: Published, hf_name: str) -> dict[str, str]:
    """`...q_proj.weight` → part → the checkpoint names of its quantized tensors."""
    base = hf_name.removesuffix(".weight")
    if published.method == "awq":
        return {p: f"{base}.{p}" for p in AWQ_PARTS}
    if published.format != "int4":
        return {"qweight": hf_name, "scales": f"{base}.weight_scale"}
    parts = {"qweight": f"{base}.weight_packed", "scales": f"{base}.weight_scale"}
    return parts if published.symmetric else {**parts, "zeros": f"{base}.weight_zero_point"}


def scale_dtype(published: Published, index: dict, hf_name: str) -> str:
    """The dtype the checkpoint stores this weight's scales in (the pack keeps it)."""
    return index[source_names(published, hf_name)["scales"]].dtype


def check_source(published: Published, index: dict, hf_name: str, dense: tuple[int, int]) -> str | None:
    """Why the checkpoint's quantized tensors of `hf_name` cannot be the (out, in) weight `dense`, or None."""
    out, inn, group = *dense, published.group_size
    if published.format != "int4":
        return _check_per_channel(published, index, hf_name, dense)
    if inn % group or out % 8 or inn % 8:
        return f"{hf_name}: group {group} must divide the input dimension {inn}, and 8 both dimensions"
    names = source_names(published, hf_name)
    scale = index.get(names["scales"])
    sdt = scale.dtype if scale is not None and scale.dtype in SCALE_DTYPES else "float16|bfloat16|float32"
    if published.method == "awq":
        want = {"qweight": ((inn, out // 8), "I32"), "qzeros": ((inn // group, out // 8), "I32"),
                "scales": ((inn // group, out), "float16")}
    else:
        want = {"qweight": ((out, inn // 8), "I32"), "scales": ((out, inn // group), sdt),
                "zeros": ((out // 8, inn // group), "I32")}
    for part, name in names.items():
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


def _check_per_channel(published: Published, index: dict, hf_name: str, dense: tuple[int, int]) -> str | None:
    """compressed-tensors int8 / fp8: `weight` (out, in) and `weight_scale` (out, 1) or one per tensor."""
    names = source_names(published, hf_name)
    stored = {"int8": "I8", "fp8": "F8_E4M3"}[published.format]
    w, s = index.get(names["qweight"]), index.get(names["scales"])
    for name, src in names.items():
        if index.get(src) is None:
            return f"tensor {src} is missing"
    if w.shape != dense or w.dtype != stored or w.nbytes != math.prod(dense):
        return f"tensor {names['qweight']} is {list(w.shape)} {w.dtype}, but a {list(dense)} weight needs {stored}"
    if s.shape not in ((dense[0], 1), (dense[0],), (1,), ()) or s.dtype not in SCALE_DTYPES:
        return (f"tensor {names['scales']} is {list(s.shape)} {s.dtype}, but per-channel scales are "
                f"[{dense[0]}, 1] (or one per tensor) in {' / '.join(SCALE_DTYPES)}")
    if s.nbytes != math.prod(s.shape) * ST_SIZES[s.dtype]:
        return f"tensor {names['scales']} spans {s.nbytes} bytes, not {list(s.shape)} × {s.dtype} (truncated)"
    return None


def to_parts(published: Published, t: dict) -> dict:
    """The checkpoint's tensors (part → tensor) → the pack's parts of its format: int4 qweight uint8
    (out, in/2), scales (out, G) in their own dtype, zeros uint8 (out, G); int8 / fp8 qweight (out, in)
    as stored, scales (out,)."""
    import torch

    from worker.quant.quantize import pack_nibbles

    if published.format != "int4":
        out = t["qweight"].shape[0]
        return {"qweight": t["qweight"], "scales": t["scales"].reshape(-1).expand(out).contiguous()}

    if published.method == "awq":
        q = _unpack_awq(t["qweight"]).t().contiguous()  # (out, in)
        z = _unpack_awq(t["qzeros"]).t().contiguous()  # (out, G)
        return {"qweight": pack_nibbles(q), "scales": t["scales"].t().contiguous(), "zeros": z}
    if sys.byteorder != "little":
        raise UserError("compressed-tensors packs values into little-endian int32: this host is big-endian")
    qweight = t["qweight"].contiguous().view(torch.uint8)  # (out, in/2): value 2j low nibble, 2j+1 high
    s = t["scales"]
    if published.symmetric:
        z = torch.full(s.shape, 8, dtype=torch.uint8)
    else:
        zt = t["zeros"].t().contiguous().view(torch.uint8)  # (G, out/2) nibble pairs along the output
        z = torch.stack((zt & 15, zt >> 4), dim=-1).reshape(zt.shape[0], -1).t().contiguous()  # (out, G): zp + 8
    return {"qweight": qweight, "scales": s.contiguous(), "zeros": z}


def _unpack_awq(packed):
    """int32 (R, C/8) in AWQ order → uint8 values (R, C) in column order."""
    import torch

    shifts = torch.arange(0, 32, 4, dtype=torch.int32)  # (8,)
    nib = (packed[:, :, None] >> shifts) & 15  # (R, C/8, 8): nibble i = column AWQ_ORDER[i]
    cols = torch.empty_like(nib)
    cols[:, :, list(AWQ_ORDER)] = nib
    return cols.reshape(packed.shape[0], -1).to(torch.uint8)
