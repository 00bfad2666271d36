"""Raw-device safety: never write onto a mounted device, nor over a filesystem unless forced."""

from __future__ import annotations

import builtins
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from benchcli import bench
from packhelp import bits, checkpoint_tensors, make_checkpoint

from worker.errors import UserError
from worker.pack import blockdev
from worker.pack.blob import Pack
from worker.pack.blockdev import block_device_of_mount, check_target, find_signature, mounted_at
from worker.pack.packer import pack_checkpoint
from worker.pack.verify import is_verified, verify_pack

PROBE = 128 * 1024


def image_with(path: Path, *patches: tuple[int, bytes], size: int = PROBE) -> Path:
    data = bytearray(size)
    for offset, magic in patches:
        data[offset:offset + len(magic)] = magic
    path.write_bytes(bytes(data))
    return path


EXT4 = [(1080, b"\x53\xef"), (1028, (1000).to_bytes(4, "little")), (1048, (2).to_bytes(4, "little"))]
MBR = [(510, b"\x55\xaa"), (446, b"\x80"), (450, b"\x83")]


@pytest.mark.parametrize("patches,found", [
    (EXT4, "ext2/3/4"),
    ([(0, b"XFSB")], "XFS"),
    ([(65600, b"_BHRfS_M")], "btrfs"),
    ([(4086, b"SWAPSPACE2")], "swap"),
    ([(0, b"LUKS\xba\xbe")], "LUKS"),
    ([(3, b"NTFS    ")], "NTFS"),
    ([(82, b"FAT32   ")], "FAT32"),
    ([(512, b"EFI PART")], "GPT"),
    (MBR, "MBR"),
])
def test_signatures_are_found(tmp_path, patches, found):
    assert found in find_signature(image_with(tmp_path / "img", *patches))


def test_no_signature_on_zeros_random_bytes_or_a_pack(tmp_path):
    assert find_signature(image_with(tmp_path / "zeros")) is None
    (tmp_path / "random").write_bytes(os.urandom(PROBE))
    assert find_signature(tmp_path / "random") is None
    half_ext = image_with(tmp_path / "half-ext", (1080, b"\x53\xef"))
    assert find_signature(half_ext) is None  # the 2-byte magic alone is 1 in 65536 fp32 blobs
    if shutil.which("blkid"):  # devices also ask blkid, which is less strict
        assert "ext2 (found by blkid)" in find_signature(half_ext, blkid=True)
    ckpt = make_checkpoint(tmp_path / "ckpt", dtype=torch.float32)
    pack_checkpoint(ckpt, tmp_path / "w.blob", tmp_path / "w.json")
    assert find_signature(tmp_path / "w.blob") is None


def _ext4_image(path: Path, kind: str) -> Path:
    if kind == "fake":
        return image_with(path, *EXT4, size=1 << 20)
    if not shutil.which("mkfs.ext4"):
        pytest.skip("mkfs.ext4 not installed")
    subprocess.run(["truncate", "-s", "1M", str(path)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(path)], check=True, capture_output=True)
    return path


@pytest.mark.parametrize("kind", ["fake", "mkfs"])
def test_file_with_ext4_is_refused_unless_forced(tmp_path, kind):
    img = _ext4_image(tmp_path / "disk.img", kind)
    before = hashlib.sha256(img.read_bytes()).hexdigest()
    ckpt = make_checkpoint(tmp_path / "ckpt")
    with pytest.raises(UserError, match=r"disk.img holds an ext2/3/4 filesystem.*--force overrides"):
        pack_checkpoint(ckpt, img, tmp_path / "m.json")
    assert hashlib.sha256(img.read_bytes()).hexdigest() == before and not (tmp_path / "m.json").exists()
    m = pack_checkpoint(ckpt, img, tmp_path / "m.json", force=True)
    with Pack.open(tmp_path / "m.json") as pack:
        assert pack.blob_path == img and img.stat().st_size == m.blob_size
        got = pack.read_group("layers.1.attn")["o_proj"]
    assert torch.equal(bits(got), bits(checkpoint_tensors(ckpt)["model.layers.1.self_attn.o_proj.weight"]))


def test_mounted_root_device_is_refused_before_any_write(tmp_path, monkeypatch):
    dev = block_device_of_mount("/")
    if dev is None:
        pytest.skip("/ is not on a block device here")
    opened = []
    real_os_open, real_open = os.open, builtins.open
    monkeypatch.setattr(os, "open", lambda p, flags, *a: opened.append((str(p), flags)) or real_os_open(p, flags, *a))
    monkeypatch.setattr(builtins, "open", lambda p, mode="r", *a, **k: opened.append((str(p), mode))
                        or real_open(p, mode, *a, **k))
    for force in (False, True):
        with pytest.raises(UserError, match=rf"{dev} is in use: .* is mounted at / .*unmount it first"):
            check_target(dev, 4096, force=force)
    ckpt = make_checkpoint(tmp_path / "ckpt")
    with pytest.raises(UserError, match="is mounted at /"):
        pack_checkpoint(ckpt, dev, tmp_path / "m.json", force=True)
    assert not (tmp_path / "m.json").exists()
    assert not [o for o in opened if o[0] == str(dev)]  # refused from /proc and /sys alone: never opened


