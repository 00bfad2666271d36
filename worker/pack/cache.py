"""The pack cache `bench run` uses: one pack per checkpoint, dtype and weight format, re-packed only when stale.

`ensure_pack` is the entry point: an explicit manifest is used as is; otherwise the cache next to the
checkpoint (or `--pack-dir`) is reused while the checkpoint's fingerprint matches, and rebuilt when it
does not (or when its blob fails the check before use, worker.pack.verify). The pack it returns says
how it was checked (`Pack.check`), for the run's record.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from worker.errors import UserError
from worker.model.geometry import ModelConfig
from worker.pack import verify
from worker.pack.blob import Pack
from worker.pack.blockdev import CACHE_DIRNAME
from worker.pack.manifest import checkpoint_source
from worker.pack.packer import pack_checkpoint, plan_layout, resolve_dtype
from worker.pack.source import read_index
from worker.quant.formats import WeightSpec
from worker.quant.published import detect, resolve

log = logging.getLogger(__name__)


def pack_paths(pack_dir: str | Path, dtype: str, weights: WeightSpec | None = None) -> tuple[Path, Path]:
    """(manifest, blob) of the `dtype` pack of a weight format in a pack directory (native packs keep
    the names they always had: `bfloat16.manifest.json`; an int4 one is `bfloat16.int4-g128.manifest.json`)."""
    d, key = Path(pack_dir), (weights or WeightSpec()).key
    stem = f"{dtype}.{key}" if key else dtype
    return d / f"{stem}.manifest.json", d / f"{stem}.blob"


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialize packers sharing a directory (two runs on one host), across processes."""
    with open(directory / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_pack(checkpoint_dir: str | Path | None, pack_dir: str | Path | None = None,
                manifest: str | Path | None = None, raw_device: str | Path | None = None,
                dtype: str | None = None, repack: bool = False, verify_days: float | None = None,
                weights: WeightSpec | None = None) -> Pack:
    """The pack `bench run` uses: an explicit manifest as is, else a cached pack, (re-)packed when stale.

    The cache (`<checkpoint>/.streambench-pack/` or `pack_dir`) holds one pack per dtype and is rebuilt
    only when the checkpoint's fingerprint changed (or `repack`). Every checksum is verified when no
    full verification younger than `verify_days` is on record; otherwise only the edges are.
    `weights` is the weight format asked (native by default); an explicit manifest must hold it.
    """
    dtype = None if dtype == "auto" else dtype
    weights = weights or WeightSpec()
    if manifest is not None:
        pack = Pack.open(manifest, blob_path=raw_device)
        if dtype and pack.manifest.dtype != dtype:
            raise UserError(f"manifest {manifest} holds {pack.manifest.dtype} weights but dtype {dtype} was asked; "
                            f"re-pack with `bench pack --dtype {dtype}` or drop --dtype")
        _check_format(pack, weights, manifest)
        if checkpoint_dir and Path(checkpoint_dir).is_dir():
            if checkpoint_source(checkpoint_dir).fingerprint != pack.manifest.source.fingerprint:
                log.warning("checkpoint %s changed since manifest %s was packed; using the pack as is",
                            checkpoint_dir, manifest)
        pack.check = verify.check(pack, strict=True, max_age_days=verify_days).to_dict()
        return pack
    if raw_device is not None:
        raise UserError("--raw-device needs --manifest FILE: pack onto the device first with "
                        "`bench pack --raw-device DEV --manifest FILE`")
    if not checkpoint_dir:
        raise UserError("no checkpoint: pass --checkpoints DIR (or --manifest FILE of an existing pack)")
    root = Path(checkpoint_dir)
    cfg = ModelConfig.from_hf_dir(root)  # a clear error for a bad checkpoint before touching the cache
    published = detect(root)
    weights = resolve(published, weights, f"checkpoint {root}")  # a pre-quantized one packs as it is
    cache = Path(pack_dir) if pack_dir else root / CACHE_DIRNAME
    index = read_index(root)
    dtype = resolve_dtype(dtype, index)
    plan_layout(cfg, index, dtype, root, weights, published)  # every tensor and format check, from the headers
    manifest_path, blob_path = pack_paths(cache, dtype, weights)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create pack directory {cache} ({e.strerror}); pass --pack-dir DIR") from None
    with _locked(cache):
        reason = "--force" if repack else _stale_reason(manifest_path, root)
        if reason is None:
            pack = Pack.open(manifest_path)
            checked = verify.check(pack, strict=False, max_age_days=verify_days)
            if checked is not None:
                log.info("using cached pack %s (%s, %.2f GB)", manifest_path, dtype, pack.manifest.blob_size / 1e9)
                pack.check = checked.to_dict()
                return pack
            reason = "its checksums do not match"
        log.info("packing %s into %s: %s", root, cache, reason)
        for p in (manifest_path, blob_path):
            p.unlink(missing_ok=True)  # free the space before writing the new blob
        pack_checkpoint(root, blob_path, manifest_path, dtype=dtype, weights=weights)
        pack = Pack.open(manifest_path)
        pack.check = verify.PackCheck("full", (verify.record_of(pack) or {}).get("verified_at")).to_dict()
        return pack


def _check_format(pack: Pack, weights: WeightSpec, manifest: str | Path) -> None:
    """An explicit manifest must hold the weight format the run asks for: the run's record says it does."""
    m = pack.manifest
    held = WeightSpec(m.weight_format, m.group_size or weights.group_size,
                      any(t.short.startswith("lm_head.") for t in m.tensors))
    if held != weights:
        raise UserError(f"manifest {manifest} holds {_describe(held)} weights but {_describe(weights)} was asked; "
                        f"pass --weight-format {held.format}"
                        + (f" --quant-group-size {held.group_size}" if held.format == "int4" else "")
                        + (" --quantize-head" if held.quantize_head else "") + " (or re-pack)")


def _describe(w: WeightSpec) -> str:
    return w.format + (f" (group {w.group_size})" if w.format == "int4" else "") + (
        ", quantized head" if w.quantize_head else "")


def _stale_reason(manifest_path: Path, checkpoint: Path) -> str | None:
    """Why the cached pack cannot be used, or None when it is current."""
    if not manifest_path.exists():
        return "no pack yet"
    try:
        pack = Pack.open(manifest_path)
    except UserError as e:
        return f"the cached pack is unusable ({e})"
    if pack.manifest.source.fingerprint != checkpoint_source(checkpoint).fingerprint:
        return "the checkpoint changed since it was packed"
    return None
