"""The engine's public instrumentation: named host-time spans (no-ops until a benchmark installs a
recorder) and the streamer's GPU slot counts in the run result.

benchmarks/topk_offload_profile.py and benchmarks/prefill_profile.py read exactly these; a renamed
span or a moved key breaks a test here rather than a script on the GPU host.
"""

from __future__ import annotations

import threading

import pytest

from worker.host import timing
from worker.run import resolve_config, run


def test_spans_record_nothing_until_a_recorder_is_installed():
    assert timing.span_start() is None
    timing.span_end("kv.topk", None)  # a disabled span: nothing to record into, nothing raised
    with timing.recording() as outer:
        t0 = timing.span_start()
        assert t0 is not None
        with timing.recording() as inner:
            timing.span_end("a", timing.span_start())
        timing.span_end("b", t0)  # the outer recorder is back
    assert timing.span_start() is None
    timing.span_end("c", t0)  # started while recording, ended after: dropped, not misfiled
    assert dict(inner.calls) == {"a": 1} and dict(outer.calls) == {"b": 1}
    assert outer.seconds["b"] >= inner.seconds["a"] >= 0


def test_recorder_sums_spans_from_every_thread_and_resets():
    with timing.recording() as rec:
        def work():
            for _ in range(100):
                timing.span_end("kv.fetch", timing.span_start())

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert rec.calls["kv.fetch"] == 400 and rec.seconds["kv.fetch"] > 0
        rec.reset()
        assert not rec.calls and not rec.seconds


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt(layers=3)


def _run(ckpt, **flat):
    cfg = resolve_config({"checkpoints": str(ckpt), "temperature": 0, "max_new_tokens": 6, "prompt_len": 30,
                          "batch_size": 2, "max_seq_len": 48, "roofline": False, "out_json": None, **flat})
    with timing.recording() as spans:

        def on_phase(name: str) -> None:
            if name == "measure":
                spans.reset()

        result = run(cfg, on_phase)
    return result, spans


@pytest.mark.parametrize("topk, tier", [(0, "cpu"), (3, "cpu"), (3, "ssd")])
def test_offloaded_kv_decode_records_its_spans(ckpt, topk, tier):
    """cpu-mode weights, KV offloaded with one GPU block per row: every decode step of every layer runs
    the paged cache's spans; top-k gathers its device-chosen candidates on the host only from the SSD
    tier (the CPU tier's are read by the device itself)."""
    r, spans = _run(ckpt, mode="cpu", gpu_max_groups=3, kv_offload=tier, kv_block_tokens=4, kv_gpu_blocks=1,
                    topk_blk=topk)
    layer_steps = 3 * r["metrics"]["decode_steps"]  # the measured round's only: reset at "measure"
    assert layer_steps > 0
    attend = "kv.topk" if topk else "kv.exact"
    assert spans.calls["kv.decode"] == spans.calls["kv.ready"] == spans.calls[attend] == layer_steps
    assert spans.calls["kv.fetch"] >= layer_steps  # plus the next step's first layer, fetched ahead
    host = topk and tier == "ssd"
    assert (spans.calls["kv.candidates"] > 0) == bool(host)
    assert set(spans.calls) == {"kv.decode", "kv.ready", "kv.fetch", attend} | ({"kv.candidates"} if host else set())
    # nested spans of one thread: the parts never add up to more than the whole
    assert spans.seconds["kv.ready"] + spans.seconds[attend] <= spans.seconds["kv.decode"]
    assert spans.seconds["kv.candidates"] <= spans.seconds["kv.fetch"]


def test_run_result_reports_the_gpu_slots(ckpt):
    """The odd slot of gpu_max_groups=3 goes to the bigger kind (ffn); all-resident weights have none."""
    streamed, _ = _run(ckpt, mode="cpu", gpu_max_groups=3)
    assert streamed["metrics"]["gpu_slots"] == {"attn": 1, "ffn": 2}
    resident, spans = _run(ckpt, mode="gpu")
    assert resident["metrics"]["gpu_slots"] is None
    assert not spans.calls  # the static cache has no spans
