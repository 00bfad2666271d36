"""The weight pack: round trips bit for bit, layout invariants, every mismatch error, the CLI (the cache
next to a checkpoint: test_pack_cache.py)."""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from pathlib import Path

import pytest
import torch
from benchcli import bench
from packhelp import bits, checkpoint_tensors, flip_byte, make_checkpoint, pack_to
from safetensors.torch import load_file, save_file

from worker.errors import UserError
from worker.pack import blob as blob_mod
from worker.pack import packer as pack_mod
from worker.pack.blob import Pack, aligned_empty, open_blob, read_extent
from worker.pack.cache import ensure_pack, pack_paths
from worker.pack.groups import all_groups, group_tensors
from worker.pack.manifest import Manifest
from worker.pack.packer import pack_checkpoint
from worker.pack.verify import is_verified, verify_pack


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return make_checkpoint(tmp_path / "ckpt")


# ---- round trip and layout -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("shard", ["60KB", "10GB"])
def test_round_trip_is_bit_exact(tmp_path, dtype, tied, shard):
    ckpt = make_checkpoint(tmp_path / "ckpt", dtype=dtype, tied=tied, shard=shard)
    if shard == "60KB":
        assert len(list(ckpt.glob("*.safetensors"))) > 2
    src = checkpoint_tensors(ckpt)
    with pack_to(ckpt, tmp_path / "p") as pack:
        m = pack.manifest
        assert m.dtype == {torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
        names = {t.name for t in m.tensors}
        assert ("lm_head.weight" in names) is (not tied)
        assert names == set(src) - ({"lm_head.weight"} if tied else set())
        for key in all_groups(2):
            got = pack.read_group(key)
            assert list(got) == list(group_tensors(key, tied))
            for t in m.group_tensors(key.name):
                assert got[t.short].dtype == dtype and tuple(got[t.short].shape) == t.shape
                assert torch.equal(bits(got[t.short]), bits(src[t.name])), t.name


def test_layout_is_aligned_contiguous_and_in_order(ckpt, tmp_path):
    m = pack_to(ckpt, tmp_path / "p").manifest
    assert [g.name for g in m.groups] == [k.name for k in all_groups(2)]
    assert m.groups[0].offset == 0
    for a, b in zip(m.groups, m.groups[1:]):
        assert b.offset == a.offset + a.nbytes  # contiguous, no gaps between groups
    assert m.blob_size == m.groups[-1].offset + m.groups[-1].nbytes
    assert (tmp_path / "p" / "w.blob").stat().st_size == m.blob_size
    for g in m.groups:
        assert g.offset % 4096 == 0 and g.nbytes % 4096 == 0 and g.checksum.startswith("sha256:")
        ts = m.group_tensors(g.name)
        assert [t.short for t in ts] == list(group_tensors(all_groups(2)[[x.name for x in m.groups].index(g.name)]))
        for t in ts:
            assert t.offset % 4096 == 0 and g.offset <= t.offset and t.offset + t.nbytes <= g.offset + g.nbytes
        assert ts[-1].offset + ts[-1].nbytes > g.offset + g.nbytes - 4096  # extent is no larger than needed


def test_group_tensors_are_views_of_one_aligned_buffer(ckpt, tmp_path):
    with pack_to(ckpt, tmp_path / "p") as pack:
        got = pack.read_group("layers.1.ffn")
    ptrs = {t.untyped_storage().data_ptr() for t in got.values()}
    assert len(ptrs) == 1
    assert all(t.data_ptr() % 4096 == 0 for t in got.values())


@pytest.mark.parametrize("src_dtype,dst", [(torch.bfloat16, "float32"), (torch.float32, "bfloat16"),
                                           (torch.float32, "float16")])
def test_dtype_conversion(tmp_path, src_dtype, dst):
    ckpt = make_checkpoint(tmp_path / "ckpt", dtype=src_dtype)
    src = checkpoint_tensors(ckpt)
    with pack_to(ckpt, tmp_path / "p", dtype=dst) as pack:
        assert pack.manifest.dtype == dst and {t.dtype for t in pack.manifest.tensors} == {dst}
        got = pack.read_group("layers.0.attn")["q_proj"]
    want = src["model.layers.0.self_attn.q_proj.weight"].to(getattr(torch, dst))
    assert got.dtype == want.dtype and torch.equal(bits(got), bits(want))


def test_aligned_empty_and_read_extent(tmp_path):
    for n in (1, 4096, 5000, 1 << 20):
        assert aligned_empty(n).data_ptr() % 4096 == 0 and aligned_empty(n).numel() == n
    data = os.urandom(3 * 4096)
    (tmp_path / "b").write_bytes(data)
    fd = open_blob(tmp_path / "b", direct=True)
    try:
        buf = aligned_empty(8192)
        read_extent(fd, 4096, 8192, buf)
        assert bytes(buf.numpy()) == data[4096:]
        with pytest.raises(EOFError):
            read_extent(fd, 8192, 8192, buf)
    finally:
        os.close(fd)


def test_o_direct_refused_falls_back_with_warning(ckpt, tmp_path, monkeypatch, caplog):
    real_open = os.open

    def no_direct(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    pack = pack_to(ckpt, tmp_path / "p")
    monkeypatch.setattr(blob_mod.os, "open", no_direct)
    with caplog.at_level(logging.WARNING, logger="worker.pack.blob"), pack:
        got = pack.read_group("resident")
    assert "O_DIRECT refused" in caplog.text
    src = checkpoint_tensors(ckpt)
    assert torch.equal(bits(got["embed_tokens"]), bits(src["model.embed_tokens.weight"]))


def test_o_direct_refused_for_writing_falls_back(ckpt, tmp_path, monkeypatch, caplog):
    real_open = os.open

    def no_direct(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", no_direct)
    with caplog.at_level(logging.INFO, logger="worker"):
        pack = pack_to(ckpt, tmp_path / "p")
    assert "writing through the page cache" in caplog.text
    assert verify_pack(pack) == []


def test_disk_full_is_a_user_error_and_leaves_nothing(ckpt, tmp_path, monkeypatch):
    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(blob_mod, "pwrite_all", full)
    with pytest.raises(UserError, match="no space left for a .* GB pack at .*w.blob"):
        pack_to(ckpt, tmp_path / "p")
    assert list((tmp_path / "p").iterdir()) == []


# ---- mismatches and failures --------------------------------------------------------------------


def test_checksum_mismatch_names_the_group(ckpt, tmp_path):
    pack = pack_to(ckpt, tmp_path / "p")
    flip_byte(pack.blob_path, pack.manifest.group("layers.1.attn").offset + 123)
    assert not is_verified(pack)  # the blob's mtime changed
    assert verify_pack(pack) == ["layers.1.attn"]
    with pytest.raises(UserError, match=r"fails its checksums in 1 group\(s\) \(layers.1.attn\)"):
        ensure_pack(ckpt, manifest=pack.manifest_path)


@pytest.mark.parametrize("change", ["truncate", "grow"])
def test_blob_size_mismatch(ckpt, tmp_path, change):
    pack = pack_to(ckpt, tmp_path / "p")
    size = pack.manifest.blob_size
    os.truncate(pack.blob_path, size - 4096 if change == "truncate" else size + 1)
    with pytest.raises(UserError, match=rf"w.blob is {size - 4096 if change == 'truncate' else size + 1} bytes "
                                        rf"but its manifest says {size}: re-pack with `bench pack`"):
        Pack.open(pack.manifest_path)


def _edit_manifest(path: Path, edit) -> None:
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update(format_version=2), "has format_version 2; this engine reads version 1"),
    (lambda d: d.update(format="something-else"), "is not a streambench pack manifest"),
    (lambda d: d.pop("groups"), "required key 'groups' is missing"),
    (lambda d: d["groups"][1].update(offset=d["groups"][1]["offset"] + 512), "is not 4096-byte aligned"),
    (lambda d: d.update(blob_size=d["blob_size"] - 4096), "runs past blob_size"),
    (lambda d: d["tensors"][0].update(shape=[3]), "does not match shape"),
    (lambda d: d["groups"].pop(), "groups do not match"),
])
def test_bad_manifest_is_a_one_line_user_error(ckpt, tmp_path, edit, match):
    pack = pack_to(ckpt, tmp_path / "p")
    _edit_manifest(pack.manifest_path, edit)
    with pytest.raises(UserError, match=match) as e:
        Manifest.load(pack.manifest_path)
    assert str(pack.manifest_path) in str(e.value) and "\n" not in str(e.value)


