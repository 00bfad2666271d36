"""The gate as sharp as the noise allows (issue 16): detection and false-alarm rates on histories of
known noise, the minimum detectable effect against simulation, and change points.

Histories come from tests/fakerows.py with `steps=(0, 0)`, so every time metric's run-to-run noise
is exactly the stated CV (lognormal); one config, 3 repeats a night, 14 baseline nights. A family is
one pair's 7 checked metrics on one night; the target is at most 1 false night in 100 per family.
"""

from __future__ import annotations

import statistics

import pytest
from click.testing import CliRunner

import cli
from orchestrator.regress.changepoints import change_points
from orchestrator.regress.check import check
from orchestrator.regress.render import regress_markdown
from tests import fakerows

ONE = fakerows.suite("""
name: nightly
models: [{name: llama3.1-8b, preset: llama3.1-8b}]
repeats: 3
defaults: {max_new_tokens: 32, prompt_len: 512, max_seq_len: 2048, temperature: 0}
matrix: {mode: cpu, batch_size: 1, host: [{gpu: H200}]}
""")
NIGHTS = 15
CPU_LIKE = {"noise": 0.002, "night_sd": 0.001}  # the engine's cpu mode: CV 0.2% fresh process to fresh process
SSD_LIKE = {"noise": 0.05, "night_sd": 0.0}  # a wandering disk: CV 5%


def history(seed: int, noise: dict, slow: float | None = None, nights: int = NIGHTS):
    step = {"night": nights - 1, "slow": slow} if slow else None
    return fakerows.history(ONE, ["h200"], nights, seed=seed, steps=(0.0, 0.0), step=step, **noise)


def verdicts(seeds: range, noise: dict, slow: float | None) -> tuple[float, list[float]]:
    """Share of nights the gate fails (exit 1), and the decode_ms MDE it printed each night."""
    failed, mdes = 0, []
    for seed in seeds:
        rows = history(seed, noise, slow)
        report = check(rows, rows[-1]["suite_run_id"])
        failed += report.exit_code == 1
        mdes += [f.change.mde for p in report.pairs for f in p.findings if f.metric.name == "decode_ms"]
    return failed / len(seeds), mdes


@pytest.mark.side
@pytest.mark.parametrize("noise,slow,detect", [(CPU_LIKE, 1.03, 0.99), (SSD_LIKE, 1.15, 0.90)])
def test_a_regression_beyond_the_noise_is_flagged_and_noise_alone_is_not(noise, slow, detect):
    seeds = range(300)
    caught, _ = verdicts(seeds, noise, slow)
    false, mdes = verdicts(range(1000, 1300), noise, None)
    print(f"\n{noise}: {slow - 1:.0%} slower flagged on {caught:.1%} of {len(seeds)} nights; unchanged nights "
          f"flagged {false:.2%}; decode_ms MDE median {statistics.median(mdes):.2%}")
    assert caught >= detect
    assert false <= 0.01  # ≤ 1 false night in 100 per family (measured: 0 or 1 of 300)


@pytest.mark.side
def test_the_minimum_detectable_effect_agrees_with_simulation():
    """At its MDE the gate catches a change about half the time: a third smaller it mostly misses,
    half as large again it mostly catches, so the printed figure is within a factor of 1.5 of the
    simulated 50% point."""
    _, mdes = verdicts(range(2000, 2050), SSD_LIKE, None)
    mde = statistics.median(mdes)
    small, _ = verdicts(range(3000, 3200), SSD_LIKE, 1 + mde / 1.5)
    large, _ = verdicts(range(4000, 4200), SSD_LIKE, 1 + mde * 1.5)
    print(f"\nMDE {mde:.2%}: caught {small:.0%} at {mde / 1.5:.2%}, {large:.0%} at {mde * 1.5:.2%}")
    assert 0.06 < mde < 0.2 and small < 0.5 < large


def test_regress_says_what_it_can_see_and_how_many_nights_a_short_pair_needs():
    rows = history(5, CPU_LIKE)
    md = regress_markdown(check(rows, rows[-1]["suite_run_id"]))
    assert "### What the gate can see" in md
    line = next(x for x in md.splitlines() if x.startswith("| `decode_tok_s` on h200"))
    assert "≥ 2.0% (floor)" in line  # 0.2% noise could see ~0.6%; the 2% floor is what binds
    noisy = regress_markdown(check(history(5, SSD_LIKE), history(5, SSD_LIKE)[-1]["suite_run_id"]))
    assert "(noise)" in next(x for x in noisy.splitlines() if x.startswith("| `decode_tok_s` on h200"))
    short = history(6, CPU_LIKE, nights=3)
    md = regress_markdown(check(short, short[-1]["suite_run_id"]))
    assert "3 more night(s)" in md  # 2 earlier nights of the 5 needed


def test_change_points_name_the_night_a_step_begins(tmp_path):
    for seed, noise, slow in ((1, CPU_LIKE, 1.03), (2, SSD_LIKE, 1.2)):
        rows = fakerows.history(ONE, ["h200"], 24, seed=seed, steps=(0.0, 0.0), step={"night": 10, "slow": slow},
                                **noise)
        found = change_points(rows, "decode_ms")
        night10 = sorted({r["suite_run_id"] for r in rows})[10]
        assert [(c.index, c.suite_run_id, c.worse) for c in found] == [(10, night10, True)], found
    fakerows.write(str(tmp_path), rows)
    out = CliRunner().invoke(cli.bench, ["regress", "--results", str(tmp_path), "--history"], terminal_width=250)
    assert out.exit_code == 0, out.output  # tonight is no worse than the 13 nights since the step
    assert "### Change points over the whole history" in out.output
    line = next(x for x in out.output.splitlines() if "`decode_ms`" in x and night10 in x)
    assert "worse" in line and fakerows.COMMITS[1][:10] in line
