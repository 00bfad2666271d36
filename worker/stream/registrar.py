"""Registering a fill's ranges on the reader threads as their reads complete, a few at a time.

The reader thread whose read completes a range registers it (worker.stream.fill says why not a
thread of its own). Registrations beside each other slow each other down: on the H200 one range of
256 MiB alone took 2-3 ms, four at once 8-67 ms each (benchmarks/results/setup_h200/v7, T), and a
reader waiting there reads nothing; with one at a time they took 8 ms and 0.31-0.39 s of the
readers' time in a fill, against 0.69-1.21 s (U). So at most `slots` registrations run at once: a
reader that completes a range while every slot is taken queues it and goes back to reading, and
whoever holds a slot registers what is queued before it gives the slot back (it looks again after
giving it back, so a range queued meanwhile is never left behind). `slots` 0: every reader registers
its own ranges at once, as before.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from typing import Any


class Registrar:
    def __init__(self, pin: Callable[[Any], float], slots: int):
        self._pin = pin  # registers a unit's view; returns the seconds it took
        self._slots = threading.Semaphore(slots) if slots > 0 else None
        self._queue: deque = deque()
        self._lock = threading.Lock()
        self.seconds = 0.0  # summed over the registrations

    def when_read(self, unit, failure: list[BaseException]) -> None:
        """Register `unit` once all its reads are done (on the thread that completes the last, or a
        slot holder's), then set its `ready`: with the registration's failure, a read's, or for reads
        cancelled by the fill's `_drain` the fill's (CancelledError after `Filled.cancel()`)."""
        unit.failure = failure
        left = [len(unit.reads)]
        errors: list[BaseException] = []

        def done(f: Future) -> None:
            with self._lock:
                if f.cancelled():
                    errors.append(unit.failure[0] if unit.failure else CancelledError())
                elif f.exception() is not None:
                    errors.append(f.exception())
                left[0] -= 1
                if left[0]:
                    return
            if errors:
                unit.ready.set_exception(errors[0])
            else:
                self._offer(unit)

        for f in unit.reads:
            f.add_done_callback(done)

    def _offer(self, unit) -> None:
        if self._slots is None:
            self._register(unit)
            return
        self._queue.append(unit)
        while self._queue and self._slots.acquire(blocking=False):
            try:
                for queued in iter(self._next, None):
                    self._register(queued)
            finally:
                self._slots.release()

    def _next(self):
        """The next queued unit, or None: another slot holder may have taken the last one meanwhile."""
        try:
            return self._queue.popleft()
        except IndexError:
            return None

    def _register(self, unit) -> None:
        try:
            seconds = self._pin(unit.view)
            with self._lock:
                self.seconds += seconds
        except BaseException as e:  # noqa: BLE001 - a callback's exception would only be logged: it goes to `ready`
            unit.ready.set_exception(e)
        else:
            unit.ready.set_result(None)
