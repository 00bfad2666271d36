"""The runtime manifest: what a packed blob holds and where.

A pack is a blob (regular file or raw block device) plus this JSON. The blob has no header of its own,
so the manifest is the only description of it: model geometry, dtype, every group's extent and
checksum, every tensor's offset, shape and dtype, and the checkpoint it came from (with a fingerprint,
so a cache can tell when the checkpoint changed). `Manifest.load` validates everything the engine
relies on (format version, alignment, extents inside the blob, every quantized tensor's parts), so
readers can trust offsets blindly.

A quantized pack (`weight_format` int8 or int4, worker.quant.formats) records the format per tensor:
each quantized weight is its parts, each a tensor entry of its own (`q_proj.qweight`,
`q_proj.scales`, ...) with `format` naming the weight's format. A native pack writes neither key,
so its manifest is what it always was.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from worker.errors import UserError
from worker.files import write_atomic
from worker.model.geometry import ModelConfig
from worker.pack.groups import all_groups, expected_shapes
from worker.quant import formats

FORMAT = "streambench-pack"
FORMAT_VERSION = 1
ALIGNMENT = 4096
DTYPE_SIZES = {"bfloat16": 2, "float16": 2, "float32": 4}  # what a native tensor (and the compute) may be
TENSOR_DTYPE_SIZES = {**DTYPE_SIZES, **formats.PART_DTYPE_SIZES}  # what a tensor entry may be
BLOB_KINDS = ("file", "block")


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class SourceFile:
    name: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Source:
    """The checkpoint a pack was made from; `fingerprint` changes when any weight/config file does."""

    path: str
    fingerprint: str
    files: tuple[SourceFile, ...] = ()


@dataclass(frozen=True)
class BlobRef:
    """Where the bytes live. A file path relative to the manifest's directory, or absolute."""

    path: str
    kind: str = "file"  # "file" or "block"


@dataclass(frozen=True)
class GroupEntry:
    name: str  # groups.GroupKey.name: "resident", "layers.3.attn"
    offset: int  # absolute, aligned
    nbytes: int  # the extent, aligned (tensor bytes + padding)
    checksum: str  # "sha256:<hex>" of the extent's bytes


@dataclass(frozen=True)
class TensorEntry:
    name: str  # HF name
    short: str  # short name within its group (groups.group_tensors)
    group: str
    offset: int  # absolute in the blob, aligned
    nbytes: int
    shape: tuple[int, ...]
    dtype: str
    format: str = "native"  # the weight format of the tensor this entry is (a part of)


