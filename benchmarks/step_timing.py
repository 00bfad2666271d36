"""Steady decode steps timed with CUDA events, then a few more under torch.profiler.

Shared by `topk_graph_profile.py` and `stream_profile.py`: both drive an engine's decode step
themselves (outside `generate`) to split its GPU time by stream, and both need the same order —
untimed first steps (a ring filling, a graph capture), a timed run, then the profiled steps, each
ended by a synchronize so the profile holds only the steps it names.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def all_threads() -> dict:
    """The profiler's option to record every thread's CPU ops, where this torch has it: without it only the
    thread that started the profiler is recorded, so the weight streamer's fetch thread (its copies'
    host side, its named waits) is missing from the trace (checked on torch 2.13's CPU build)."""
    try:
        from torch.profiler import _ExperimentalConfig

        return {"experimental_config": _ExperimentalConfig(profile_all_threads=True)}
    except (ImportError, TypeError):
        return {}


def time_and_profile(step: Callable[[], None], steps: int, profile_steps: int, cuda: bool,
                     untimed: int = 2) -> tuple[float | None, profile]:
    """ms per step over `steps` (None without CUDA: no events to time with) and the profiler of the
    `profile_steps` after them."""
    for _ in range(untimed):
        step()
    ms = None
    if cuda:
        torch.cuda.synchronize()
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
    for _ in range(steps):
        step()
    if cuda:
        t1.record()
        torch.cuda.synchronize()
        ms = t0.elapsed_time(t1) / steps
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
                 **all_threads()) as prof:
        for _ in range(profile_steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    return ms, prof
