"""The CPU tier: layers in pinned RAM, either a fixed subset or the seed's rolling ring.

`FixedTier` loads its layers once (cpu mode, and the `pinned-subset` policy), through `fill`, before the
build goes on or, with `fill_behind`, behind it. `RingTier` is the
seed's rolling window: `slots` layer buffers that a loader thread refills from the SSD ahead of the
compute, cyclically (`wrap_around`), `stride` layers at a time. A slot is refilled only after the GPU
copy of its layer finished and, with `roll_sync`, once the compute has moved `offset` layers past
the window's anchor (the seed's ring anchored at current layer + offset).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from worker.pack.groups import KINDS, GroupKey
from worker.stream.fill import fill
from worker.stream.hostmem import HostArena
from worker.stream.pieces import Piece
from worker.stream.ssd import SSDReader

log = logging.getLogger(__name__)


class FixedTier:
    """`behind`: the fill runs on behind the caller (worker.stream.fill), each piece ready once its
    range is read and pinned; `settle()` waits for the whole of it."""

    def __init__(self, manifest, layers: list[int], arena: HostArena, reader: SSDReader, populate: bool = False,
                 behind: bool = False, release: Callable[[], None] | None = None):
        # 2 MiB pages: from the page cache the fill faulted 4 KiB pages in slower than it read them
        # (benchmarks/results/README.md, cpu_fill rows); from the disk no different
        self.filled = fill(manifest, [GroupKey(i, k) for i in layers for k in KINDS], arena, reader, huge_pages=True,
                           populate=populate, behind=behind, release=release)
        self.host = self.filled.host
        self.behind = behind
        log.info("CPU tier: %d layers %s (%.2f GB)", len(layers), "being pinned" if behind else "pinned",
                 self.filled.stats.bytes / 1e9)

    @property
    def fill_stats(self) -> dict[str, Any] | None:
        """io_stats()["cpu_fill"]; None while a fill behind is still running."""
        return self.filled.stats.to_dict() if self.filled.done.done() and not self.filled.done.exception() else None

    def settle(self) -> dict[str, Any]:
        """Wait for the fill to end (raising what it raised); its stats."""
        self.filled.done.result()
        return self.filled.stats.to_dict()

    def pieces(self, key: GroupKey) -> list[Piece]:
        """One piece per registered range: each GPU copy reads from a single registration."""
        return [Piece(view, offset, ready if self.behind else None) for offset, view, ready in self.filled.pieces(key)]

    def close(self) -> None:
        self.filled.cancel()  # a fill behind still in flight: its reads and pinning end before the arena goes


class _RingSlot:
    def __init__(self, buf: torch.Tensor):
        self.buf = buf
        self.layer: int | None = None
        self.loaded: Future | None = None
        self.copied: dict[str, object] = {}  # kind → copy event
        self.pass_no = -1


class RingTier:
    def __init__(self, manifest, layers: list[int], slots: int, arena: HostArena, reader: SSDReader,
                 offset: int, wrap_around: bool, stride: int, roll_sync: bool):
        self.manifest, self.layers, self.reader = manifest, layers, reader
        self.offset, self.wrap, self.stride, self.sync = offset, wrap_around, min(stride, slots), roll_sync
        self.extent = {k: max(manifest.group(GroupKey(i, k).name).nbytes for i in layers) for k in KINDS}
        self.slots = [_RingSlot(arena.empty(self.extent["attn"] + self.extent["ffn"])) for _ in range(slots)]
        self._cond = threading.Condition()
        self._by_step: dict[int, _RingSlot] = {}  # global ring step (pass * len(layers) + j) → slot
        self._computed = -1  # last global step whose compute released its ffn group
        self._fetch_step = {KINDS[0]: 0, KINDS[1]: 0}  # next global step the GPU tier copies, per kind
        self._stop = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loader, name="ring-loader", daemon=True)
        self._thread.start()

    # ---- loader ---------------------------------------------------------------------------------

    def _reusable(self, slot: _RingSlot, step: int) -> bool:
        """May `slot` (holding an older step) be refilled for `step`?"""
        if slot.layer is None:
            return True
        old = step - len(self.slots)  # the step this slot held
        if len(slot.copied) < len(KINDS):
            return False
        if self.sync and self._computed < old + self.offset:
            return False
        if not self.wrap and (step // len(self.layers)) > (self._computed + 1) // len(self.layers):
            return False  # without wrap-around the next pass is not read before the compute reaches it
        return True

    def _loader(self) -> None:
        try:
            first, n = 0, len(self.layers)
            while True:
                # `stride` layers at a time, never across a pass boundary (which may have to wait)
                batch = range(first, min(first + self.stride, (first // n + 1) * n))
                first = batch.stop
                with self._cond:
                    while not all(self._reusable(self.slots[s % len(self.slots)], s) for s in batch):
                        if self._stop:
                            return
                        self._cond.wait(timeout=0.5)
                for step in batch:
                    self._load(step)
        except BaseException as e:  # surfaced to the compute thread by pieces()
            self._error = e
            with self._cond:
                self._cond.notify_all()

    def _load(self, step: int) -> None:
        slot = self.slots[step % len(self.slots)]
        for ev in slot.copied.values():
            ev.synchronize()  # the previous layer's GPU copies must have finished reading this buffer
        layer = self.layers[step % len(self.layers)]
        futures = []
        for kind in KINDS:
            g = self.manifest.group(GroupKey(layer, kind).name)
            start = self._start(kind)
            futures += self.reader.read_split(g.offset, g.nbytes, slot.buf[start:start + g.nbytes])
        done: Future = Future()
        pending = [len(futures)]
        lock = threading.Lock()

        def one_done(_f) -> None:
            with lock:
                pending[0] -= 1
                if pending[0] == 0:
                    err = next((f.exception() for f in futures if f.exception()), None)
                    done.set_exception(err) if err else done.set_result(None)

        with self._cond:
            slot.layer, slot.loaded, slot.copied = layer, done, {}
            self._by_step[step] = slot
            self._cond.notify_all()
        for f in futures:
            f.add_done_callback(one_done)

    def _start(self, kind: str) -> int:
        """Where a kind's extent sits in a ring slot: attn first, ffn after the largest attn."""
        return 0 if kind == KINDS[0] else self.extent[KINDS[0]]

    # ---- GPU tier side --------------------------------------------------------------------------

    def pieces(self, key: GroupKey) -> list[Piece]:
        step = self._fetch_step[key.kind]
        self._fetch_step[key.kind] += 1
        with self._cond:
            while step not in self._by_step:
                if self._error:
                    raise self._error
                if self._stop:
                    raise RuntimeError("ring tier closed")
                self._cond.wait(timeout=0.5)
            slot = self._by_step[step]
        assert slot.layer == key.layer, (slot.layer, key)
        g = self.manifest.group(key.name)
        start = self._start(key.kind)

        def copied(event, slot=slot, kind=key.kind, step=step) -> None:
            with self._cond:
                slot.copied[kind] = event
                if len(slot.copied) == len(KINDS):
                    self._by_step.pop(step, None)
                self._cond.notify_all()

        return [Piece(slot.buf[start:start + g.nbytes], 0, slot.loaded, copied)]

    def staged_bytes(self) -> int:
        """Bytes of layers loaded into ring slots and not yet copied to the GPU."""
        with self._cond:
            slots = [s for s in self._by_step.values() if s.loaded is not None and s.loaded.done()]
        return sum(self.manifest.group(GroupKey(s.layer, k).name).nbytes
                   for s in slots for k in KINDS if k not in s.copied)

    def computed(self, layer: int, passes: int) -> None:
        """The compute released `layer`'s ffn group in pass `passes`."""
        with self._cond:
            self._computed = passes * len(self.layers) + self.layers.index(layer)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=5)
