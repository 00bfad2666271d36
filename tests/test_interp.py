"""The measured round's interpreter settings (worker/host/interp.py) hold inside and are undone after."""

from __future__ import annotations

import gc
import sys

import pytest

from worker.host.interp import quiet_interpreter


def test_gc_paused_and_interval_set_inside_restored_after():
    before = sys.getswitchinterval()
    assert gc.isenabled()
    with quiet_interpreter(gc_freeze=True, switch_interval_us=200):
        assert not gc.isenabled()
        assert gc.get_freeze_count() > 0
        assert sys.getswitchinterval() == pytest.approx(200e-6)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert sys.getswitchinterval() == before


def test_restored_when_the_round_fails():
    before = sys.getswitchinterval()
    with pytest.raises(RuntimeError):
        with quiet_interpreter(gc_freeze=True, switch_interval_us=100):
            raise RuntimeError("round failed")
    assert gc.isenabled() and sys.getswitchinterval() == before


def test_defaults_change_nothing():
    before = sys.getswitchinterval()
    with quiet_interpreter():
        assert gc.isenabled() and sys.getswitchinterval() == before and gc.get_freeze_count() == 0


def test_bench_run_takes_both_settings():
    from click.testing import CliRunner

    import cli

    out = CliRunner().invoke(cli.bench, ["run", "--help"]).output
    assert "--gc-freeze" in out and "--switch-interval-us" in out


@pytest.mark.parametrize("given,paused", [({}, True), ({"gc_freeze": False}, False)])
def test_a_run_pauses_the_collector_in_its_rounds_by_default(tiny_ckpt, monkeypatch, given, paused):
    """A full collection that falls in the measured round stalls a step (benchmarks/results/setup_h200/v5/I),
    so by default the rounds run with the collector paused; --no-gc-freeze leaves it to Python."""
    from worker import run as run_mod

    seen = []
    real = run_mod.generate

    def spy(*args, **kwargs):
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(run_mod, "generate", spy)
    cfg = run_mod.resolve_config({"checkpoints": str(tiny_ckpt), "mode": "cpu", "max_new_tokens": 2,
                                  "prompt_len": 8, "temperature": 0, "roofline": False, **given}, where="test")
    run_mod.run(cfg)
    assert seen and all(enabled is not paused for enabled in seen), seen
    assert gc.isenabled() and gc.get_freeze_count() == 0  # restored after the rounds
