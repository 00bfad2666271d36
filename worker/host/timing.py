"""Clocks for the measured phases, and named host-time spans for benchmarks that ask where time goes.

Marks are cheap and never synchronize; `sync()` is called only at phase boundaries, and elapsed
times are read after the run, so timing does not disturb the pipeline it measures.

Spans: the engine marks a few host-side steps of its hot path, `t0 = span_start()` ...
`span_end("kv.topk", t0)`. They record nothing unless a benchmark installs a `SpanRecorder` with
`recording()`; until then a span is two calls, and `span_start` only checks a module global. Not
a `with` block: entering and leaving even a shared `nullcontext` costs about three times as much
(measured: benchmarks/results/README.md).

The names are public API (benchmarks/topk_offload_profile.py prints them, tests/test_timing.py checks
that a run records them). On the compute thread: `kv.decode` (all of a layer's decode-step KV work
in the paged cache), within it `kv.exact` or `kv.topk` (assemble or select, and attend) and
`kv.ready` (waiting for the KV worker to have issued the layer's fetch); `kv.fetch` (one layer's
fetch job: on the KV worker, or inline on the compute thread, within `kv.decode`, where the job is
device work only: the CPU tier, `worker.kv.offload`) and within it `kv.candidates` (gathering the
device-chosen top-k blocks on the host: the SSD tier, or a CPU tier the device cannot map).
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Iterator

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


# ---- named host-time spans ----------------------------------------------------------------------


class SpanRecorder:
    """Host seconds and calls per span name, summed over every thread that ran one (the compute
    thread and the KV worker alike)."""

    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] += seconds
            self.calls[name] += 1

    def reset(self) -> None:
        """Forget what was recorded (at a run's "measure" phase: what is left is the measured round's)."""
        with self._lock:
            self.seconds.clear()
            self.calls.clear()


_recorder: SpanRecorder | None = None  # installed by `recording`; None: spans record nothing


def span_start() -> float | None:
    """The start of a span: the host clock while a recorder is installed, else None."""
    return None if _recorder is None else time.perf_counter()


def span_end(name: str, t0: float | None) -> None:
    """Record the host time since `t0` (from `span_start`) under `name`; nothing when `t0` is None."""
    if t0 is None:
        return
    rec = _recorder
    if rec is not None:  # the recorder may have been removed since the span started
        rec.add(name, time.perf_counter() - t0)


@contextlib.contextmanager
def recording(recorder: SpanRecorder | None = None) -> Iterator[SpanRecorder]:
    """Install `recorder` (a new one by default) for the block; the one before comes back after it."""
    global _recorder
    rec = recorder if recorder is not None else SpanRecorder()
    before, _recorder = _recorder, rec
    try:
        yield rec
    finally:
        _recorder = before
