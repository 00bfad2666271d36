"""What the weight streamer's two host threads were doing while the copy stream idled.

`stream_profile.py`'s `copy_gaps` says a copy was issued late by the host, but a profiler trace of
the fetch thread needs `profile_all_threads` (not in every torch) and the profiler's own overhead
shifts the host timeline it measures. This records, without a profiler, the streamer's calls on
both threads (fetch: room wait, slot wait, copy issue, backlog wait, publish; compute: wait,
release) with `perf_counter_ns`, and the copies' GPU start and end from the CUDA events the
streamer already records, mapped onto the host clock through one reference event the host waited
for. For each idle span of the copy stream it then says how the fetch thread spent it (and the
compute thread), so "host late" becomes "waiting for room", "waiting for a slot" or "running".
Instrumented calls cost a few microseconds each, on spans of milliseconds. The per-step copy figures
divide the copies inside the window by its steps; the fetch thread enters the window up to a lookahead
ahead, so they read low: the idle share between the window's first and last copy is the robust figure.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

FETCH = ("_wait_for_room", "acquire", "_copy_in", "_copy", "_publish")
COMPUTE = ("wait", "release")


class Timeline:
    """Instrument one WeightStreamer instance (instance attributes shadow its methods) while active."""

    def __init__(self, streamer: Any):
        self.s = streamer
        self.calls: list[tuple[int, int, str, str]] = []  # (start_ns, end_ns, name, thread)
        self.args: list[str] = []  # each call's first argument, as text (the group, its index), same order
        self.copies: list[tuple[Any, Any]] = []  # (start, end) CUDA events of each H2D copy
        self._undo: list[tuple[Any, str]] = []

    def _wrap(self, obj: Any, name: str) -> None:
        f, calls, args = getattr(obj, name), self.calls, self.args

        def timed(*a, **k):
            t0 = time.perf_counter_ns()
            try:
                return f(*a, **k)
            finally:
                calls.append((t0, time.perf_counter_ns(), name, threading.current_thread().name))
                args.append(_short(a[:2]))

        setattr(obj, name, timed)
        self._undo.append((obj, name))

    def __enter__(self) -> Timeline:
        for n in FETCH:
            self._wrap(self.s.pool if n == "acquire" else self.s, n)
        for n in COMPUTE:
            self._wrap(self.s, n)
        add = self.s.h2d.add_device

        def add_device(n, start, end):
            self.copies.append((start, end))
            return add(n, start, end)

        self.s.h2d.add_device = add_device
        self._undo.append((self.s.h2d, "add_device"))
        torch.cuda.synchronize()
        self.ref = torch.cuda.Event(enable_timing=True)
        self.ref.record()
        self.ref.synchronize()
        self.ref_ns = time.perf_counter_ns()  # the host clock when the reference event completed
        return self

    def __exit__(self, *exc) -> None:
        for obj, name in self._undo:
            delattr(obj, name)
        self.copies = list(self.copies)  # the fetch thread runs on: copies it issues from now are not ours
        for _, end in self.copies:
            end.synchronize()

    def gpu_copies_ns(self) -> list[tuple[int, int]]:
        """Each copy's GPU start and end on the host clock (ns)."""
        def to(e) -> int:
            return self.ref_ns + int(self.ref.elapsed_time(e) * 1e6)

        return sorted((to(a), to(b)) for a, b in self.copies)


def _short(a: tuple) -> str:
    """A call's group (`GroupKey` → "layer.kind") or index / layer and kind; slots are left out."""
    return ",".join(f"{x.layer}.{x.kind}" if hasattr(x, "layer") else str(x) for x in a
                    if isinstance(x, (int, str)) or hasattr(x, "layer"))


def sequence(tl: Timeline, copies: list[tuple[int, int]], first_ns: int, last_ns: int) -> list[str]:
    """One line per instrumented call and per GPU copy in [first_ns, last_ns), in time order (ms from first_ns)."""
    rows = [(t0, f"{th[:9]:9} {name:15} {arg:10} {(t1 - t0) / 1e3:8.0f} us")
            for (t0, t1, name, th), arg in zip(tl.calls, tl.args) if first_ns <= t0 < last_ns]
    rows += [(a, f"{'gpu-copy':9} {'':15} {'':10} {(b - a) / 1e3:8.0f} us")
             for a, b in copies if first_ns <= a < last_ns]
    return [f"{(t - first_ns) / 1e6:8.3f} ms  {text}" for t, text in sorted(rows)]