def test_manifest_round_trips_through_json(ckpt, tmp_path):
    m = pack_to(ckpt, tmp_path / "p").manifest
    again = Manifest.from_dict(json.loads(json.dumps(m.to_dict())))
    assert again == m and again.model_config == m.model_config


def _remove_tensor(ckpt: Path, name: str) -> None:
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = ckpt / index["weight_map"][name]
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})


def test_missing_tensor_fails_and_leaves_nothing(ckpt, tmp_path):
    _remove_tensor(ckpt, "model.layers.1.mlp.up_proj.weight")
    with pytest.raises(UserError, match="tensor model.layers.1.mlp.up_proj.weight is missing"):
        pack_to(ckpt, tmp_path / "p")
    assert list((tmp_path / "p").iterdir()) == []


def test_untied_checkpoint_without_lm_head_is_refused(ckpt, tmp_path):
    _remove_tensor(ckpt, "lm_head.weight")
    with pytest.raises(UserError, match="lm_head.weight is missing .* tie_word_embeddings=false"):
        pack_to(ckpt, tmp_path / "p")


def test_wrong_shape_names_the_tensor(ckpt, tmp_path):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"tensor model.layers.0.mlp.gate_proj.weight .* has shape \[160, 64\], "
                                        r"but config.json implies \[128, 64\]"):
        pack_to(ckpt, tmp_path / "p")


