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