def _overlap(a0: int, a1: int, b0: int, b1: int) -> int:
    return max(0, min(a1, b1) - max(a0, b0))


def _states(calls, thread: str, g0: int, g1: int) -> collections.Counter:
    """ns of [g0, g1) the thread spent in each instrumented call; the rest is `other` (its own code
    between calls, or waiting for the interpreter lock)."""
    c: collections.Counter = collections.Counter()
    for t0, t1, name, th in calls:
        if th != thread:
            continue
        ns = _overlap(t0, t1, g0, g1)
        if ns:
            c[name] += ns
    if "_copy" in c:  # `_copy_in` runs inside `_copy`: the rest of `_copy` is its backlog wait
        c["backlog"] = c.pop("_copy") - c.get("_copy_in", 0)
    if "_copy_in" in c:
        c["copy_issue"] = c.pop("_copy_in")
    c["other"] = (g1 - g0) - sum(c.values())
    return c


def summarize(tl: Timeline, steps: int, gap_us: float = 50.0, show: int = 6) -> dict:
    """Per step: copy-stream idle time, and how each host thread spent the idle spans."""
    copies = tl.gpu_copies_ns()
    fetch = next((th for *_, n, th in tl.calls if n == "_wait_for_room"), None)
    compute = next((th for *_, n, th in tl.calls if n == "wait"), None)
    idle, spans = 0, []
    per = {"fetch": collections.Counter(), "compute": collections.Counter()}
    for (_, e0), (s1, _) in itertools.pairwise(copies):
        if s1 - e0 < gap_us * 1e3:
            continue
        idle += s1 - e0
        f, c = _states(tl.calls, fetch, e0, s1), _states(tl.calls, compute, e0, s1)
        per["fetch"].update(f)
        per["compute"].update(c)
        spans.append({"idle_us": (s1 - e0) / 1e3, "fetch_us": {k: v / 1e3 for k, v in f.most_common()},
                      "compute_us": {k: v / 1e3 for k, v in c.most_common()}})
    totals = {"fetch": collections.Counter(), "compute": collections.Counter()}
    if copies:
        for t, th in (("fetch", fetch), ("compute", compute)):
            totals[t] = _states(tl.calls, th, copies[0][0], copies[-1][1])
    busy = sum(b - a for a, b in copies)
    wall = (copies[-1][1] - copies[0][0]) if copies else 0
    last_two = sequence(tl, copies, copies[-1][1] - 2 * wall // max(steps, 1), copies[-1][1]) if copies else []
    return {"steps": steps, "copies": len(copies), "copy_busy_ms_per_step": busy / steps / 1e6,
            "copies_wall_ms_per_step": wall / steps / 1e6, "idle_ms_per_step": idle / steps / 1e6,
            "idle_by_thread_ms_per_step": {t: {k: v / steps / 1e6 for k, v in c.most_common()}
                                           for t, c in per.items()},
            "by_thread_ms_per_step": {t: {k: v / steps / 1e6 for k, v in c.most_common()} for t, c in totals.items()},
            "longest": sorted(spans, key=lambda s: -s["idle_us"])[:show],
            "sequence": last_two}


def record(streamer: Any, step: Callable[[], None], steps: int) -> dict:
    with Timeline(streamer) as tl:
        for _ in range(steps):
            step()
    return summarize(tl, steps)


def show(t: dict) -> None:
    print(f"  host timeline ({t['steps']} steps, no profiler): copies busy {t['copy_busy_ms_per_step']:.3f} ms "
          f"of {t['copies_wall_ms_per_step']:.3f} ms per step, idle {t['idle_ms_per_step']:.3f} ms per step")
    for th, c in t["by_thread_ms_per_step"].items():
        print(f"    whole steps, {th} thread: " + "; ".join(f"{k} {v:.3f}" for k, v in c.items()))
    for th, c in t["idle_by_thread_ms_per_step"].items():
        print(f"    during idle, {th} thread: " + "; ".join(f"{k} {v:.3f}" for k, v in c.items()))
    for sp in t["longest"]:
        f = ", ".join(f"{k} {v:.0f}" for k, v in sp["fetch_us"].items())
        c = ", ".join(f"{k} {v:.0f}" for k, v in sp["compute_us"].items())
        print(f"    idle {sp['idle_us']:7.0f} us: fetch [{f}]  compute [{c}]")
    print("  the last two steps' calls and copies (start, thread, call, argument, duration):")
    for line in t["sequence"]:
        print("    " + line)
