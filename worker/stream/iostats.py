"""Per-channel I/O accounting: bytes moved and the time the channel was busy; and `Waits`, the time a
thread that feeds a channel spent waiting, per named wait.

Busy time is wall time with at least one transfer in flight (not the sum over threads), so
bytes / busy is the bandwidth the channel actually delivered while in use. For host-timed transfers
`mean_inflight` is how many were in flight on average while it was busy: a disk read below its
probed rate with a full queue (the reader's threads) was the disk's doing, with a thin one the
feeder's. Device copies are timed
with CUDA events on their stream and resolved only when stats are read, keeping the hot path free
of host syncs.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from torch.autograd import profiler as _autograd_profiler
from torch.profiler import record_function


def _profiling() -> bool:
    return getattr(_autograd_profiler, "_is_profiler_enabled", True)


class Channel:
    def __init__(self, name: str):
        self.name = name
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Start counting afresh; transfers in flight keep counting from now."""
        with self._lock:
            self.bytes = 0
            self.busy_s = 0.0
            self.untimed = 0  # bytes moved where no clock could time them (CUDA graph replays)
            self._inflight = getattr(self, "_inflight", 0)
            self._since = self._last = time.perf_counter()
            self._inflight_s = 0.0  # ∫ transfers in flight dt, host-timed transfers
            self._spans: list[tuple[Any, Any]] = []

    def _advance(self, now: float) -> None:
        self._inflight_s += self._inflight * (now - self._last)
        self._last = now

    # host-timed transfers (SSD reads, CPU-device copies): overlapping spans count once
    def begin(self) -> None:
        with self._lock:
            now = time.perf_counter()
            self._advance(now)
            if self._inflight == 0:
                self._since = now
            self._inflight += 1

    def end(self, nbytes: int) -> None:
        with self._lock:
            now = time.perf_counter()
            self._advance(now)
            self._inflight -= 1
            self.bytes += nbytes
            if self._inflight == 0:
                self.busy_s += now - self._since

    # device-timed transfers on one stream (serialized, so spans add up)
    def add_device(self, nbytes: int, start, end) -> None:
        with self._lock:
            self.bytes += nbytes
            self._spans.append((start, end))

    def add_untimed(self, nbytes: int) -> None:
        """Bytes moved inside a CUDA graph: counted, but they take no part in the channel's rate."""
        with self._lock:
            self.untimed += nbytes

    def stats(self) -> dict[str, float] | None:
        with self._lock:
            for _, end in self._spans:
                end.synchronize()  # copies fetched ahead may still be in flight when stats are read
            now = time.perf_counter()
            host_busy = self.busy_s + (now - self._since if self._inflight > 0 else 0.0)  # a channel that never
            busy = host_busy + sum(s.elapsed_time(e) for s, e in self._spans) / 1e3  # went idle is busy until now
            if self.bytes + self.untimed == 0:
                return None
            out = {"bytes": self.bytes + self.untimed, "busy_s": busy,
                   "gbps": self.bytes / busy / 1e9 if busy > 0 and self.bytes else None}
            in_flight = self._inflight_s + self._inflight * (now - self._last)
            if host_busy > 0 and in_flight > 0:
                out["mean_inflight"] = in_flight / host_busy
            if self.untimed:  # busy_s and gbps are the timed transfers' alone
                out["untimed_bytes"] = self.untimed
            return out


class Waits:
    """Seconds one thread spent in each of its named waits since the last reset; each wait is also a
    named profiler range (`prefix.name`), so a trace shows which wait held the thread and when.

    The weight streamer's fetch thread reports these (`io.weight_h2d.fetch_waits_s`): when the copy
    stream is the bound its time goes to waiting for the copy engine (`backlog`); a large `room` means
    the compute's host side ran behind, `slot` a slot still being read, and the time left over
    (`since_reset` minus the waits) went to issuing copies or to waiting for the interpreter."""

    def __init__(self, prefix: str, names: tuple[str, ...]):
        self.prefix, self.names = prefix, names
        self.reset()

    def reset(self) -> None:
        self._seconds: collections.Counter = collections.Counter()
        self._since = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            # the range only while a profiler records: entering one costs ~10 us of interpreter time
            # (CPU VM), which the fetch thread would otherwise spend three times per group
            with record_function(f"{self.prefix}.{name}") if _profiling() else contextlib.nullcontext():
                yield
        finally:
            self._seconds[name] += time.perf_counter() - t0

    def stats(self) -> dict[str, float]:
        return {**{n: self._seconds[n] for n in self.names}, "since_reset": time.perf_counter() - self._since}
