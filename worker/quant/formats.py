"""The weight formats a pack can hold, and the parts a quantized tensor is stored as.

`native` stores every tensor in the compute dtype (what packs always did). `int8` is symmetric per
output channel: `qweight` int8 (out, in) and `scales` float32 (out,), w = q * s. `int4` is
asymmetric in groups of `group_size` along the input dimension, two values per byte (low nibble =
even column): `qweight` uint8 (out, in / 2), `scales` bfloat16 and `zeros` uint8 (out, in / group),
w = (q - z) * s. `fp8` is float8 e4m3 per output channel: `qweight` float8_e4m3fn (out, in) and
`scales` float32 (out,), w = q * s (max |w| of the row maps to 448). Only the seven projections
of each layer are quantized; norms and the embedding table stay native, and so does lm_head unless `quantize_head` asks for it (with tied embeddings the
head is the embedding table, which a gather reads, so it stays native).

Kept free of torch and of `worker.pack` so the manifest can validate against it without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from worker.errors import UserError

WeightFormat = Literal["native", "int8", "int4", "fp8"]
FORMATS: tuple[str, ...] = ("native", "int8", "int4", "fp8")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PART_DTYPE_SIZES = {"int8": 1, "uint8": 1, "float8_e4m3fn": 1}  # beside the float dtypes of worker.pack.manifest
INT4_LEVELS = 15  # a nibble holds 0..15
DEFAULT_SCALES = {"int8": "float32", "int4": "bfloat16", "fp8": "float32"}  # as quantized here


@dataclass(frozen=True)
class WeightSpec:
    """What a pack's weights are stored as: the format, int4's group size, whether lm_head is quantized."""

    format: str = "native"
    group_size: int = 128  # int4 only
    quantize_head: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise UserError(f"weight_format {self.format!r} is unknown; choose one of {', '.join(FORMATS)}")
        if self.group_size < 2 or self.group_size % 2:
            raise UserError(f"quant_group_size must be an even number >= 2 (two int4 values share a byte; "
                            f"got {self.group_size})")

    @property
    def native(self) -> bool:
        return self.format == "native"

    @property
    def key(self) -> str:
        """The part of a pack's file name that keeps packs of different formats apart in one cache."""
        if self.native:
            return ""
        base = self.format + (f"-g{self.group_size}" if self.format == "int4" else "")
        return base + ("-head" if self.quantize_head else "")

    def quantizes(self, short: str, tied: bool = False) -> bool:
        """Whether the tensor of this short name (groups.group_tensors) is stored quantized."""
        if self.native:
            return False
        return short in PROJECTIONS or (short == "lm_head" and self.quantize_head and not tied)

    def to_dict(self) -> dict:
        return {"format": self.format, "group_size": self.group_size if self.format == "int4" else None,
                "quantize_head": self.quantize_head}


def parts(fmt: str, shape: tuple[int, ...], group_size: int, scale_dtype: str | None = None
          ) -> dict[str, tuple[tuple[int, ...], str]]:
    """Part suffix → (shape, dtype) of a quantized (out, in) weight, in pack order. int4 scales are
    bfloat16 when quantized here, the checkpoint's own dtype when read from a published one
    (worker.quant.published)."""
    out, inn = shape
    scale_dtype = scale_dtype or DEFAULT_SCALES[fmt]
    if fmt in ("int8", "fp8"):
        return {"qweight": ((out, inn), "int8" if fmt == "int8" else "float8_e4m3fn"), "scales": ((out,), scale_dtype)}
    if fmt == "int4":
        ng = inn // group_size
        return {"qweight": ((out, inn // 2), "uint8"), "scales": ((out, ng), scale_dtype),
                "zeros": ((out, ng), "uint8")}
    raise ValueError(f"no parts for format {fmt!r}")


def check_divides(spec: WeightSpec, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """int4 groups must tile every quantized row exactly: name the first tensor they do not."""
    if spec.format != "int4":
        return
    for short, shape in shapes.items():
        if spec.quantizes(short) and shape[1] % spec.group_size:
            raise UserError(f"{where}: quant_group_size {spec.group_size} does not divide the input dimension "
                            f"{shape[1]} of {short}; choose a group size that divides it (e.g. "
                            f"{_divisor_hint(shapes, spec)}) or use --weight-format int8")


def _divisor_hint(shapes: dict[str, tuple[int, ...]], spec: WeightSpec) -> int:
    dims = [s[1] for k, s in shapes.items() if spec.quantizes(k)]
    for g in (128, 64, 32, 16, 8, 4, 2):
        if all(d % g == 0 for d in dims):
            return g
    return 2


def part_name(hf_name: str, suffix: str) -> str:
    """`model.layers.0.self_attn.q_proj.weight` → `model.layers.0.self_attn.q_proj.qweight`."""
    return hf_name.removesuffix(".weight") + "." + suffix


def split_short(short: str) -> tuple[str, str | None]:
    """`q_proj.qweight` → ("q_proj", "qweight"); a native short name → (name, None)."""
    base, _, suffix = short.partition(".")
    return base, suffix or None


def check_parts(fmt: str, base: str, got: dict[str, tuple[tuple[int, ...], str]], dense: tuple[int, ...],
                group_size: int) -> str | None:
    """Why a quantized tensor's recorded parts do not match its format (a truncated or edited pack), or None."""
    scale = got.get("scales", (None, "bfloat16"))[1]
    want = parts(fmt, dense, group_size, scale if scale in ("bfloat16", "float16", "float32") else None)
    if set(got) != set(want):
        return f"{base} ({fmt}) has parts {sorted(got)}, expected {sorted(want)}"
    for suffix, (shape, dtype) in want.items():
        if got[suffix] != (shape, dtype):
            return (f"{base}.{suffix} ({fmt}) is {list(got[suffix][0])} {got[suffix][1]}, but a {list(dense)} "
                    f"weight needs {list(shape)} {dtype}")
    return None
