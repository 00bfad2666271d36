"""Where a run's time goes (worker.host.walltime): every setup phase in the run JSON's `setup` section
and the row's `setup_*_s` columns, adding up to the wall time; and the share of it `bench submit`
says was measurement."""

from __future__ import annotations

import time

import pytest

from orchestrator.cluster.actor import RunOutcome
from orchestrator.cluster.progress import time_share
from orchestrator.results.schema import COLUMN_NAMES, build_row
from orchestrator.suite.load import parse_suite
from worker.host import walltime
from worker.run import resolve_config, run

SUITE = parse_suite("name: t\nmodels: [{name: tiny, preset: tiny}]\nmatrix: {mode: mixed}\n")
PHASE_COLUMNS = [f"setup_{p}_s" for p in walltime.PHASES]
SLACK_S = 0.05


@pytest.fixture()
def flat(tiny_run):
    return {**tiny_run, "warmup_rounds": 2}


def test_a_run_says_where_its_wall_time_went(flat):
    t0 = time.time()
    r = run(resolve_config(flat))
    took = time.time() - t0
    s = r["setup"]
    phases = [f"{p}_s" for p in walltime.PHASES]
    assert all(s[k] >= 0 for k in phases + ["measure_s", "wall_s"]), s
    assert sum(s[k] for k in phases) + s["measure_s"] == pytest.approx(s["wall_s"], abs=1e-6)  # other_s: the rest
    assert s["wall_s"] - s["process_s"] <= took + SLACK_S  # run() itself took no longer than the call
    assert s["measure_s"] > 0 and s["pack_s"] > 0 and s["tokenizer_s"] > 0 and s["slots_s"] > 0
    assert s["warmup_rounds_s"] == [s["compile_s"], s["warmup_s"]] and s["compile_s"] > 0  # 2 warm-ups
    assert s["probe_s"] > 0  # the probe and the SSD windows of the SSD layer
    tier = r["config"]["stream"]
    assert tier["cpu_cache_layers"] == 1 and s["fill_bytes"] > 0 and s["fill_s"] > 0
    # a CPU run compiles nothing, so prepares nothing ahead; its fill ran before the build went on
    assert s["overlapped"] == {"compile_prepare_s": None, "cpu_fill_s": None, "cuda_context_s": None}  # CPU: no context
    assert set(s["bytecode"]) == {"prefix", "reason"}  # what this process decided (worker.host.bytecode)
    assert s["fill_gbps"] == pytest.approx(s["fill_bytes"] / s["fill_s"] / 1e9)
    row = build_row(SUITE.specs[0], "t-1", RunOutcome("ok", None, r, None, None, t0, time.time()))
    for col in PHASE_COLUMNS + ["fill_gbps", "measure_s", "wall_s"]:
        assert col in COLUMN_NAMES and row[col] is not None and row[col] >= 0, col
    assert sum(row[c] for c in PHASE_COLUMNS) + row["measure_s"] <= row["wall_s"] + SLACK_S


def test_the_process_start_is_counted_once(flat, monkeypatch):
    first = run(resolve_config(flat))["setup"]
    t0 = time.time()
    second = run(resolve_config(flat))["setup"]
    assert second["process_since"] == "previous run" and second["process_s"] <= time.time() - t0
    assert first["process_since"] in ("process start", "previous run")
    monkeypatch.setattr(walltime, "_last_end", None)  # as in a fresh process
    fresh = walltime.RunClock()
    assert fresh.process_since == "process start" and fresh.process_s > second["wall_s"]  # pytest has run a while
    fresh.close()


def test_a_run_that_fails_still_ends_its_clock(flat, monkeypatch):
    from worker.errors import UserError

    monkeypatch.setattr(walltime, "_last_end", None)
    t0 = time.time()
    with pytest.raises(UserError):
        run(resolve_config({**flat, "cpu_cache_layers": 5}))  # more layers than the model has
    assert walltime._last_end is not None and t0 <= walltime._last_end <= time.time()


def test_a_fill_behind_is_side_thread_work_and_ends_before_the_measured_round(flat):
    """`fill_behind`: the fill's own seconds are `overlapped.cpu_fill_s` (its rate from them), the `fill`
    phase only what the run still waited for it after the warm-up; the measured round reads no disk."""
    before = run(resolve_config(flat))
    s = run(resolve_config({**flat, "fill_behind": True}))["setup"]
    assert s["overlapped"]["cpu_fill_s"] > 0 and s["fill_bytes"] == before["setup"]["fill_bytes"]
    assert s["fill_gbps"] == pytest.approx(s["fill_bytes"] / s["overlapped"]["cpu_fill_s"] / 1e9)
    assert 0 <= s["fill_s"] <= s["overlapped"]["cpu_fill_s"]
    assert sum(s[f"{p}_s"] for p in walltime.PHASES) + s["measure_s"] == pytest.approx(s["wall_s"], abs=1e-6)
    assert before["setup"]["overlapped"]["cpu_fill_s"] is None  # by default the fill runs before the build goes on


def test_gpu_mode_fills_nothing(flat):
    s = run(resolve_config({**flat, "mode": "gpu"}))["setup"]
    assert s["fill_s"] == 0 and s["fill_bytes"] is None and s["fill_gbps"] is None


def test_side_thread_work_is_reported_beside_the_phases_not_in_them(monkeypatch):
    monkeypatch.setattr(walltime, "_last_end", time.time())
    clock = walltime.RunClock()
    with clock.phase("slots"):
        time.sleep(0.01)
    clock.overlapped("compile_prepare", 2.5)  # longer than the run: it ran beside the phases
    s = clock.report()
    clock.close()
    assert s["overlapped"] == {"compile_prepare_s": 2.5, "cpu_fill_s": None, "cuda_context_s": None}
    assert sum(s[f"{p}_s"] for p in walltime.PHASES) + s["measure_s"] == pytest.approx(s["wall_s"], abs=1e-6)
    assert s["wall_s"] < 2.5
    with pytest.raises(AssertionError):
        clock.overlapped("fill", 1.0)  # a phase, not side-thread work


def test_the_share_of_measurement():
    rows = [{"wall_s": 10.0, "measure_s": 1.0}, {"wall_s": 30.0, "measure_s": 3.0}, {"wall_s": None}]
    assert time_share(rows) == "time: 40.0 s of wall time in 2 runs, 4.0 s in measured rounds (10.0% measurement)"
    assert time_share([{"status": "failed", "wall_s": None}]) is None and time_share([]) is None
