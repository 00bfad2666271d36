"""Safety checks before a pack is written onto `--raw-device PATH` (a block device or a regular file).

Writing a 141 GB blob over the wrong device destroys it, so every check here runs before anything is
opened for writing, and reads only: mount state comes from /proc/self/mountinfo, /proc/swaps and
/sys/class/block (no open at all), filesystem signatures from a read-only open. Always refused, even
with `force`: a mounted or swapped-on device, and any file the pack reads (a shard, the index,
config.json, the tokenizer, anything in the checkpoint directory, compared by inode so a symlink or
a hard link cannot hide it) as its blob or its manifest. Refused unless `force`: a filesystem or
partition-table signature, and an existing non-empty regular file that is not the blob of the
manifest being written (a re-pack over its own blob needs no force).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from worker.errors import UserError
from worker.pack.manifest import FORMAT

CACHE_DIRNAME = ".streambench-pack"  # the pack cache next to a checkpoint (worker.pack.cache)

log = logging.getLogger(__name__)

SYS_DEV_BLOCK = Path("/sys/dev/block")
MOUNTINFO = Path("/proc/self/mountinfo")
SWAPS = Path("/proc/swaps")
PROBE_BYTES = 70 * 1024  # covers every signature below (btrfs is at 64 KiB + 64)

# (offset, magic, what it is)
SIGNATURES: list[tuple[int, bytes, str]] = [
    (0, b"XFSB", "an XFS filesystem"),
    (65600, b"_BHRfS_M", "a btrfs filesystem"),
    (0, b"LUKS\xba\xbe", "a LUKS encrypted volume"),
    (16384, b"SKUL\xba\xbe", "a LUKS2 encrypted volume"),
    (3, b"NTFS    ", "an NTFS filesystem"),
    (3, b"EXFAT   ", "an exFAT filesystem"),
    (82, b"FAT32   ", "a FAT32 filesystem"),
    (54, b"FAT16   ", "a FAT16 filesystem"),
    (54, b"FAT12   ", "a FAT12 filesystem"),
    (54, b"FAT     ", "a FAT filesystem"),
    (512, b"EFI PART", "a GPT partition table"),
] + [(page - 10, magic, "a swap area") for page in (4096, 8192, 16384, 65536)
     for magic in (b"SWAPSPACE2", b"SWAP-SPACE")]


@dataclass(frozen=True)
class Target:
    """What `--raw-device PATH` turned out to be."""

    path: Path
    kind: str  # "block" or "file"
    exists: bool
    size: int  # device size / current file size in bytes (0 when absent)


def check_target(path: str | Path, blob_size: int, force: bool = False, reads: Path | None = None,
                 manifest: Path | None = None) -> Target:
    """Refuse to write a pack onto `path` if that could destroy data; never opens it for writing.

    `reads`: the checkpoint directory the pack reads; `manifest`: where its manifest will be written."""
    path = Path(path)
    inputs = _input_files(reads)
    for what, out in (("blob", path), ("manifest", manifest)):
        hit = _same_file(out, inputs) if out is not None else None
        if hit is not None:
            raise UserError(f"the pack's {what} {out} is {hit}, which the pack reads: writing it would destroy the "
                            "checkpoint (--force does not override this); choose a path outside the checkpoint")
    if manifest is not None and path.exists() and manifest.exists() and os.path.samefile(path, manifest):
        raise UserError(f"manifest and blob must be different files (both {path})")
    if not path.exists():
        if not path.parent.is_dir():
            raise UserError(f"{path}: directory {path.parent} does not exist")
        return Target(path, "file", False, 0)
    st = os.stat(path)
    if stat.S_ISREG(st.st_mode):
        target = Target(path, "file", True, st.st_size)
    elif stat.S_ISBLK(st.st_mode):
        where = mounted_at(st.st_rdev)
        if where:
            raise UserError(f"{path} is in use: {where[0]}; unmount it first (--force does not override this)")
        target = Target(path, "block", True, sysfs_size(st.st_rdev))
        if target.size < blob_size:
            raise UserError(f"{path} holds {target.size} bytes but the pack needs {blob_size}: use a larger device")
    else:
        raise UserError(f"{path} is neither a regular file nor a block device")
    if not force:
        found = find_signature(path, blkid=target.kind == "block")
        if found:
            raise UserError(f"{path} holds {found}; writing the pack would destroy it (--force overrides)")
    if target.kind == "file" and target.size and not force and not _blob_of(manifest, path):
        raise UserError(f"{path} is an existing {target.size}-byte file that is not the blob of {manifest}: writing "
                        "the pack would destroy it (--force overrides; or choose a new path)")
    return target


def _input_files(checkpoint: Path | None) -> dict[tuple[int, int], Path]:
    """(device, inode) → path of every file in the checkpoint directory (links followed), except the
    pack cache inside it, which the pack writes rather than reads."""
    if checkpoint is None or not checkpoint.is_dir():
        return {}
    out = {}
    for p in checkpoint.rglob("*"):
        if CACHE_DIRNAME in p.relative_to(checkpoint).parts[:1]:
            continue
        try:
            st = p.stat()
        except OSError:  # a dangling link reads nothing
            continue
        if stat.S_ISREG(st.st_mode):
            out[(st.st_dev, st.st_ino)] = p
    return out


def _same_file(path: Path, inputs: dict[tuple[int, int], Path]) -> str | None:
    """How `path` names one of `inputs` ("config.json of the checkpoint"), or None."""
    try:
        st = path.stat()
    except OSError:
        return None
    hit = inputs.get((st.st_dev, st.st_ino))
    return None if hit is None else f"{hit.name} of the checkpoint" + ("" if hit.name == path.name else f" ({hit})")


def _blob_of(manifest: Path | None, path: Path) -> bool:
    """Is `path` the blob that the existing manifest at `manifest` describes?"""
    if manifest is None or not manifest.is_file():
        return False
    try:
        doc = json.loads(manifest.read_text())
        blob = Path(doc["blob"]["path"])
        blob = blob if blob.is_absolute() else manifest.resolve().parent / blob
        return doc.get("format") == FORMAT and os.path.samefile(blob, path)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def find_signature(path: str | Path, blkid: bool = False) -> str | None:
    """A description of the filesystem / partition table / swap found at `path`, or None.

    `blkid` adds `blkid -p`, which knows many more formats (LVM, md, ZFS, ...) but also matches a bare
    2-byte ext magic, i.e. 1 in 65536 fp32 blobs: worth it for devices, not for files.
    """
    try:
        with open(path, "rb") as f:  # read-only
            head = f.read(PROBE_BYTES)
    except OSError as e:
        raise UserError(f"cannot read {path} to check it for a filesystem ({e.strerror}); "
                        "--force skips this check") from None
    for offset, magic, what in SIGNATURES:
        if head[offset:offset + len(magic)] == magic:
            return what
    if _is_ext(head):
        return "an ext2/3/4 filesystem"
    if _is_mbr(head):
        return "an MBR partition table"
    return _blkid(path) if blkid else None


def _is_ext(head: bytes) -> bool:
    """Magic 0xEF53 at 1080 plus a sane superblock (a bare 2-byte magic would match 1 in 65536 blobs)."""
    if len(head) < 2048 or head[1080:1082] != b"\x53\xef":
        return False
    blocks = int.from_bytes(head[1028:1032], "little")
    log_block_size = int.from_bytes(head[1048:1052], "little")
    return blocks > 0 and log_block_size <= 6


def _is_mbr(head: bytes) -> bool:
    """0x55AA at 510 and four well-formed partition entries (status 0x00/0x80), at least one in use."""
    if len(head) < 512 or head[510:512] != b"\x55\xaa":
        return False
    entries = [head[446 + 16 * i:462 + 16 * i] for i in range(4)]
    return all(e[0] in (0x00, 0x80) for e in entries) and any(e[4] for e in entries)


def _blkid(path: str | Path) -> str | None:
    """What `blkid -p` (low-level probe, read-only) finds, if it is installed."""
    exe = shutil.which("blkid")
    if not exe:
        return None
    try:
        r = subprocess.run([exe, "-p", "-o", "export", str(path)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.debug("blkid -p %s failed: %s", path, e)
        return None
    found = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    if r.returncode == 0 and (found.get("TYPE") or found.get("PTTYPE")):
        kind = found.get("TYPE") or f"{found['PTTYPE']} partition table"
        return f"a signature of {kind} (found by blkid)"
    return None


# ---- mount state, from /proc and /sys only ----------------------------------------------------


def mounted_at(rdev: int) -> list[str]:
    """Where the device `rdev`, any of its partitions or any holder (dm, md, ...) is mounted or swapped on."""
    related = _related_devices(rdev)
    uses = []
    for line in _read(MOUNTINFO).splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 2:
            continue
        major, minor = (int(x) for x in fields[2].split(":"))
        source = rfields[1]
        if os.makedev(major, minor) in related or _rdev_of(source) in related:
            uses.append(f"{source} is mounted at {_unescape(fields[4])} ({rfields[0]})")
    for line in _read(SWAPS).splitlines()[1:]:
        name = _unescape(line.split()[0]) if line.split() else ""
        if _rdev_of(name) in related:
            uses.append(f"{name} is an active swap area")
    return uses


def _related_devices(rdev: int) -> set[int]:
    """`rdev` plus its partitions and, recursively, their holders."""
    out, todo = set(), [rdev]
    while todo:
        dev = todo.pop()
        if dev in out:
            continue
        out.add(dev)
        node = _sysfs_node(dev)
        if node is None:
            continue
        kids = [p for p in node.iterdir() if (p / "partition").exists()]
        kids += list((node / "holders").iterdir()) if (node / "holders").is_dir() else []
        for kid in kids:
            try:
                major, minor = (int(x) for x in (kid / "dev").read_text().split(":"))
                todo.append(os.makedev(major, minor))
            except (OSError, ValueError):
                continue
    return out


def _sysfs_node(rdev: int) -> Path | None:
    p = SYS_DEV_BLOCK / f"{os.major(rdev)}:{os.minor(rdev)}"
    return p.resolve() if p.exists() else None


def sysfs_size(rdev: int) -> int:
    """Device size in bytes from sysfs (counted in 512-byte sectors whatever the block size)."""
    node = _sysfs_node(rdev)
    if node is None or not (node / "size").exists():
        raise UserError(f"block device {os.major(rdev)}:{os.minor(rdev)} has no size in {SYS_DEV_BLOCK}")
    return int((node / "size").read_text()) * 512


def _rdev_of(path: str) -> int | None:
    if not path.startswith("/dev/"):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _unescape(s: str) -> str:
    """mountinfo and /proc/swaps escape spaces etc. as octal (\\040)."""
    return s.encode().decode("unicode_escape") if "\\" in s else s


def block_device_of_mount(mountpoint: str = "/") -> Path | None:
    """The /dev node of the block device mounted at `mountpoint`, if it is one (for tests and diagnostics)."""
    found = None
    for line in _read(MOUNTINFO).splitlines():  # the last mount on a path is the visible one
        fields = line.split()
        if len(fields) > 4 and _unescape(fields[4]) == mountpoint:
            major, minor = (int(x) for x in fields[2].split(":"))
            node = _sysfs_node(os.makedev(major, minor))
            dev = Path("/dev", node.name) if node is not None else None
            found = dev if dev is not None and _rdev_of(str(dev)) is not None else None
    return found
