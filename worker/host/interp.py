"""The Python interpreter's own pauses during the measured round, on request.

Why: a streamed decode step is issued by two Python threads, the compute thread (kernel launches)
and the fetch thread (one H2D copy per weight group). The fetch thread can only issue the next copy
when it holds the interpreter lock; while the compute thread runs Python it gets the lock at the
next switch request (every `sys.getswitchinterval()`, 5 ms by default), and a cyclic garbage
collection holds it for as long as the collection takes. Either idles the copy engine when the copy
queue runs dry first — `benchmarks/stream_profile.py` splits such idle spans into "issued late by
the host" and "waited on the device". On the H200 neither setting removed batch 16's idle spans
(benchmarks/results/quant_h200/v4/interp/). The collector is paused by default all the same
(`gc_freeze`): where a full collection (tenths of a second once the compiler is imported) falls is a
matter of what setup allocated, and a change to the fill's threads moved one into the measured round
of the 6-layer 70B cpu point, 207-218 ms/token instead of 185 with one step stalled
(benchmarks/results/setup_h200/v5/I). The switch interval stays Python's: a switch for A/Bs.
"""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_interpreter(gc_freeze: bool = False, switch_interval_us: int | None = None) -> Iterator[None]:
    """`gc_freeze`: collect once, freeze what exists (never scanned again) and pause the cyclic collector
    until the block ends; `switch_interval_us`: the interpreter's thread switch interval meanwhile.
    Both are restored on exit, so a long-lived worker's later runs start from Python's defaults."""
    interval = sys.getswitchinterval()
    was_enabled = gc.isenabled()
    if gc_freeze:
        gc.collect()
        gc.freeze()
        gc.disable()
    if switch_interval_us is not None:
        sys.setswitchinterval(switch_interval_us / 1e6)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)
        if gc_freeze:
            gc.unfreeze()
            if was_enabled:
                gc.enable()
