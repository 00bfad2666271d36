"""The rounds of a run (`worker.generate.measure`): warm-up lengths, hook order, the prefetch credit, and
what each engine asks of it (the streaming engine's short warm-ups, the peer's full-length ones)."""

from __future__ import annotations

import pytest
import torch

from worker import peer as peer_mod
from worker import run as run_mod
from worker.generate import WARMUP_TOKENS, Generation, measure
from worker.run import resolve_config

CPU = torch.device("cpu")


def _recording_round(events: list):
    def round_(new_tokens: int) -> Generation:
        events.append(("round", new_tokens))
        return Generation([[1] * new_tokens], 1.0, 1.0, 1.0, 1.0, new_tokens - 1)
    return round_


@pytest.mark.parametrize("max_new,warmup_tokens,expect", [
    (10, WARMUP_TOKENS, WARMUP_TOKENS), (2, WARMUP_TOKENS, 2), (10, None, 10), (10, 5, 5),
])
def test_warmup_rounds_then_hooks_then_the_measured_round(max_new, warmup_tokens, expect):
    events: list = []
    gen = measure(_recording_round(events), 2, max_new, CPU, lambda name: events.append(("phase", name)),
                  warmup_tokens=warmup_tokens, prepare=lambda: events.append(("prepare",)),
                  start=lambda: events.append(("start",)) or {"h2d": 7})
    assert events == [("phase", "warmup"), ("round", expect), ("phase", "warmup"), ("round", expect),
                      ("prepare",), ("start",), ("phase", "measure"), ("round", max_new)]
    assert gen.prefetched == {"h2d": 7} and len(gen.token_ids[0]) == max_new


def test_no_warmup_and_no_hooks_credit_nothing():
    events: list = []
    gen = measure(_recording_round(events), 0, 4, CPU, lambda name: events.append(name))
    assert events == ["measure", ("round", 4)] and gen.prefetched == {}


def _flat(tiny_ckpt, tmp_path, monkeypatch) -> dict:
    monkeypatch.setenv("STREAMBENCH_CACHE", str(tmp_path / "cache"))
    for var in ("OMP_NUM_THREADS", "MALLOC_ARENA_MAX"):  # a run sets them: restore afterwards
        monkeypatch.setenv(var, "2")
    return {"checkpoints": str(tiny_ckpt), "prompt_len": 8, "batch_size": 1, "max_new_tokens": 6,
            "max_seq_len": 64, "temperature": 0.0, "warmup_rounds": 2, "pack_dir": str(tmp_path / "pack"),
            "roofline": False, "out_json": None}  # (the default writes bench_results.json where the tests run)


@pytest.mark.parametrize("engine,module,expect", [
    ("streaming", run_mod, [WARMUP_TOKENS, WARMUP_TOKENS, 6]),
    ("accelerate", peer_mod, [6, 6, 6]),  # the peer's warm-ups have always been full length
])
def test_each_engine_warms_up_as_it_always_has(tiny_ckpt, tmp_path, monkeypatch, engine, module, expect):
    lengths, real = [], module.generate

    def counted(model, cache, prompt_ids, new_tokens, *a, **kw):
        lengths.append(new_tokens)
        return real(model, cache, prompt_ids, new_tokens, *a, **kw)

    monkeypatch.setattr(module, "generate", counted)
    phases: list = []
    result = run_mod.run(resolve_config({**_flat(tiny_ckpt, tmp_path, monkeypatch), "engine": engine}), phases.append)
    assert lengths == expect
    assert phases[-4:] == ["warmup", "warmup", "measure", "done"]
    assert result["metrics"]["decode_steps"] == 5
