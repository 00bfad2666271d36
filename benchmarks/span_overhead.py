"""What a `worker.host.timing` span costs on the hot path: disabled (the engine's normal state) and
while a recorder is installed (benchmarks only), next to a `with` block on a shared `nullcontext`
(the form the spans do not use).

Each case is a function holding one span around nothing, against the same function without it; the
figure is the difference per call, the best of several repeats (the least disturbed by other load).

    python benchmarks/span_overhead.py
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import platform
import timeit

from worker.host import timing
from worker.host.timing import span_end, span_start  # imported as the engine's call sites import them

log = logging.getLogger("span_overhead")
NULL = contextlib.nullcontext()


def bare() -> None:
    pass


def one_span() -> None:
    t0 = span_start()
    span_end("bench.span", t0)


def with_nullcontext() -> None:
    with NULL:
        pass


def per_call_ns(fn, number: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--number", type=int, default=200_000, help="calls per repeat")
    ap.add_argument("--repeat", type=int, default=25)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    base = per_call_ns(bare, args.number, args.repeat)
    off = per_call_ns(one_span, args.number, args.repeat)
    null = per_call_ns(with_nullcontext, args.number, args.repeat)
    with timing.recording():
        on = per_call_ns(one_span, args.number, args.repeat)
    log.info("python %s, %s", platform.python_version(), platform.machine())
    log.info("empty function %.1f ns; added per call: span disabled %.1f ns, span recording %.1f ns, "
             "with nullcontext %.1f ns", base, off - base, on - base, null - base)


if __name__ == "__main__":
    main()
