"""The pack cache next to a checkpoint: reuse, re-pack on change, one pack per dtype, checksums once."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from packhelp import bits, flip_byte, make_checkpoint, pack_to
from safetensors.torch import load_file, save_file

from worker.errors import UserError
from worker.pack import verify
from worker.pack.cache import ensure_pack
from worker.pack.verify import is_verified, verify_pack


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
    real = verify.verify_pack
    monkeypatch.setattr(verify, "verify_pack", lambda p: calls.append(p) or real(p))
    pack = ensure_pack(ckpt)
    assert is_verified(pack) and calls == []  # a fresh pack's checksums are of the bytes just written
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


def flip_keeping_mtime(path: Path, offset: int) -> None:
    """Corrupt one byte in place and put the mtime back: what the verified record alone cannot see."""
    st = path.stat()
    flip_byte(path, offset)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_bit_rot_at_a_group_edge_is_caught_on_the_next_load(ckpt, tmp_path, caplog):
    pack = pack_to(ckpt, tmp_path / "p")
    g = pack.manifest.group("layers.1.ffn")
    flip_keeping_mtime(pack.blob_path, g.offset + g.nbytes - 100)  # inside the group's last 4 KiB
    assert verify.record_of(pack) is not None  # the record alone still matches ...
    assert not is_verified(pack)  # ... the edges do not
    with pytest.raises(UserError, match=r"fails its checksums in 1 group\(s\) \(layers.1.ffn\)"):
        ensure_pack(None, manifest=pack.manifest_path)
    cached = ensure_pack(ckpt)
    head = cached.manifest.group("layers.1.attn").offset  # past the blob's first 64 KiB, which the record hashes
    flip_keeping_mtime(cached.blob_path, head + 7)
    caplog.set_level(logging.INFO, logger="worker")
    again = ensure_pack(ckpt)  # the cache re-packs rather than benchmark garbage
    assert "4 KiB of 1 group(s) changed (layers.1.attn)" in caplog.text and "checksums do not match" in caplog.text
    assert verify_pack(again) == [] and again.check["check"] == "full"


def test_damage_inside_a_group_is_found_by_the_periodic_full_verification(ckpt, tmp_path):
    pack = pack_to(ckpt, tmp_path / "p")
    g = pack.manifest.group("layers.0.ffn")
    assert g.nbytes > 3 * 4096
    flip_keeping_mtime(pack.blob_path, g.offset + g.nbytes // 2)  # edges intact
    checked = ensure_pack(None, manifest=pack.manifest_path, verify_days=7)
    assert checked.check["check"] == "edges" and checked.check["verified_at"]  # not seen: the run says when
    with pytest.raises(UserError, match="layers.0.ffn"):
        ensure_pack(None, manifest=pack.manifest_path, verify_days=0)  # a full verification is due: found
