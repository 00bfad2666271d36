"""The packer's source of quantized bytes: each checkpoint tensor read and quantized once, handed
out window by window.

The packer fills a group's extent window by window on several threads, and a window may hold any
byte range of a part (`q_proj.qweight`, `q_proj.scales`, ...). A part's bytes depend on whole rows
of its dense weight, so the first window that needs any part of a weight reads that weight, quantizes
it (`worker.quant.quantize`, in blocks of rows) and keeps all its parts; later windows copy from
them, and the parts are dropped once every byte of them was handed out. At most the weights of the
windows in flight are held (a 70B down_proj's int8 parts are 235 MB), never the checkpoint. A
published checkpoint's parts come from its own quantized tensors (worker.quant.published), moved
into the pack's layout without re-quantizing.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from worker.errors import UserError
from worker.pack.blob import TORCH_DTYPES, read_extent
from worker.pack.manifest import TensorEntry
from worker.pack.source import SourceTensor
from worker.quant.formats import split_short
from worker.quant.published import Published, source_names, to_parts

# a published checkpoint's quantized tensors, by safetensors' own dtype names
INT_DTYPES = {"I32": torch.int32, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn}
from worker.quant.quantize import quantize


class QuantizedSource:
    def __init__(self, tensors: list[TensorEntry], index: dict[str, SourceTensor], group_size: int,
                 published: Published | None = None):
        self.index, self.group_size, self.published = index, group_size, published
        self.sources: dict[Path, int] = {}  # checkpoint file → fd, the packer's (set by it)
        self._parts: dict[str, dict[str, torch.Tensor]] = {}  # dense HF name → suffix → flat uint8 bytes
        self._left: dict[str, int] = {}  # dense HF name → bytes not yet handed out
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        for t in tensors:
            if t.format != "native":
                dense = dense_name(t)
                self._left[dense] = self._left.get(dense, 0) + t.nbytes
                self._locks.setdefault(dense, threading.Lock())

    def fill(self, dst: torch.Tensor, t: TensorEntry, rel: int) -> None:
        """Copy bytes [rel, rel + len(dst)) of part `t` into `dst` (uint8)."""
        dense = dense_name(t)
        with self._locks[dense]:
            parts = self._parts.get(dense)
            if parts is None:
                parts = self._parts[dense] = self._quantize(dense, t.format)
        dst.copy_(parts[split_short(t.short)[1]][rel:rel + dst.numel()])
        with self._lock:
            self._left[dense] -= dst.numel()
            if self._left[dense] == 0:
                del self._parts[dense]

    def files(self, t: TensorEntry) -> set[Path]:
        """The checkpoint files part `t` is made from."""
        dense = dense_name(t)
        names = source_names(self.published, dense).values() if self.published else [dense]
        return {self.index[n].file for n in names}

    def _quantize(self, dense: str, fmt: str) -> dict[str, torch.Tensor]:
        if self.published:
            parts = to_parts(self.published, {p: self._read(n) for p, n in source_names(self.published, dense).items()})
        else:
            parts = quantize(fmt, self._read(dense), self.group_size)
        return {k: v.contiguous().view(-1).view(torch.uint8) for k, v in parts.items()}

    def _read(self, name: str) -> torch.Tensor:
        """A checkpoint tensor, whole, in its own dtype."""
        src = self.index[name]
        raw = torch.empty(src.nbytes, dtype=torch.uint8)  # (nbytes,) the checkpoint's bytes of the tensor
        try:
            read_extent(self.sources[src.file], src.offset, src.nbytes, raw)
        except EOFError:
            raise UserError(f"checkpoint file {src.file} is truncated (ends inside {name})") from None
        return raw.view(TORCH_DTYPES.get(src.dtype) or INT_DTYPES[src.dtype]).view(src.shape)


def dense_name(t: TensorEntry) -> str:
    """The checkpoint name of the weight a part belongs to (`...q_proj.qweight` → `...q_proj.weight`)."""
    return t.name.rsplit(".", 1)[0] + ".weight"
