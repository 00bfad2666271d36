"""The CUDA context is made on a side thread from the start of a run and waited for before the engine
build, so the CPU tier fill's first registration does not make it (worker.host.cudactx)."""

from __future__ import annotations

import threading

import pytest
import torch

import worker.run as run_mod
from worker.host.cudactx import EarlyContext
from worker.run import resolve_config, run
from worker.stream import cpu_tier


def test_nothing_is_made_for_a_cpu_device():
    made = []
    assert EarlyContext(torch.device("cpu"), make=made.append).wait() is None and made == []


def test_it_is_made_on_a_thread_of_its_own_and_a_failure_reaches_the_waiter():
    seen = []
    ctx = EarlyContext(torch.device("cuda", 0), make=lambda d: seen.append((d, threading.current_thread().name)))
    assert ctx.wait() >= 0 and seen == [(torch.device("cuda", 0), "cuda-context")]

    def fails(_):
        raise RuntimeError("CUDA error: out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        EarlyContext(torch.device("cuda", 0), make=fails).wait()


def test_a_run_starts_it_before_the_tokenizer_and_waits_before_the_fill(tiny_run, monkeypatch):
    events: list[str] = []

    class Recorded(EarlyContext):
        def __init__(self, device, make=None):
            events.append("start")
            super().__init__(torch.device("cuda", 0), make=lambda d: events.append("made"))

        def wait(self):
            seconds = super().wait()
            events.append("waited")
            return seconds

    tokenizer, fill = run_mod.prompt_ids_for, cpu_tier.fill
    monkeypatch.setattr(run_mod, "EarlyContext", Recorded)
    monkeypatch.setattr(run_mod, "prompt_ids_for", lambda *a, **k: (events.append("tokenizer"), tokenizer(*a, **k))[1])
    monkeypatch.setattr(cpu_tier, "fill", lambda *a, **k: (events.append("fill"), fill(*a, **k))[1])
    r = run(resolve_config({**tiny_run, "mode": "cpu"}))
    assert events.index("start") < events.index("tokenizer") and "made" in events
    assert events.index("made") < events.index("waited") < events.index("fill"), events
    assert r["setup"]["overlapped"]["cuda_context_s"] >= 0
