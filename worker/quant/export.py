"""`bench dequantize`: a quantized pack's weights, dequantized, as a plain HF safetensors checkpoint.

It is the reference "exact" is measured against: HF transformers run on this checkpoint computes
what the engine computes on the quantized pack (fp32 logits within 1e-5 relative), because every
weight here is what the engine's compute dequantizes (`worker.quant.dequant`, the same functions,
on the CPU; the products are correctly rounded IEEE float32 on any device). Written in float32 by
default, so the values are exact: loading it in bfloat16 rounds them as the engine's bfloat16
dequantization does. The output is a new directory, written under a temporary name and renamed
when complete: never over its input, never half-written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from worker.errors import UserError
from worker.pack.blob import TORCH_DTYPES, Pack
from worker.pack.groups import all_groups
from worker.pack.quantized import dense_name
from worker.quant.dequant import dense_fp8, dense_int4, dense_int8
from worker.quant.formats import split_short

log = logging.getLogger(__name__)

SHARD_BYTES = 4 << 30
WEIGHT_FILES = ("config.json", "model.safetensors.index.json")


def check_out_dir(out_dir: str | Path, inputs: list[str | Path]) -> Path:
    """The output must be a new (or empty) directory that is none of the inputs and holds none of them."""
    out = Path(out_dir).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output {out} exists and is not an empty directory; choose a new directory "
                        "(`bench dequantize` never writes over anything)")
    for p in inputs:
        p = Path(p).resolve()
        if out.resolve() == p or out.resolve() in p.parents:
            raise UserError(f"output {out} would hold the input {p}; choose a directory outside it")
    if not out.parent.is_dir():
        raise UserError(f"the directory {out.parent} of output {out} does not exist")
    return out


def dequantized_tensors(pack: Pack, dtype: torch.dtype):
    """(HF name, dense tensor in `dtype`) for every weight of the pack, in pack order."""
    for key in all_groups(pack.manifest.model_config.num_hidden_layers):
        views = pack.read_group(key)
        done = set()
        for t in pack.manifest.group_tensors(key.name):
            base, _ = split_short(t.short)
            if t.format == "native":
                yield t.name, views[t.short].to(dtype, copy=True)  # own storage: safetensors refuses shared
            elif base not in done:
                done.add(base)
                if t.format in ("int8", "fp8"):
                    fn = dense_int8 if t.format == "int8" else dense_fp8
                    w = fn(((views[f"{base}.qweight"], views[f"{base}.scales"]),), dtype)
                else:
                    w = dense_int4(((views[f"{base}.qweight"], views[f"{base}.scales"], views[f"{base}.zeros"]),),
                                   dtype)
                yield dense_name(t), w


def dequantize_pack(pack: Pack, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write the pack's weights, dequantized to `dtype`, with the source checkpoint's config and tokenizer."""
    src = Path(pack.manifest.source.path)
    if not (src / "config.json").is_file():
        raise UserError(f"the pack's source checkpoint {src} has no config.json (it was moved or deleted); the "
                        "dequantized checkpoint takes its config and tokenizer from there")
    out = check_out_dir(out_dir, [src, pack.manifest_path, pack.blob_path])
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        weight_map, shard, size, n, total = {}, {}, 0, 0, 0
        for name, w in dequantized_tensors(pack, TORCH_DTYPES[dtype]):
            if size and size + w.numel() * w.element_size() > SHARD_BYTES:
                n += 1
                _save(shard, tmp, n, weight_map)
                shard, size = {}, 0
            shard[name] = w.contiguous()
            size += w.numel() * w.element_size()
            total += w.numel() * w.element_size()
        n += 1
        _save(shard, tmp, n, weight_map)
        count = n
        names = {f"part-{i:05d}.safetensors": f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)}
        for old, new in names.items():
            (tmp / old).rename(tmp / new)
        index = {"metadata": {"total_size": total}, "weight_map": {k: names[v] for k, v in weight_map.items()}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        cfg = json.loads((src / "config.json").read_text())
        cfg.pop("quantization_config", None)
        cfg["torch_dtype"] = dtype
        if "dtype" in cfg:
            cfg["dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        for f in src.iterdir():  # tokenizer, generation config: everything that is not weights
            if f.is_file() and f.name not in WEIGHT_FILES and f.suffix != ".safetensors" and not f.name.startswith("."):
                shutil.copy2(f, tmp / f.name)
        os.replace(tmp, out)  # onto nothing, or an empty directory
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise UserError(f"cannot write the dequantized checkpoint at {out} ({e.strerror or e}); nothing was "
                            "left there") from None
        raise
    log.info("dequantized %s (%s) into %s (%s, %.2f GB)", pack.manifest_path, pack.manifest.weight_format, out,
             dtype, total / 1e9)
    return out


def _save(shard: dict[str, torch.Tensor], tmp: Path, n: int, weight_map: dict[str, str]) -> None:
    file = f"part-{n:05d}.safetensors"
    save_file(shard, str(tmp / file), metadata={"format": "pt"})
    weight_map.update({k: file for k in shard})
