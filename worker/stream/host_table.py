"""The embedding table a streaming mode keeps in host memory, made readable by the GPU where it lies.

Why: the streamer leaves an untied embedding table on the host (`upload`: GPU memory goes to the
weight slots), and a forward over a host table gathers on the host: the step's token ids come back
from the device (a sync every decode step), the CPU gathers their rows and a pageable copy takes
them up, behind whatever the copy engine is moving. That host thread is the one that releases the
weight slots, so while it waits the fetch thread runs out of room and the weight copies stop: on an
H200 that cost a 70B int4 decode at batch 16 its I/O floor (py-spy and the fetch thread's timeline:
benchmarks/results/quant_h200/v5). Page-locked and mapped into the device's address space
(`worker.kv.zerocopy.device_view`, the same mapping the top-k KV tier reads), the table is a CUDA
tensor over the host bytes: the model's ordinary gather reads the rows it names across PCIe with the
ids still on the device, and the host never waits. A gather copies bits, so the logits do not change.
Where the mapping cannot be made the host gather stays, and the log says why.
"""

from __future__ import annotations

import logging

import torch

from worker.kv import zerocopy
from worker.stream.hostmem import HostArena

log = logging.getLogger(__name__)


def map_host_table(table: torch.Tensor, arena: HostArena, device: torch.device) -> torch.Tensor:
    """`table` on the host → the same bytes as a tensor on `device` (registered in `arena`, so its
    `close()` unregisters them; the caller keeps `table`'s memory alive until then), or `table`
    itself where there is nothing to map (a table already on the device, a CPU device) or the device
    cannot read it."""
    if device.type != "cuda" or table.device.type != "cpu" or not arena.pins:
        return table
    if not table.is_contiguous():
        log.warning("embedding table on the host is not contiguous: gathered on the host")
        return table
    raw = table.view(-1).view(torch.uint8)
    try:
        arena.pin(raw)
    except RuntimeError as e:
        log.warning("embedding table not page-locked (%s): gathered on the host", e)
        return table
    view = zerocopy.device_view(raw, device)
    if view is None:
        return table
    return view.view(table.dtype).view(table.shape)
