"""Per-channel I/O accounting: bytes moved and the time the channel was busy.

Busy time is wall time with at least one transfer in flight (not the sum over threads), so
bytes / busy is the bandwidth the channel actually delivered while in use. Device copies are timed
with CUDA events on their stream and resolved only when stats are read, keeping the hot path free
of host syncs.
"""

from __future__ import annotations

import threading
import time
from typing import Any


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
            self._since = time.perf_counter()
            self._spans: list[tuple[Any, Any]] = []

    # host-timed transfers (SSD reads, CPU-device copies): overlapping spans count once
    def begin(self) -> None:
        with self._lock:
            if self._inflight == 0:
                self._since = time.perf_counter()
            self._inflight += 1

    def end(self, nbytes: int) -> None:
        with self._lock:
            self._inflight -= 1
            self.bytes += nbytes
            if self._inflight == 0:
                self.busy_s += time.perf_counter() - self._since

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
            busy = self.busy_s + sum(s.elapsed_time(e) for s, e in self._spans) / 1e3
            if self._inflight > 0:  # a channel that never went idle (the bottleneck) is busy until now
                busy += time.perf_counter() - self._since
            if self.bytes + self.untimed == 0:
                return None
            out = {"bytes": self.bytes + self.untimed, "busy_s": busy,
                   "gbps": self.bytes / busy / 1e9 if busy > 0 and self.bytes else None}
            if self.untimed:  # busy_s and gbps are the timed transfers' alone
                out["untimed_bytes"] = self.untimed
            return out
