"""Helpers of the pack tests: a tiny HF checkpoint, its tensors, bit views, packing to a folder."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from worker.pack.blob import Pack
from worker.pack.packer import pack_checkpoint


def make_checkpoint(path: Path, dtype=torch.bfloat16, tied=False, layers=2, shard="60KB", seed=0) -> Path:
    """A tiny Llama in the real HF format (config.json, sharded safetensors + index), random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # norms too: all-ones weights would hide a swapped tensor
    model.to(dtype).save_pretrained(path, max_shard_size=shard)
    return path


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def pack_to(ckpt: Path, out: Path, **kw) -> Pack:
    out.mkdir(exist_ok=True)
    pack_checkpoint(ckpt, out / "w.blob", out / "w.json", **kw)
    return Pack.open(out / "w.json")


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def write_published(base: Path, out: Path, tensors: dict[str, torch.Tensor], dtype: str,
                    quantization_config: dict) -> None:
    """A published quantized checkpoint beside `base`: `tensors` as its one safetensors file, base's
    tokenizer and other files, and base's config with `torch_dtype` and `quantization_config` set."""
    import json
    import shutil

    from safetensors.torch import save_file

    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in base.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(f, out / f.name)
    cfg = json.loads((base / "config.json").read_text())
    cfg["torch_dtype"] = dtype
    cfg.pop("dtype", None)
    cfg["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(cfg))