def test_failure_mid_write_leaves_nothing_and_keeps_the_old_pack(ckpt, tmp_path, monkeypatch):
    old = pack_to(ckpt, tmp_path / "p")
    old_bytes = old.blob_path.read_bytes()
    calls = []
    real = pack_mod._fill

    def fail_late(*a):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real(*a)

    monkeypatch.setattr(pack_mod, "_fill", fail_late)
    with pytest.raises(RuntimeError, match="disk on fire"):
        pack_checkpoint(ckpt, tmp_path / "p" / "w.blob", tmp_path / "p" / "w.json", dtype="float32")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["w.blob", "w.json", "w.json.verified"]
    assert old.blob_path.read_bytes() == old_bytes and is_verified(Pack.open(old.manifest_path))
    calls.clear()
    with pytest.raises(RuntimeError):
        pack_checkpoint(ckpt, tmp_path / "q.blob", tmp_path / "q.json")
    assert not list(tmp_path.glob("*q*"))


# ---- the window pipeline (groups larger than a window: real checkpoints; here by shrinking WINDOW) ----


class _Recorder:
    """Counts what the packer's pipeline does: buffers allocated, fills started, windows handed on."""

    def __init__(self, monkeypatch):
        self.buffers, self.fills, self.handed, self.most_ahead = [], [], [], 0
        real_empty, real_fill, recorder = pack_mod.aligned_empty, pack_mod._fill, self

        def empty(n, *a, **kw):
            self.buffers.append(real_empty(n, *a, **kw))
            return self.buffers[-1]

        def fill(buf, window, *a):
            self.fills.append((buf.data_ptr(), window))
            self.most_ahead = max(self.most_ahead, len(self.fills) - len(self.handed))
            return real_fill(buf, window, *a)

        class Writer(pack_mod.BlobWriter):
            def put(self, offset, data, release):
                recorder.handed.append(offset)
                super().put(offset, data, release)

        monkeypatch.setattr(pack_mod, "aligned_empty", empty)
        monkeypatch.setattr(pack_mod, "_fill", fill)
        monkeypatch.setattr(pack_mod, "BlobWriter", Writer)


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_small_windows_write_the_same_blob_with_zero_padding(ckpt, tmp_path, monkeypatch, dtype):
    """Groups of many windows, tensors cut across windows, buffers recycled: the same bytes and checksums
    as one window per group, zeros between tensors, at most POOL_WINDOWS buffers, half of them ahead."""
    whole = pack_to(ckpt, tmp_path / "whole", dtype=dtype)
    monkeypatch.setattr(pack_mod, "WINDOW", 8192)
    monkeypatch.setattr(pack_mod, "POOL_WINDOWS", 4)
    rec = _Recorder(monkeypatch)
    small = pack_to(ckpt, tmp_path / "small", dtype=dtype)
    m = small.manifest
    assert any(t.offset // 8192 != (t.offset + t.nbytes - 1) // 8192 for t in m.tensors)  # a tensor spans windows
    assert len(rec.fills) > 2 * len(m.groups) and len(rec.buffers) == 4
    assert {ptr for ptr, _ in rec.fills} <= {b.data_ptr() for b in rec.buffers}  # recycled, never more
    assert 1 < rec.most_ahead <= 2
    assert rec.handed == sorted(rec.handed) == [w.start for _, w in rec.fills]  # in blob order
    assert [(g.name, g.checksum) for g in m.groups] == [(g.name, g.checksum) for g in whole.manifest.groups]
    blob = small.blob_path.read_bytes()
    assert blob == whole.blob_path.read_bytes()
    covered = bytearray(len(blob))
    for t in m.tensors:
        covered[t.offset:t.offset + t.nbytes] = b"\x01" * t.nbytes
    assert all(b == 0 for b, c in zip(blob, covered) if not c)  # padding is zero, not a recycled buffer's bytes
    assert any(not c for c in covered)


def test_failure_in_a_late_window_stops_every_thread_and_closes_the_checkpoint(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(pack_mod, "WINDOW", 8192)
    monkeypatch.setattr(pack_mod, "POOL_WINDOWS", 4)
    real, calls = pack_mod._fill, []

    def fail_late(*a):
        calls.append(1)
        if len(calls) == 9:
            raise RuntimeError("disk on fire")
        return real(*a)

    monkeypatch.setattr(pack_mod, "_fill", fail_late)
    fds = set(os.listdir("/proc/self/fd"))
    with pytest.raises(RuntimeError, match="disk on fire"):
        pack_to(ckpt, tmp_path / "p")
    assert len(calls) >= 9
    assert set(os.listdir("/proc/self/fd")) <= fds  # the checkpoint shards and the blob are closed
    assert not [t.name for t in threading.enumerate() if t.name.startswith("pack-")]  # fillers, writers, hashers
    assert list((tmp_path / "p").iterdir()) == []


# ---- CLI ----------------------------------------------------------------------------------------


def test_cli_pack_and_verify(ckpt, tmp_path, bench_here):
    r = bench("pack", "--checkpoints", str(ckpt), "--out-dir", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    manifest, blob_path = pack_paths(tmp_path / "out", "bfloat16")
    assert str(manifest) in r.stdout and blob_path.exists()
    r = bench_here("verify", "--manifest", str(manifest))  # (the failing verify below is a real process)
    assert r.returncode == 0 and "ok" in r.stdout
    flip_byte(blob_path, Manifest.load(manifest).group("layers.0.ffn").offset)
    r = bench("verify", "--manifest", str(manifest))
    assert r.returncode == 1 and "layers.0.ffn" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,match", [
    (["pack", "--checkpoints", "/nonexistent/ckpt"], "does not exist"),
    (["pack", "--checkpoints", "CKPT", "--raw-device", "/tmp/x.blob"], "go together"),
    (["verify", "--manifest", "CKPT/config.json"], "not a streambench pack manifest"),
])
def test_cli_bad_input_exits_2_with_one_line(ckpt, bench_here, args, match):
    r = bench_here(*[a.replace("CKPT", str(ckpt)) for a in args])
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert match in " ".join(r.stderr.split()) and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error:")


def test_synthetic_checkpoint_round_trip(make_ckpt, tmp_path):
    """The project's own synthetic checkpoints (worker.synth, several shards, tied) pack bit-exactly."""
    ckpt = make_ckpt(dtype="bfloat16", tie_word_embeddings=True, shard_max_gb=0.001)
    src = checkpoint_tensors(ckpt)
    with pack_to(ckpt, tmp_path / "p") as pack:
        for g in pack.manifest.groups:
            got = pack.read_group(g.name)
            for t in pack.manifest.group_tensors(g.name):
                assert torch.equal(bits(got[t.short]), bits(src[t.name])), t.name
