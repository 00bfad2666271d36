"""Clocks for the measured phases: CUDA events on the compute stream, the host clock on CPU.

Marks are cheap and never synchronize; `sync()` is called only at phase boundaries, and elapsed
times are read after the run, so timing does not disturb the pipeline it measures.
"""

from __future__ import annotations

import time

import torch


class Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def ms(self, a, b) -> float:
        """Milliseconds between two marks (after a sync on CUDA)."""
        if self.cuda:
            return float(a.elapsed_time(b))
        return (b - a) * 1e3


def host_ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3
