"""A device view of the pinned CPU tier, so a GPU kernel pulls exactly the blocks it names across PCIe.

Top-k chooses which offloaded blocks to fetch on the device; a copy engine transfer (cudaMemcpy)
needs the source addresses on the host, which would put a device → host read of the ids and a host
wait in every layer's loop. Page-locked host memory registered with `cudaHostRegister` is mapped
into the device's address space instead (unified addressing, every 64-bit CUDA platform): wrapped as
a CUDA tensor (`__cuda_array_interface__` over the device pointer `cudaHostGetDevicePointer` gives,
the host pointer itself under UVA), ordinary kernels read it, and an `index_select` on the KV stream
reads the chosen blocks straight from the host with the ids still on the device (`CpuStore.pull`).
The weight streamer maps the embedding table it keeps on the host the same way (`worker.stream.host_table`).
The wider the elements, the fewer PCIe read requests: the store is read as the widest integer type
its block size allows (`wide_dtype`).

On a CPU "device" the store is the device's memory: the view is the store itself and the gather is a
plain `index_select` (the CI twin of the same path). When the mapping cannot be made or does not read
back what the host wrote, `device_view` says why in the log and returns None: the CPU tier then takes
the SSD tier's host gather (`kv.fetch`), which is slower but needs no mapping.
"""

from __future__ import annotations

import ctypes
import logging

import torch

log = logging.getLogger(__name__)


def wide_dtype(nbytes: int) -> torch.dtype:
    """The widest integer type whose size divides `nbytes` (a gather kernel moves one element per thread)."""
    return next(t for t in (torch.int64, torch.int32, torch.int16, torch.uint8)
                if nbytes % torch.empty((), dtype=t).element_size() == 0)


class _Mapped:
    """The CUDA array interface of `nbytes` bytes at device address `ptr`; keeps the host tensor alive."""

    def __init__(self, ptr: int, nbytes: int, owner: torch.Tensor):
        self.owner = owner
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "strides": None, "version": 2}


def _cudart():
    """The CUDA runtime library torch loaded (found in this process's mappings), or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart" in line and "/" in line}
    except OSError:
        return None
    return ctypes.CDLL(min(paths)) if paths else None


def device_pointer(host_ptr: int) -> int | None:
    """The device address of registered host memory at `host_ptr` (cudaHostGetDevicePointer), or None
    when the runtime cannot be reached from Python (then UVA's host pointer is used)."""
    lib = _cudart()
    if lib is None:
        return None
    out = ctypes.c_void_p()
    rc = lib.cudaHostGetDevicePointer(ctypes.byref(out), ctypes.c_void_p(host_ptr), 0)
    if rc != 0:
        raise RuntimeError(f"cudaHostGetDevicePointer failed with CUDA error {rc}")
    return out.value


def device_view(host: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """host: a contiguous uint8 tensor in registered (pinned) host memory → a tensor on `device` over the
    same bytes (the host tensor itself on a CPU device), or None when the device cannot read it."""
    if device.type != "cuda":
        return host
    try:
        ptr = device_pointer(host.data_ptr())
    except (RuntimeError, OSError, AttributeError) as e:
        log.info("zero-copy: no device pointer from the runtime (%s); using the host pointer (UVA)", e)
        ptr = None
    if ptr is not None and ptr != host.data_ptr():
        log.info("zero-copy: the device maps the pinned host memory at another address than the host's")
    try:
        view = torch.as_tensor(_Mapped(ptr or host.data_ptr(), host.numel(), host), device=device)
        ok = reads_back(host, view)
    except (RuntimeError, TypeError) as e:
        log.warning("zero-copy: pinned host memory (%.2f GB) not mapped into the device (%s): gathered on the host",
                    host.numel() / 1e9, e)
        return None
    if not ok:
        log.warning("zero-copy: the device view of pinned host memory (%.2f GB) does not read back what the "
                    "host wrote: gathered on the host", host.numel() / 1e9)
        return None
    return view


def reads_back(host: torch.Tensor, view: torch.Tensor) -> bool:
    """A pattern written on the host reads back through `view` with the gather kernel the fetch uses
    (once, when the store is made: a device sync)."""
    n = min(host.numel(), 64)
    probe = torch.arange(1, n + 1, dtype=torch.uint8)
    for at in {0, host.numel() - n}:
        saved = host[at:at + n].clone()
        host[at:at + n] = probe
        idx = torch.arange(at, at + n, device=view.device)
        got = torch.index_select(view, 0, idx).cpu()
        host[at:at + n] = saved
        if not torch.equal(got, probe):
            return False
    return True
