"""What a checkpoint holds, read from its safetensors headers alone (no tensor data).

Safetensors only: a checkpoint is read as `*.safetensors` shards (listed by
`model.safetensors.index.json` when there is one), never as a pickle. The packer preads tensors at
the offsets found here, and the accelerate peer sizes its device map from the same index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from worker.errors import UserError

ST_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


@dataclass(frozen=True)
class SourceTensor:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # ST_DTYPES value, or the raw safetensors name when unsupported
    offset: int  # of the tensor's bytes in the file
    nbytes: int


def read_index(checkpoint_dir: str | Path) -> dict[str, SourceTensor]:
    """HF name → file, shape, dtype, from the safetensors headers only (no tensor data is read)."""
    root = Path(checkpoint_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise UserError(f"{index} is not a valid safetensors index ({e})") from None
        files = [root / n for n in names]
        for f in files:
            if not f.is_file():
                raise UserError(f"{index} names shard {f.name}, which is missing from {root}")
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        raise UserError(f"checkpoint {root} has no *.safetensors files")
    out: dict[str, SourceTensor] = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as st:  # validates the header
                spans = _data_spans(f)
                for name in st.keys():
                    sl = st.get_slice(name)
                    dtype = ST_DTYPES.get(sl.get_dtype(), sl.get_dtype())
                    out[name] = SourceTensor(f, tuple(sl.get_shape()), dtype, *spans[name])
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise UserError(f"{f} is not a readable safetensors file ({e})") from None
    return out


def _data_spans(file: Path) -> dict[str, tuple[int, int]]:
    """Name → (file offset, nbytes) of each tensor: the packer preads them, no mmap, no copies.

    The format: u64 little-endian header length, JSON header with `data_offsets` relative to its end.
    """
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: (8 + n + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
            for k, v in header.items() if k != "__metadata__"}
