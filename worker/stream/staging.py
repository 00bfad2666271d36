"""SSD → staging → GPU for groups with no home in RAM (ssd mode, and SSD layers of mixed mode).

A dispatcher thread walks the streamed SSD groups in consumption order, cyclically, and reads each
in `chunk`-sized pieces into a pool of pinned staging buffers: reads run as far ahead as the pool
allows, so the SSD never waits for the compute. Pieces are handed to the GPU tier one by one (not per
group), so a pool smaller than a group cannot deadlock; a buffer is reused only after the GPU copy
out of it finished.
"""

from __future__ import annotations

import itertools
import queue
import threading

import torch

from worker.pack.groups import GroupKey
from worker.stream.hostmem import HostArena
from worker.stream.pieces import Piece
from worker.stream.ssd import SSDReader


class DirectStager:
    def __init__(self, manifest, order: list[GroupKey], reader: SSDReader, arena: HostArena, n_buffers: int):
        self.manifest, self.order, self.reader = manifest, order, reader
        self._free: queue.Queue = queue.Queue()
        for _ in range(n_buffers):
            self._free.put((arena.empty(reader.chunk), None))
        self._out: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._dispatch, name="ssd-stager", daemon=True)
        self._thread.start()

    def _dispatch(self) -> None:
        try:
            for key in itertools.cycle(self.order):
                g = self.manifest.group(key.name)
                for off in range(0, g.nbytes, self.reader.chunk):
                    n = min(self.reader.chunk, g.nbytes - off)
                    item = self._take()
                    if item is None:
                        return
                    buf, last_copy = item
                    if last_copy is not None:
                        last_copy.synchronize()  # the GPU copy out of this buffer has finished
                    fut = self.reader.read(g.offset + off, n, buf[:n])
                    self._out.put((key, off + n >= g.nbytes, Piece(buf[:n], off, fut, self._returner(buf))))
        except BaseException as e:  # surfaced to the GPU tier
            self._out.put(e)

    def _take(self):
        while not self._stop.is_set():
            try:
                return self._free.get(timeout=0.5)
            except queue.Empty:
                continue
        return None

    def _returner(self, buf: torch.Tensor):
        return lambda event: self._free.put((buf, event))

    def staged_bytes(self) -> int:
        """Bytes read ahead and waiting in staging buffers."""
        with self._out.mutex:
            items = list(self._out.queue)
        return sum(it[2].host.numel() for it in items if not isinstance(it, BaseException) and it[2].ready.done())

    def pieces(self, key: GroupKey):
        """The group's pieces in order, yielded as they are dispatched."""
        while True:
            try:
                item = self._out.get(timeout=0.5)
            except queue.Empty:
                if self._stop.is_set():
                    raise RuntimeError("SSD stager closed")
                continue
            if isinstance(item, BaseException):
                raise item
            got, last, piece = item
            assert got == key, (got, key)
            yield piece
            if last:
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
