"""A pack never destroys what it reads, nor a file that is not its own blob (issue 12, item 1).

The adversarial pass found `bench pack --raw-device C/model-00001-of-00001.safetensors` overwriting the
checkpoint's shard and exiting 0. Every target below is refused before anything is opened for
writing: the inputs keep their bytes, and no manifest appears.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from packhelp import make_checkpoint

from worker.errors import UserError
from worker.pack.blob import Pack
from worker.pack.packer import pack_checkpoint
from worker.pack.verify import is_verified


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = make_checkpoint(tmp_path_factory.mktemp("safety") / "ckpt", shard="10MB")  # one shard
    (path / "tokenizer.json").write_text("{}")  # what a checkpoint's tokenizer looks like to the packer: a file
    return path


def digests(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir()) if p.is_file()}


def shard(ckpt: Path) -> Path:
    return next(ckpt.glob("*.safetensors"))


def test_cli_refuses_to_pack_onto_the_checkpoints_own_shard(ckpt, tmp_path, bench_here):
    before = digests(ckpt)
    r = bench_here("pack", "--checkpoints", str(ckpt), "--raw-device", str(shard(ckpt)), "--manifest",
                   str(tmp_path / "m.json"))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith("error:") and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "which the pack reads" in r.stderr
    assert digests(ckpt) == before and not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "model.safetensors"])
@pytest.mark.parametrize("how", ["direct", "symlink", "hardlink"])
def test_no_input_file_is_a_target_however_named(ckpt, tmp_path, name, how):
    real = shard(ckpt) if name == "model.safetensors" else ckpt / name
    target = {"direct": real, "symlink": tmp_path / "link", "hardlink": tmp_path / "hard"}[how]
    if how == "symlink":
        target.symlink_to(real)
    elif how == "hardlink":
        os.link(real, target)
    before = digests(ckpt)
    for force in (False, True):  # --force never overrides this
        with pytest.raises(UserError, match="which the pack reads"):
            pack_checkpoint(ckpt, target, tmp_path / "m.json", force=force)
    assert digests(ckpt) == before and not (tmp_path / "m.json").exists()


def test_the_manifest_may_not_overwrite_an_input_either(ckpt, tmp_path):
    before = digests(ckpt)
    with pytest.raises(UserError, match="manifest .*config.json.* which the pack reads"):
        pack_checkpoint(ckpt, tmp_path / "w.blob", ckpt / "config.json")
    assert digests(ckpt) == before and not (tmp_path / "w.blob").exists()


def test_manifest_and_blob_the_same_file_through_a_link(ckpt, tmp_path):
    (tmp_path / "m.json").write_bytes(b"")
    (tmp_path / "alias").symlink_to(tmp_path / "m.json")
    with pytest.raises(UserError, match="must be different files"):
        pack_checkpoint(ckpt, tmp_path / "alias", tmp_path / "m.json", force=True)


def test_a_foreign_non_empty_file_needs_force(ckpt, tmp_path):
    other = tmp_path / "precious.bin"
    other.write_bytes(os.urandom(8192))
    before = other.read_bytes()
    with pytest.raises(UserError, match="not the blob of .*--force overrides"):
        pack_checkpoint(ckpt, other, tmp_path / "m.json")
    assert other.read_bytes() == before and not (tmp_path / "m.json").exists()
    pack_checkpoint(ckpt, other, tmp_path / "m.json", force=True)
    assert is_verified(Pack.open(tmp_path / "m.json"))


def test_repacking_over_its_own_blob_needs_no_force(ckpt, tmp_path):
    pack_checkpoint(ckpt, tmp_path / "w.blob", tmp_path / "m.json")
    pack_checkpoint(ckpt, tmp_path / "w.blob", tmp_path / "m.json")  # the manifest's own blob: fine
    with pytest.raises(UserError, match="not the blob of"):  # ... but not under another manifest
        pack_checkpoint(ckpt, tmp_path / "w.blob", tmp_path / "other.json")
    (tmp_path / "empty.bin").write_bytes(b"")
    pack_checkpoint(ckpt, tmp_path / "empty.bin", tmp_path / "e.json")  # an empty file holds nothing