@dataclass(frozen=True)
class Manifest:
    model_config: ModelConfig
    dtype: str
    blob_size: int
    blob: BlobRef
    source: Source
    created_at: str
    groups: tuple[GroupEntry, ...]
    tensors: tuple[TensorEntry, ...]
    alignment: int = ALIGNMENT
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    weight_format: str = "native"
    group_size: int | None = None  # int4's group along the input dimension
    _index: dict[str, tuple[GroupEntry, tuple[TensorEntry, ...]]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_group: dict[str, list[TensorEntry]] = {g.name: [] for g in self.groups}
        for t in self.tensors:
            by_group.setdefault(t.group, []).append(t)
        self._index.update({g.name: (g, tuple(by_group[g.name])) for g in self.groups})

    # ---- lookup -------------------------------------------------------------------------------

    def group(self, name: str) -> GroupEntry:
        return self._index[name][0]

    def group_tensors(self, name: str) -> tuple[TensorEntry, ...]:
        """The group's tensors in pack order."""
        return self._index[name][1]

    def blob_path(self, manifest_path: str | Path) -> Path:
        p = Path(self.blob.path)
        return p if p.is_absolute() else Path(manifest_path).resolve().parent / p

    # ---- JSON ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = {f: getattr(self, f) for f in ("format", "format_version", "dtype", "alignment", "blob_size",
                                           "created_at")}
        d["model_config"] = self.model_config.to_dict()
        d["blob"] = asdict(self.blob)
        d["source"] = asdict(self.source)
        if self.weight_format != "native":
            d["weight_format"], d["group_size"] = self.weight_format, self.group_size
        d["groups"] = [asdict(g) for g in self.groups]
        d["tensors"] = [_tensor_dict(t) for t in self.tensors]
        return d

    def save(self, path: str | Path) -> None:
        """Write atomically (temp + fsync + rename): a manifest either exists whole or not at all."""
        write_atomic(path, json.dumps(self.to_dict(), indent=1), "manifest", fsync=True)

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"manifest {path} does not exist; make one with `bench pack`")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"manifest {path} is not valid JSON ({e}): re-pack with `bench pack`") from None
        return cls.from_dict(raw, where=f"manifest {path}")

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest") -> Manifest:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            fmt = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise UserError(f"{where} is not a streambench pack manifest (format={fmt!r}, expected {FORMAT!r})")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise UserError(f"{where} has format_version {version!r}; this engine reads version {FORMAT_VERSION}: "
                            "re-pack with `bench pack` (or use the streambench that wrote it)")
        try:
            m = cls(
                model_config=ModelConfig.from_dict(_req(d, "model_config")),
                dtype=_req(d, "dtype"),
                alignment=int(_req(d, "alignment")),
                blob_size=int(_req(d, "blob_size")),
                blob=BlobRef(**_req(d, "blob")),
                source=_source(_req(d, "source")),
                created_at=str(_req(d, "created_at")),
                groups=tuple(GroupEntry(**g) for g in _req(d, "groups")),
                tensors=tuple(TensorEntry(**{**t, "shape": tuple(t["shape"])}) for t in _req(d, "tensors")),
                weight_format=d.get("weight_format", "native"),
                group_size=d.get("group_size"),
            )
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        except (TypeError, ValueError, KeyError) as e:
            raise UserError(f"{where} is malformed ({type(e).__name__}: {e}): re-pack with `bench pack`") from None
        try:
            m.validate(where)
        except TypeError as e:
            raise UserError(f"{where} is malformed ({e}): re-pack with `bench pack`") from None
        return m

    def validate(self, where: str = "manifest") -> None:
        """Check the invariants readers rely on; raise a UserError naming the first violation."""

        def bad(msg: str) -> UserError:
            return UserError(f"{where}: {msg}; re-pack with `bench pack`")

        if self.dtype not in DTYPE_SIZES:
            raise bad(f"dtype {self.dtype!r} is not one of {sorted(DTYPE_SIZES)}")
        if self.alignment <= 0 or self.alignment % ALIGNMENT:
            raise bad(f"alignment {self.alignment} is not a multiple of {ALIGNMENT}")
        if self.blob.kind not in BLOB_KINDS:
            raise bad(f"blob kind {self.blob.kind!r} is not one of {BLOB_KINDS}")
        expected = [k.name for k in all_groups(self.model_config.num_hidden_layers)]
        names = [g.name for g in self.groups]
        if names != expected:
            missing = sorted(set(expected) - set(names)) or sorted(set(names) - set(expected)) or ["(order)"]
            raise bad(f"groups do not match the model's {len(expected)} groups in pack order (e.g. {missing[0]})")
        end = 0
        for g in self.groups:
            if g.offset % self.alignment or g.nbytes % self.alignment or g.nbytes <= 0:
                raise bad(f"group {g.name} extent [{g.offset}, +{g.nbytes}) is not {self.alignment}-byte aligned")
            if g.offset < end or g.offset + g.nbytes > self.blob_size:
                raise bad(f"group {g.name} extent [{g.offset}, +{g.nbytes}) overlaps another group or runs "
                          f"past blob_size {self.blob_size}")
            if not g.checksum.startswith("sha256:"):
                raise bad(f"group {g.name} checksum {g.checksum!r} is not 'sha256:<hex>'")
            end = g.offset + g.nbytes
        for t in self.tensors:
            if t.group not in self._index:
                raise bad(f"tensor {t.name} names unknown group {t.group!r}")
            g = self.group(t.group)
            if t.dtype not in TENSOR_DTYPE_SIZES or t.nbytes != math.prod(t.shape) * TENSOR_DTYPE_SIZES[t.dtype]:
                raise bad(f"tensor {t.name}: nbytes {t.nbytes} does not match shape {list(t.shape)} × {t.dtype}")
            if t.offset % self.alignment or t.offset < g.offset or t.offset + t.nbytes > g.offset + g.nbytes:
                raise bad(f"tensor {t.name} at [{t.offset}, +{t.nbytes}) is unaligned or outside group {g.name}")
        problem = self._quantized_problem()
        if problem:
            raise bad(problem)

    def _quantized_problem(self) -> str | None:
        """Why the tensors do not hold what `weight_format` says (a truncated or edited pack), or None."""
        if self.weight_format not in formats.FORMATS:
            return f"weight_format {self.weight_format!r} is not one of {', '.join(formats.FORMATS)}"
        if self.weight_format == "int4" and (not isinstance(self.group_size, int) or self.group_size < 2):
            return f"int4 pack without a valid group_size ({self.group_size!r})"
        shapes = expected_shapes(self.model_config)
        found: dict[tuple[str, str], dict[str, tuple[tuple[int, ...], str]]] = {}
        for t in self.tensors:
            base, suffix = formats.split_short(t.short)
            if t.format == "native":
                if suffix is not None or t.dtype not in DTYPE_SIZES:
                    return f"tensor {t.name} is native but named or typed as a quantized part ({t.short}, {t.dtype})"
                continue
            if t.format != self.weight_format or base not in shapes or suffix is None:
                return f"tensor {t.name} has format {t.format!r} in a {self.weight_format} pack"
            found.setdefault((t.group, base), {})[suffix] = (t.shape, t.dtype)
        for (group, base), got in found.items():
            why = formats.check_parts(self.weight_format, base, got, shapes[base], self.group_size or 0)
            if why:
                return f"group {group}: {why}"
        return None


def _tensor_dict(t: TensorEntry) -> dict[str, Any]:
    d = asdict(t)
    if t.format == "native":
        del d["format"]
    return d


def _req(d: dict[str, Any], key: str) -> Any:
    if key not in d:
        raise UserError(f"required key {key!r} is missing")
    return d[key]


def _source(d: dict[str, Any]) -> Source:
    return Source(path=d["path"], fingerprint=d["fingerprint"],
                  files=tuple(SourceFile(**f) for f in d.get("files", ())))


def checkpoint_source(checkpoint_dir: str | Path) -> Source:
    """Fingerprint a checkpoint by the name, size and mtime of its config and weight files.

    Cheap (stat only), so a cache can check it on every run; any re-download or edit changes it.
    """
    root = Path(checkpoint_dir).resolve()
    paths = sorted(p for p in root.iterdir() if p.is_file() and (
        p.name in ("config.json", "model.safetensors.index.json") or p.suffix == ".safetensors"))
    files = []
    for p in paths:
        st = p.stat()
        files.append(SourceFile(p.name, st.st_size, st.st_mtime_ns))
    digest = hashlib.sha256(json.dumps([asdict(f) for f in files]).encode()).hexdigest()
    return Source(path=str(root), fingerprint=f"sha256:{digest}", files=tuple(files))
