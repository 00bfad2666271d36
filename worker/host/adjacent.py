"""The SSD figure of a run's floor, measured next to the run with the SSD tier's own reader.

The host probe measures the disk once per host and caches it; the lent machines' virtual disks drift
by tens of percent over minutes, so an SSD-bound run judged against that figure can "beat" its floor
(an 8-layer `ssd` run on the H200 printed attainment 1.26: probe 1.69 GB/s, the tier then read 1.98).
Here the disk is measured twice per run, inside the run's device lock: a short window just before the
engine is built and one just after it is closed, outside the measured round. Each window reads the
run's own blob exactly as the SSD tier does: an `SSDReader` with the run's `ssd_readers` threads and
`staging_mb` requests, O_DIRECT into page-aligned `HostArena` buffers (pinned on CUDA, all of them
before the first read), the groups the run streams from the SSD in consumption order, `2 × ssd_readers`
requests in flight (the staging pool's minimum, so a reader never waits for the loop to hand it the
next one). The rate is bytes over the
reader channel's busy time, the counter behind the run's own `ssd_read` figure. A window ends after
`seconds` or after one pass over those extents, whichever comes first: a small blob on a fast disk
is read once, never re-read within a window.

`floor_ssd` combines the two windows: the floor takes the higher rate (see there for why) and the row
records both and their spread. Tests that need a disk slower than the run read replace `measure` on
this module (worker.run calls it as `adjacent.measure`): the one documented hook.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any

import torch

from worker.pack.groups import KINDS, GroupKey
from worker.stream.hostmem import HostArena
from worker.stream.plan import Placement
from worker.stream.ssd import SSDReader
from worker.units import GB

log = logging.getLogger(__name__)

SSD_HOMES = ("ssd", "ring")  # homes read from the SSD every pass (worker.stream.plan)


def ssd_extents(manifest, placement: Placement) -> list[tuple[int, int]]:
    """(offset, nbytes) of every group the placement reads from the SSD each pass, in consumption
    order; empty when the run does not stream from the SSD (gpu and cpu modes)."""
    return [(g.offset, g.nbytes) for layer, home in enumerate(placement.home) if home in SSD_HOMES
            for g in (manifest.group(GroupKey(layer, k).name) for k in KINDS)]


def measure(blob_path: str, extents: list[tuple[int, int]], threads: int, chunk: int, seconds: float,
            device: torch.device) -> dict[str, Any]:
    """One window: the SSD tier's reads of `extents` for at most `seconds` (see the module docstring).
    Returns {gbps, bytes, busy_s, wall_s, direct}; gbps is None when nothing was read."""
    reader = SSDReader(blob_path, threads, chunk)
    arena = HostArena(pin=device.type == "cuda")
    try:
        todo = [(off + o, min(chunk, n - o)) for off, n in extents for o in range(0, n, chunk)]
        size = max((n for _, n in todo), default=0)  # a chunk, or the largest group where groups are smaller
        bufs = [arena.empty(size) for _ in range(min(2 * threads, len(todo)))]  # (size,) uint8, page-aligned
        pieces = iter(todo)
        t0 = time.perf_counter()
        deadline = t0 + seconds
        inflight: dict[Future, torch.Tensor] = {}

        def submit(buf: torch.Tensor) -> None:
            piece = next(pieces, None) if time.perf_counter() < deadline else None
            if piece is not None:
                inflight[reader.read(piece[0], piece[1], buf[:piece[1]])] = buf

        for buf in bufs:
            submit(buf)
        while inflight:
            done, _ = wait(inflight, return_when=FIRST_COMPLETED)
            for fut in done:
                fut.result()
                submit(inflight.pop(fut))
        stats = reader.channel.stats() or {}
        return {"gbps": stats.get("gbps"), "bytes": stats.get("bytes", 0), "busy_s": stats.get("busy_s", 0.0),
                "wall_s": time.perf_counter() - t0, "direct": reader.direct}
    finally:
        reader.close()
        arena.close()


def spread(a: float | None, b: float | None) -> float | None:
    """|a − b| / mean(a, b): how far the disk drifted between the two windows."""
    if not a or not b:
        return None
    return abs(a - b) / ((a + b) / 2)


def floor_ssd(before: dict[str, Any] | None, after: dict[str, Any] | None) -> float | None:
    """The SSD rate the floor uses: the higher of the two windows.

    A floor is a lower bound on the run's time, so it wants the best rate the disk was seen to deliver
    next to the run: a mean, or the slower window, is a rate the disk beat at least once around the run,
    and a run that streamed at the faster one would "beat" a floor built on it. The spread between the
    windows (`spread`) says how far attainment can be trusted on a drifting disk."""
    rates = [w["gbps"] for w in (before, after) if w and w.get("gbps")]
    return max(rates) if rates else None


def record(before: dict[str, Any] | None, after: dict[str, Any] | None, seconds: float, threads: int,
           chunk: int) -> dict[str, Any]:
    """What the run JSON keeps of the two windows (roofline["ssd_adjacent"])."""
    rate = lambda w: w.get("gbps") if w else None  # noqa: E731
    return {"before": before, "after": after, "window_s": seconds, "threads": threads, "chunk_bytes": chunk,
            "before_gbps": rate(before), "after_gbps": rate(after), "floor_gbps": floor_ssd(before, after),
            "spread": spread(rate(before), rate(after))}


def describe(window: dict[str, Any] | None) -> str:
    if not window or not window.get("gbps"):
        return "nothing read"
    return f"{window['gbps']:.2f} GB/s ({window['bytes'] / GB:.2f} GB in {window['busy_s']:.2f} s)"
