"""Streams and events on CUDA, with synchronous stand-ins on CPU.

On a CPU "device" every copy completes before the call returns, so an event is done as soon as it is
recorded and waiting on it is a no-op: the same pipeline (threads, slots, ordering) runs in CI.
"""

from __future__ import annotations

import torch


class _DoneEvent:
    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class Sync:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def stream(self):
        return torch.cuda.Stream(self.device) if self.cuda else None

    def event(self, timing: bool = False):
        return torch.cuda.Event(enable_timing=timing) if self.cuda else _DoneEvent()

    def record(self, stream=None):
        """A new event recorded on `stream` (the current stream when None)."""
        ev = self.event()
        if self.cuda:
            ev.record(stream or torch.cuda.current_stream(self.device))
        return ev

    def wait(self, event, stream=None) -> None:
        """Make `stream` (current when None) wait for `event` on the device; the host does not block."""
        if self.cuda and event is not None:
            (stream or torch.cuda.current_stream(self.device)).wait_event(event)

    def use(self, stream):
        """Context manager selecting `stream` for the calling thread's work."""
        return torch.cuda.stream(stream) if self.cuda else _Null()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
