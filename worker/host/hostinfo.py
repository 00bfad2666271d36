"""What this host is: a fingerprint of its hardware, a key that says which rows are comparable.

Every result row carries the fingerprint of the host that produced it, so runs from different
machines, nights and commits can be put side by side. `hardware_key` reduces the fingerprint to the
parts that change performance (GPU model, count, HBM, PCIe link, NVMe model, RAM, CPU model): two rows
with the same key ran on comparable hardware. Everything here is cheap (sysfs, /proc, torch's device
properties) and importable without Ray or CUDA; values that cannot be found are None, never guessed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import platform
import re
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from worker import envs

log = logging.getLogger(__name__)

SYS_BLOCK = Path("/sys/class/block")
SYS_PCI = Path("/sys/bus/pci/devices")

# Fingerprint fields that decide comparability; the rest (hostname, versions) describe the row.
HARDWARE_FIELDS = ("gpu_name", "gpu_count", "gpu_mem_gb", "gpu_pcie", "nvme_model", "ram_gb", "cpu_model")


def host_fingerprint(nvme_device: str | None = None, gpu_index: int | None = None) -> dict[str, Any]:
    """Hardware and software of this host as seen by this process (GPUs: those visible to it).

    The GPU fields describe one GPU: `gpu_index` (as this process numbers its visible GPUs; default
    the current device, which in a Ray actor holding one GPU is its only one), with its UUID, so a
    row says which physical card ran it whatever CUDA_VISIBLE_DEVICES renumbered; and the
    CUDA_VISIBLE_DEVICES this process got (from Ray, in an actor), None where unset or empty.
    """
    gpu = _gpu_info(gpu_index)
    nvme_device = _strip_dev(nvme_device)
    return {
        "hostname": socket.gethostname(),
        **gpu,
        "torch_version": _torch_version(),
        "engine_version": engine_version(),
        "cpu_model": cpu_model(),
        "ram_gb": ram_gb(),
        "nvme_device": nvme_device,
        "nvme_model": nvme_model(nvme_device) if nvme_device else None,
        "nvme_pcie": _pcie_link(_block_pci_dir(nvme_device)) if nvme_device else None,
    }


def hardware_key(fp: dict[str, Any]) -> str:
    """A stable short key over the fields that make two hosts comparable.

    Readable prefix (GPU model or "cpu") + 10 hex digits of a hash over HARDWARE_FIELDS. RAM is
    bucketed up to a multiple of 16 GiB because MemTotal sits a little below the installed size and
    varies between kernels; GPU memory is rounded to whole GiB.
    """
    norm = {k: fp.get(k) for k in HARDWARE_FIELDS}
    if norm["ram_gb"] is not None:
        norm["ram_gb"] = int(math.ceil(norm["ram_gb"] / 16.0) * 16)
    if norm["gpu_mem_gb"] is not None:
        norm["gpu_mem_gb"] = int(round(norm["gpu_mem_gb"]))
    digest = hashlib.sha1(json.dumps(norm, sort_keys=True).encode()).hexdigest()[:10]
    gpu = norm["gpu_name"] or "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower().replace("nvidia", "")).strip("-") or "gpu"
    count = f"x{norm['gpu_count']}" if norm["gpu_name"] and norm["gpu_count"] else ""
    return f"{slug}{count}-{digest}"


@functools.lru_cache(maxsize=1)
def source_root() -> Path:
    """The directory that holds the installed `worker` package (the repo root for editable installs)."""
    import worker

    return Path(worker.__file__).resolve().parent.parent


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """Commit of the installed source tree; None when it is not a git checkout."""
    out = _git("rev-parse", "HEAD")
    return out if out and re.fullmatch(r"[0-9a-f]{40}", out) else None


@functools.lru_cache(maxsize=1)
def git_dirty() -> bool | None:
    """True when tracked files differ from the commit (results then are not exactly that commit)."""
    if git_commit() is None:
        return None
    out = _git("status", "--porcelain", "--untracked-files=no")
    return None if out is None else bool(out)


@functools.lru_cache(maxsize=1)
def git_diff_hash() -> str | None:
    """sha256 (16 hex digits) of the tracked changes against the commit; None for a clean tree or
    no checkout. Two processes of the same uncommitted state share it; any other edit changes it."""
    if not git_dirty():
        return None
    out = _git("diff", "HEAD", "--binary")
    return None if out is None else hashlib.sha256(out.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def engine_version() -> str | None:
    return dist_version("streambench")


def dist_version(*dists: str) -> str | None:
    """The installed version of the first of `dists` that is installed (None: none is)."""
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(source_root()), *args], capture_output=True, text=True,
                              timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


# ---- pieces -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def ram_gb() -> float | None:
    try:
        import psutil

        return round(psutil.virtual_memory().total / 2**30, 2)
    except Exception:  # psutil missing or unsupported platform: unknown, not invented
        return None


def nvme_model(device: str) -> str | None:
    """Model string of the disk holding `device` (a disk or one of its partitions)."""
    disk = _disk_of(device)
    if disk is None:
        return None
    for rel in ("device/model", "device/device/model"):
        path = SYS_BLOCK / disk / rel
        if path.is_file():
            return path.read_text().strip() or None
    return None


def _strip_dev(device: str | None) -> str | None:
    return device.removeprefix("/dev/") if device else None


def _disk_of(device: str) -> str | None:
    """nvme0n1p4 -> nvme0n1 (via sysfs: a partition's directory sits inside its disk's)."""
    node = SYS_BLOCK / device
    if not node.exists():
        return None
    if (node / "partition").exists():
        return node.resolve().parent.name
    return device


def _block_pci_dir(device: str) -> Path | None:
    disk = _disk_of(device)
    if disk is None:
        return None
    ctrl = (SYS_BLOCK / disk / "device" / "device")
    return ctrl.resolve() if ctrl.exists() else None


def _pcie_link(pci_dir: Path | None) -> str | None:
    """e.g. "32.0 GT/s PCIe x16" from sysfs; None when the link is not exposed."""
    if pci_dir is None:
        return None
    try:
        speed = (pci_dir / "current_link_speed").read_text().strip()
        width = (pci_dir / "current_link_width").read_text().strip()
    except OSError:
        return None
    return f"{speed} x{width}"


def gpu_uuid(props: Any) -> str | None:
    """`GPU-xxxxxxxx-...` as nvidia-smi and CUDA_VISIBLE_DEVICES write it, from torch's device
    properties; None where torch has no UUID."""
    raw = getattr(props, "uuid", None)
    if raw is None:
        return None
    text = str(raw).strip()
    if not text:
        return None
    return text if text.upper().startswith(("GPU-", "MIG-")) else f"GPU-{text}"


def _torch_version() -> str | None:
    try:
        import torch

        return str(torch.__version__)  # a plain str: a TorchVersion makes whoever unpickles a row import torch
    except ImportError:
        return None


def _gpu_info(index: int | None = None) -> dict[str, Any]:
    """Count of the GPUs visible to this process; model, index, UUID, memory and PCIe link of one
    of them (`index`, default the current device)."""
    info: dict[str, Any] = {"gpu_name": None, "gpu_count": 0, "gpu_index": None, "gpu_uuid": None,
                            "gpu_mem_gb": None, "gpu_pcie": None, "cuda_version": None,
                            "cuda_visible_devices": envs.cuda_visible_devices()}
    try:
        import torch
    except ImportError:
        return info
    info["cuda_version"] = torch.version.cuda
    try:
        if not torch.cuda.is_available():
            return info
        index = torch.cuda.current_device() if index is None else index
        props = torch.cuda.get_device_properties(index)
    except Exception as e:  # a broken driver is a host fact, not a crash
        log.warning("could not query the GPU: %s", e)
        return info
    info.update(gpu_name=props.name, gpu_count=torch.cuda.device_count(), gpu_index=index,
                gpu_uuid=gpu_uuid(props), gpu_mem_gb=round(props.total_memory / 2**30, 2))
    bus = getattr(props, "pci_bus_id", None)
    if bus is not None:
        addr = f"{getattr(props, 'pci_domain_id', 0):04x}:{bus:02x}:{getattr(props, 'pci_device_id', 0):02x}.0"
        info["gpu_pcie"] = _pcie_link(SYS_PCI / addr)
    return info

