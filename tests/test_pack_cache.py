"""The pack cache next to a checkpoint: reuse, re-pack on change, one pack per dtype, checksums once."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from packhelp import bits, flip_byte, make_checkpoint, pack_to
from safetensors.torch import load_file, save_file

from worker.errors import UserError
from worker.pack import cache as pack_cache
from worker.pack.cache import ensure_pack, verify_pack


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return make_checkpoint(tmp_path / "ckpt")


def test_cache_reuses_and_repacks_when_checkpoint_changes(ckpt, caplog):
    caplog.set_level(logging.INFO, logger="worker")
    first = ensure_pack(ckpt)
    assert first.manifest_path == ckpt / ".streambench-pack" / "bfloat16.manifest.json"
    mtime = first.blob_path.stat().st_mtime_ns
    caplog.clear()
    second = ensure_pack(ckpt, dtype="auto")
    assert second.blob_path.stat().st_mtime_ns == mtime and "using cached pack" in caplog.text
    assert "packing" not in caplog.text
    # the checkpoint changes (re-download): new weights, new mtime → re-pack, new contents
    shard = sorted(ckpt.glob("*.safetensors"))[0]
    tensors = load_file(shard)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    save_file(tensors, shard, metadata={"format": "pt"})
    caplog.clear()
    third = ensure_pack(ckpt)
    assert "checkpoint changed" in caplog.text
    assert third.manifest.source.fingerprint != first.manifest.source.fingerprint
    t = next(t for t in third.manifest.tensors if t.name == name)
    got = third.read_group(t.group)[t.short]
    assert torch.equal(bits(got), bits(tensors[name]))


def test_cache_keeps_one_pack_per_dtype(ckpt, tmp_path):
    a = ensure_pack(ckpt, pack_dir=tmp_path / "cache")
    b = ensure_pack(ckpt, pack_dir=tmp_path / "cache", dtype="float32")
    assert (a.manifest.dtype, b.manifest.dtype) == ("bfloat16", "float32")
    assert a.manifest_path.exists() and b.manifest_path.exists() and not (ckpt / ".streambench-pack").exists()


def test_checksums_verified_once_per_pack(ckpt, tmp_path, monkeypatch):
    calls = []
    real = pack_cache.verify_pack
    monkeypatch.setattr(pack_cache, "verify_pack", lambda p: calls.append(p) or real(p))
    pack = ensure_pack(ckpt)
    assert pack.verified and calls == []  # a fresh pack's checksums are of the bytes just written
    marker = pack.manifest_path.with_name(pack.manifest_path.name + ".verified")
    marker.unlink()
    ensure_pack(ckpt)
    ensure_pack(ckpt, manifest=pack.manifest_path)
    assert len(calls) == 1


def test_corrupt_cached_pack_is_repacked(ckpt, caplog):
    pack = ensure_pack(ckpt)
    flip_byte(pack.blob_path, pack.manifest.group("layers.1.attn").offset + 10)
    caplog.set_level(logging.INFO, logger="worker")
    again = ensure_pack(ckpt)
    assert "checksums do not match" in caplog.text
    assert verify_pack(again) == []


def test_explicit_manifest_is_used_as_is(ckpt, tmp_path):
    pack = pack_to(ckpt, tmp_path / "p")
    got = ensure_pack(None, manifest=pack.manifest_path)
    assert got.blob_path == pack.blob_path
    with pytest.raises(UserError, match="holds bfloat16 weights but dtype float32"):
        ensure_pack(ckpt, manifest=pack.manifest_path, dtype="float32")
    with pytest.raises(UserError, match="--raw-device needs --manifest"):
        ensure_pack(ckpt, raw_device=pack.blob_path)
