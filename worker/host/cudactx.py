"""The device's CUDA primary context, made on a side thread from the start of a run.

Why: the runtime makes the context on the process's first CUDA call that needs one, and in a run that
call was the CPU tier fill's first `cudaHostRegister`: the registrations behind the reads then waited
while the context was made and the driver set itself up, and the fill with them
(benchmarks/results/setup_h200/v6, the context made first against not). Made here, beside the
tokenizer and the pack, its time is on neither the fill's path nor the run's; `wait()` before the
engine build hands on a failure to make it (a device out of memory, a driver error) as the build
would have met it.

It is made before the run holds its device lock (worker.host.devlock): a process that waits there for
another engine's run holds a context on that GPU meanwhile, as any process that has touched the device
does; it launches nothing on it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch


def _touch(device: torch.device) -> None:
    torch.zeros(1, device=device)  # an allocation and a fill: the runtime makes the primary context for them


class EarlyContext:
    """Starts making the context of `device` on a thread of its own (nothing for a CPU device)."""

    def __init__(self, device: torch.device, make: Callable[[torch.device], None] = _touch) -> None:
        self.seconds: float | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if device.type != "cuda":
            return
        self._thread = threading.Thread(target=self._make, args=(device, make), name="cuda-context", daemon=True)
        self._thread.start()

    def _make(self, device: torch.device, make: Callable[[torch.device], None]) -> None:
        t0 = time.perf_counter()
        try:
            make(device)
        except BaseException as e:  # noqa: BLE001 - raised where the run waits for it (`wait`)
            self._error = e
        finally:
            self.seconds = time.perf_counter() - t0

    def wait(self) -> float | None:
        """The seconds it took (None: no context to make); raises what making it raised."""
        if self._thread is None:
            return None
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.seconds
