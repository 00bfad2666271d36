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

`early` registers ranges before their reads complete, on a thread of its own that waits for a slot like
any reader: the fill gives it the ranges it reads last, so that they are pinned before those reads end
rather than queued behind them (worker.stream.fill, `PIN_EARLY`). A range's `ready` waits for both
its reads and its registration. Registered fresh, a range's pages are faulted in under the driver's
lock, and the readers' ranges queued behind that (setup_h200/v7, AA); so the fill's `prepare` faults
them in first, on the early thread, outside the lock.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from typing import Any

log = logging.getLogger(__name__)


class Registrar:
    def __init__(self, pin: Callable[[Any], float], slots: int):
        self._pin = pin  # registers a unit's view; returns the seconds it took
        self._slots = threading.Semaphore(slots) if slots > 0 else None
        self._queue: deque = deque()
        self._lock = threading.Lock()
        self.seconds = 0.0  # summed over the registrations

    def when_read(self, unit, failure: list[BaseException], early: bool = False) -> Callable[[], None] | None:
        """Register `unit` once all its reads are done (on the thread that completes the last, or a
        slot holder's), then set its `ready`: with the registration's failure, a read's, or for reads
        cancelled by the fill's `_drain` the fill's (CancelledError after `Filled.cancel()`). With
        `early` the caller registers it instead, whenever it likes, by calling what this returns."""
        unit.failure = failure
        left = [len(unit.reads) + early]
        errors: list[BaseException] = []

        def settle() -> None:  # under self._lock: one more of the unit's parts done
            left[0] -= 1

        def finish() -> None:
            if errors:
                unit.ready.set_exception(errors[0])
            elif early:
                unit.ready.set_result(None)
            else:
                self._offer(unit)

        def done(f: Future) -> None:
            with self._lock:
                if f.cancelled():
                    errors.append(unit.failure[0] if unit.failure else CancelledError())
                elif f.exception() is not None:
                    errors.append(f.exception())
                settle()
                if left[0]:
                    return
            finish()

        def register_now() -> None:
            self._hold()
            try:
                if unit.failure:  # the fill failed already: nothing to pin for
                    error: BaseException | None = unit.failure[0]
                else:
                    error = self._pinned(unit)
                with self._lock:
                    if error is not None:
                        errors.append(error)
                    settle()
                    last = not left[0]
                self._drain_queue()
            finally:
                if self._slots is not None:
                    self._slots.release()
            self._offer_queued()
            if last:
                finish()

        for f in unit.reads:
            f.add_done_callback(done)
        return register_now if early else None

    def early(self, units, failure: list[BaseException], prepare: Callable[[Any], Any] | None = None) -> threading.Thread:
        """Register `units` now, in order, on a thread of its own (started here; join it or not: every
        unit's `ready` is set either way), each `ready` once its reads are done as well. `prepare(unit)`
        runs on that thread before the unit takes a slot (the fill faults the range's pages in there,
        outside the driver's lock); its failure is ignored: the registration faults them in then."""
        calls = [(u, self.when_read(u, failure, early=True)) for u in units]

        def run() -> None:
            for u, register in calls:
                if prepare is not None and not failure:
                    try:
                        prepare(u)
                    except Exception as e:  # noqa: BLE001 - best effort, see above
                        log.debug("early registration: preparing a range failed (%s); registering it as it is", e)
                register()

        thread = threading.Thread(target=run, name="cpu-fill-early", daemon=True)
        thread.start()
        return thread

    def _offer(self, unit) -> None:
        if self._slots is None:
            self._register(unit)
            return
        self._queue.append(unit)
        self._offer_queued()

    def _offer_queued(self) -> None:
        """Register what is queued while a slot is free (a slot holder that gives it back looks again)."""
        while self._queue and self._slots is not None and self._slots.acquire(blocking=False):
            try:
                self._drain_queue()
            finally:
                self._slots.release()

    def _hold(self) -> None:
        if self._slots is not None:
            self._slots.acquire()

    def _drain_queue(self) -> None:
        for queued in iter(self._next, None):
            self._register(queued)

    def _next(self):
        """The next queued unit, or None: another slot holder may have taken the last one meanwhile."""
        try:
            return self._queue.popleft()
        except IndexError:
            return None

    def _register(self, unit) -> None:
        error = self._pinned(unit)
        if error is not None:
            unit.ready.set_exception(error)
        else:
            unit.ready.set_result(None)

    def _pinned(self, unit) -> BaseException | None:
        """Register the unit's view; the failure, if any (a callback's exception would only be logged)."""
        try:
            seconds = self._pin(unit.view)
        except BaseException as e:  # noqa: BLE001 - it goes to `ready`
            return e
        with self._lock:
            self.seconds += seconds
        return None