def test_mounted_root_device_cli_exits_2(tmp_path):
    dev = block_device_of_mount("/")
    if dev is None:
        pytest.skip("/ is not on a block device here")
    ckpt = make_checkpoint(tmp_path / "ckpt")
    r = bench("pack", "--checkpoints", str(ckpt), "--raw-device", str(dev), "--manifest", str(tmp_path / "m.json"),
              "--force")
    assert r.returncode == 2 and "is mounted at /" in r.stderr and "Traceback" not in r.stderr


def _fake_sysfs(tmp_path: Path, monkeypatch, mountinfo: str) -> None:
    """sda (8:0) with partitions sda1 (8:1), sda2 (8:2); sda2 is held by dm-0 (253:0)."""
    devs = tmp_path / "devices"
    for node, dev in {"sda": "8:0", "sda/sda1": "8:1", "sda/sda2": "8:2", "dm-0": "253:0", "sdb": "8:16"}.items():
        (devs / node).mkdir(parents=True)
        (devs / node / "dev").write_text(dev + "\n")
        (devs / node / "size").write_text("2048\n")
        (devs / node / "holders").mkdir()
        if "/" in node:
            (devs / node / "partition").write_text("1\n")
    (devs / "sda/sda2/holders/dm-0").symlink_to(devs / "dm-0")
    by_dev = tmp_path / "dev-block"
    by_dev.mkdir()
    for node, dev in {"sda": "8:0", "sda/sda1": "8:1", "sda/sda2": "8:2", "dm-0": "253:0", "sdb": "8:16"}.items():
        (by_dev / dev).symlink_to(devs / node)
    (tmp_path / "mountinfo").write_text(mountinfo)
    (tmp_path / "swaps").write_text("Filename Type Size Used Priority\n")
    monkeypatch.setattr(blockdev, "SYS_DEV_BLOCK", by_dev)
    monkeypatch.setattr(blockdev, "MOUNTINFO", tmp_path / "mountinfo")
    monkeypatch.setattr(blockdev, "SWAPS", tmp_path / "swaps")


def test_mounted_partition_or_holder_blocks_the_whole_disk(tmp_path, monkeypatch):
    _fake_sysfs(tmp_path, monkeypatch, "40 1 253:0 / /mnt/my\\040data rw - xfs /dev/mapper/vg-data rw\n")
    sda, sdb = os.makedev(8, 0), os.makedev(8, 16)
    assert mounted_at(sda) == ["/dev/mapper/vg-data is mounted at /mnt/my data (xfs)"]
    assert mounted_at(os.makedev(8, 2)) and not mounted_at(os.makedev(8, 1)) and not mounted_at(sdb)
    (tmp_path / "mountinfo").write_text("41 1 8:1 / /boot rw - ext4 /dev/sda1 rw\n")
    assert mounted_at(sda) == ["/dev/sda1 is mounted at /boot (ext4)"] and not mounted_at(sdb)
    assert blockdev.sysfs_size(sda) == 2048 * 512


def test_other_targets_are_refused(tmp_path):
    with pytest.raises(UserError, match="neither a regular file nor a block device"):
        check_target(tmp_path, 4096)
    with pytest.raises(UserError, match="neither a regular file nor a block device"):
        check_target("/dev/null", 4096)
    with pytest.raises(UserError, match="does not exist"):
        check_target(tmp_path / "no" / "such" / "file", 4096)
    assert check_target(tmp_path / "new.blob", 4096).exists is False


@pytest.fixture
def loop_device(tmp_path):
    """A loop device over a 1 MiB ext4-signed file (root + losetup only)."""
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("needs root and losetup")
    img = image_with(tmp_path / "loop.img", *EXT4, size=1 << 20)
    r = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"losetup refused: {r.stderr.strip()}")
    dev = Path(r.stdout.strip())
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", str(dev)], check=False)


def test_pack_onto_a_block_device_in_place(loop_device, tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    manifest = tmp_path / "m.json"
    with pytest.raises(UserError, match="holds an ext2/3/4 filesystem.*--force overrides"):
        pack_checkpoint(ckpt, loop_device, manifest)
    m = pack_checkpoint(ckpt, loop_device, manifest, force=True)
    assert m.blob.kind == "block" and m.blob.path == str(loop_device) and m.blob_size < 1 << 20
    src = checkpoint_tensors(ckpt)
    with Pack.open(manifest) as pack:  # the device is bigger than the blob: fine
        assert verify_pack(pack) == []
        for g in m.groups:
            got = pack.read_group(g.name)
            for t in m.group_tensors(g.name):
                assert torch.equal(bits(got[t.short]), bits(src[t.name])), t.name
    pack_checkpoint(ckpt, loop_device, manifest)  # our own pack carries no signature: no --force needed
    assert is_verified(Pack.open(manifest))
    other = make_checkpoint(tmp_path / "other", seed=1)
    pack_checkpoint(other, loop_device, tmp_path / "other.json")
    assert not is_verified(Pack.open(manifest))  # another pack overwrote the device: the old record is void
    assert verify_pack(Pack.open(manifest)) != []


def test_block_device_smaller_than_the_pack_is_refused(tmp_path):
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("needs root and losetup")
    img = image_with(tmp_path / "small.img", size=16 * 1024)
    r = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"losetup refused: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        ckpt = make_checkpoint(tmp_path / "ckpt")
        with pytest.raises(UserError, match=r"holds 16384 bytes but the pack needs \d+: use a larger device"):
            pack_checkpoint(ckpt, dev, tmp_path / "m.json", force=True)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
