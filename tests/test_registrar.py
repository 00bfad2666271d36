"""worker.stream.registrar: a fill's ranges registered on the reader threads as their reads complete,
at most `slots` at once, none left behind, failures to the range's `ready`."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import pytest

from worker.stream.registrar import Registrar


@dataclass
class Unit:
    view: int
    reads: list[Future]
    ready: Future = field(default_factory=Future)
    failure: list | None = None


class CountingPin:
    """Stands in for cudaHostRegister: records how many run at once; `meet` makes two calls wait for
    each other (a short timeout), so overlapping registrations show where they are allowed."""

    def __init__(self, seconds: float = 0.002, meet: bool = False):
        self.seconds, self.now, self.most, self.views = seconds, 0, 0, []
        self.lock = threading.Lock()
        self.barrier = threading.Barrier(2) if meet else None

    def __call__(self, view) -> float:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
            self.views.append(view)
        if self.barrier is not None:
            try:
                self.barrier.wait(0.5)
            except threading.BrokenBarrierError:
                self.barrier.reset()
        time.sleep(self.seconds)
        with self.lock:
            self.now -= 1
        return self.seconds


def _complete_from_threads(units, threads: int = 8, fail: set | None = None) -> None:
    """Every read's result set from one of `threads` threads, in a shuffled order."""
    reads = [(u, f) for u in units for f in u.reads]
    random.Random(0).shuffle(reads)
    parts = [reads[i::threads] for i in range(threads)]

    def run(part):
        for u, f in part:
            if fail and u.view in fail:
                f.set_exception(OSError(f"read of {u.view} failed"))
            else:
                f.set_result(None)

    ts = [threading.Thread(target=run, args=(p,)) for p in parts]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


@pytest.mark.parametrize("slots", [1, 2])
def test_at_most_slots_registrations_run_at_once_and_every_range_is_registered(slots):
    pin = CountingPin()
    reg = Registrar(pin, slots)
    units = [Unit(i, [Future() for _ in range(1 + i % 3)]) for i in range(40)]
    for u in units:
        reg.when_read(u, [])
    _complete_from_threads(units)
    for u in units:
        assert u.ready.result(5) is None
    assert sorted(pin.views) == list(range(40)) and 1 <= pin.most <= slots
    assert reg.seconds == pytest.approx(40 * pin.seconds)


def test_without_slots_every_reader_registers_at_once():
    """slots 0 is the fill before the slots: two readers completing ranges register side by side."""
    pin = CountingPin(meet=True)
    reg = Registrar(pin, 0)
    units = [Unit(i, [Future()]) for i in range(8)]
    for u in units:
        reg.when_read(u, [])
    _complete_from_threads(units)
    assert all(u.ready.result(5) is None for u in units) and pin.most >= 2


def test_a_failed_read_or_registration_goes_to_its_range_and_the_rest_are_registered():
    def pin(view):
        if view == 3:
            raise RuntimeError("cudaHostRegister failed (stand-in)")
        return 0.0

    reg = Registrar(pin, 1)
    units = [Unit(i, [Future(), Future()]) for i in range(10)]
    for u in units:
        reg.when_read(u, [])
    _complete_from_threads(units, fail={5})
    with pytest.raises(RuntimeError, match="stand-in"):
        units[3].ready.result(5)
    with pytest.raises(OSError, match="read of 5"):
        units[5].ready.result(5)
    assert all(u.ready.result(5) is None for u in units if u.view not in (3, 5))
