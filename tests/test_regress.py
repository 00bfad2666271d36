"""`bench regress` on generated result datasets: what is flagged, what is not, and the exit codes."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from benchcli import BENCH
from click.testing import CliRunner

import cli
from orchestrator.regress.check import Baseline, check, regress
from orchestrator.regress.gate import Gate, load_file, parse_override, resolve_gate
from orchestrator.regress.metrics import METRICS, default_thresholds
from orchestrator.regress.render import regress_markdown
from orchestrator.regress.stats import assess, critical, summarize
from orchestrator.suite.load import parse_suite
from tests import fakerows
from worker.errors import UserError

SUITE = fakerows.suite()
DEFAULT_THRESHOLDS = Path(__file__).resolve().parent.parent / "configs" / "thresholds" / "default.yaml"
GPU_B1 = fakerows.config_key(SUITE, "gpu", 1)


def newest(rows):
    return rows[-1]["suite_run_id"]


def hw(host: str) -> str:
    return fakerows.night(SUITE, host, "x", fakerows.START, np.random.default_rng(0))[0]["hardware_key"]


def test_clean_step_change_is_flagged_on_its_host_only():
    rows = fakerows.history(SUITE, ["h100-a", "h200"], 15, seed=1, step={"night": 14, "host": "h100-a", "slow": 1.3})
    report = check(rows, newest(rows))
    assert report.exit_code == 1
    regressed = {(p.hardware_key, p.config_key, f.metric.name) for p, f in report.findings("regression")}
    assert {h for h, _, _ in regressed} == {hw("h100-a")}
    # every config on the slowed host loses throughput beyond 20% and beyond the noise
    assert {c for _, c, m in regressed if m == "decode_tok_s"} == {s.config_key for s in SUITE.specs}
    for p, f in report.findings("regression"):
        assert f.change.worse > 0.2 and f.change.z > f.change.critical and f.change.unit == "run"
    assert all(p.status == "checked" and not p.of("regression") for p in report.pairs if p.hardware_key == hw("h200"))
    md = regress_markdown(report)
    assert md.startswith("## bench regress · nightly · ") and "**❌ regression**" in md
    assert "`decode_tok_s` (higher is better)" in md and "`ttft_ms` (lower is better)" in md


def test_a_speedup_is_an_improvement_not_a_regression():
    rows = fakerows.history(SUITE, ["h200"], 12, seed=2, step={"night": 11, "slow": 1 / 1.35})
    report = check(rows, newest(rows))
    assert report.exit_code == 0 and not report.findings("regression")
    improved = {f.metric.name for _, f in report.findings("improvement")}
    assert {"decode_tok_s", "ttft_ms", "e2e_ms"} <= improved
    assert "### Improvements" in regress_markdown(report)


def false_alarms(seeds: int, noise: float, night_sd: float) -> dict[str, float]:
    """Pure noise (no change at all): how often each rule fires, per comparison and per suite run."""
    gate = Gate()
    runs_flagged = threshold_only = z_only = both = comparisons = families = families_flagged = 0
    for seed in range(seeds):
        rows = fakerows.history(SUITE, ["h100-a"], 10, seed=1000 + seed, noise=noise, night_sd=night_sd)
        report = check(rows, newest(rows), gate=gate)
        runs_flagged += report.exit_code == 1
        for p in report.pairs:
            families += 1
            families_flagged += bool(p.of("regression"))
            for f in p.findings:
                comparisons += 1
                threshold_only += f.change.worse > f.threshold
                z_only += f.change.z > f.change.critical
                both += f.verdict == "regression"
    return {"suite_run": runs_flagged / seeds, "family": families_flagged / families,
            "threshold_only": threshold_only / comparisons, "z_only": z_only / comparisons,
            "both": both / comparisons, "comparisons": comparisons}


@pytest.mark.side
def test_pure_noise_false_alarm_rate_over_200_seeds():
    """200 nightly histories each (10 nights, 5 configs × 3 repeats on one host, 35 comparisons a
    night), no change planted. Typical noise: 3% per run, 2% per night, and a stalled decode step
    now and then. Heavy noise: 10% per run, 8% per night. A family is one (config, hardware) pair's
    7 checked metrics on one night: the target is at most 1 false night in 100 per family."""
    typical = false_alarms(200, 0.03, 0.02)
    heavy = false_alarms(200, 0.10, 0.08)
    print(f"\nfalse alarms, typical noise: {typical}\nfalse alarms, heavy noise:   {heavy}")
    for rates in (typical, heavy):
        assert rates["family"] <= 0.01  # ≤ 1 false night in 100 per comparison family
        assert rates["z_only"] < 0.003  # the calibrated noise test near its nominal 0.13% per comparison
        assert rates["threshold_only"] > 0.2  # the 2% floor alone would fire on every other noisy night
        assert rates["both"] <= rates["z_only"] and rates["suite_run"] <= 0.05


@pytest.mark.side
def test_calibrated_critical_value_keeps_the_nominal_rate_on_small_baselines():
    rng = np.random.default_rng(7)
    for k in (5, 7, 12):
        crit = critical(3.0, "run", k, 1)
        hits = 0
        for _ in range(4000):
            change = assess([[v] for v in rng.standard_normal(k) + 100], [rng.standard_normal() + 100], 1,
                            min_runs=k, noise_floor=0.0)
            hits += change.z > change.critical
        assert crit > 3.0 and hits / 4000 < 0.006, (k, crit, hits)  # nominal 0.00135
        naive = sum(assess([[v] for v in rng.standard_normal(k)], [rng.standard_normal()], 1, min_runs=k,
                           noise_floor=0.0).z > 3.0 for _ in range(4000))
        assert naive / 4000 > 0.005  # what an uncalibrated z > 3 would do: several times the nominal rate
    assert critical(3.0, "run", 5, 1) > critical(3.0, "run", 7, 1) > critical(3.0, "run", 14, 1) > 3.0


def test_an_outlier_night_in_the_baseline_does_not_mask_a_real_regression():
    rows = fakerows.history(SUITE, ["h100-a"], 12, seed=3, step={"night": 11, "slow": 1.5},
                            bad_nights={(4, "h100-a"): 4.0})  # one night 4x slower than the rest
    report = check(rows, newest(rows))
    flagged = {(p.config_key, f.metric.name) for p, f in report.findings("regression")}
    assert (GPU_B1, "decode_tok_s") in flagged and report.exit_code == 1
    # what a mean / standard deviation test would have said: the bad night inflates the SD and hides it
    pair = [r for r in rows if r["config_key"] == GPU_B1]
    nights = {}
    for r in pair:
        nights.setdefault(r["suite_run_id"], []).append(r["decode_tok_s"])
    base = [statistics.median(v) for k, v in nights.items() if k != newest(rows)]
    now = statistics.median(nights[newest(rows)])
    assert (statistics.mean(base) - now) / statistics.stdev(base) < 3.0


def test_a_bad_repeat_is_absorbed_by_its_nights_median():
    s = summarize([100.0, 101.0, 400.0])
    assert s.median == 101.0 and s.sigma < 200  # winsorized: the 400 is pulled in
    base = [[100.0 + i % 3, 99.0, 101.0] for i in range(8)] + [[100.0, 101.0, 400.0]]
    change = assess(base, [130.0, 131.0, 129.0], +1)
    clean = assess(base[:-1] + [[100.0, 101.0, 101.0]], [130.0, 131.0, 129.0], +1)  # as if it had not happened
    assert change.rel == pytest.approx(clean.rel, abs=0.005) and change.z > change.critical
    assert change.spreads.run < 2 * clean.spreads.run  # the 400 does not swell the run-to-run noise


def test_missing_history_is_not_enough_data():
    one = fakerows.history(SUITE, ["h100-a"], 1, seed=4)
    report = check(one, newest(one))
    assert report.exit_code == 3 and all(p.status == "no-baseline" for p in report.pairs)
    assert "⚠️ not enough data" in regress_markdown(report) and "### No baseline" in regress_markdown(report)
    few = fakerows.history(SUITE, ["h100-a"], 5, seed=4)  # 4 earlier nights < min_baseline_runs 5
    assert check(few, newest(few)).exit_code == 3
    enough = fakerows.history(SUITE, ["h100-a"], 6, seed=4)
    assert check(enough, newest(enough)).exit_code == 0


def test_other_hosts_rows_never_form_the_baseline():
    # l40s has a long history at about half the speed; h100-a appears tonight for the first time
    s = fakerows.suite()
    rows = fakerows.history(s, ["l40s"], 10, seed=5)
    tonight = fakerows.night(s, "h100-a", newest(rows), fakerows.START + timedelta(days=9, hours=2),
                             np.random.default_rng(9))
    report = check(rows + tonight, newest(rows))
    by_hw = {p.hardware_key: p for p in report.pairs}
    assert by_hw[hw("h100-a")].status == "no-baseline" and not by_hw[hw("h100-a")].findings
    assert report.exit_code == 0 and not report.findings("improvement")
    assert check(rows + tonight, newest(rows), strict=True).exit_code == 3
    # the same hardware under another host name is the same hardware key: it is a baseline
    h100 = fakerows.history(s, ["h100-a"], 9, seed=6)
    later = fakerows.night(s, "h100-b", "moved", fakerows.START + timedelta(days=10), np.random.default_rng(1))
    moved = check(h100 + rows + later, "moved")
    assert {p.status for p in moved.pairs} == {"checked"} and moved.exit_code == 0
    for p in moved.pairs:
        own = [r["decode_tok_s"] for r in h100 if r["config_key"] == p.config_key]
        f = next(f for f in p.findings if f.metric.name == "decode_tok_s")
        assert f.change.baseline.median == pytest.approx(statistics.median(own), rel=0.1)
        assert len(p.baseline_runs) == 9 and all(sr.startswith("nightly-") for sr in p.baseline_runs)


def test_a_config_failing_in_every_repeat_is_a_regression():
    rows = fakerows.history(SUITE, ["h200"], 7, seed=8)
    last = newest(rows)
    rows = [r for r in rows if r["suite_run_id"] != last]
    rows += fakerows.night(SUITE, "h200", last, fakerows.START + timedelta(days=6), np.random.default_rng(2),
                           fail={GPU_B1: "CUDA out of memory | tried 2 GiB"})
    report = check(rows, last)
    assert report.exit_code == 1 and [p.config_key for p in report.failed_pairs] == [GPU_B1]
    md = regress_markdown(report)
    assert "### Failed in every repeat" in md and "CUDA out of memory \\| tried 2 GiB" in md


def test_explicit_baselines_compare_repeats():
    rows = fakerows.history(SUITE, ["h100-a"], 4, seed=9, step={"night": 3, "slow": 1.5, "commit": "c" * 40})
    first = rows[0]["suite_run_id"]
    report = check(rows, newest(rows), baseline=Baseline(suite_run_id=first))
    assert report.exit_code == 1 and {p.baseline_runs[0] for p in report.pairs} == {first}
    assert all(f.change.unit == "repeat" for p in report.pairs for f in p.findings)
    by_commit = check(rows, newest(rows), baseline=Baseline(commit=fakerows.COMMITS[0][:7]))
    assert by_commit.exit_code == 1 and all(len(p.baseline_runs) == 3 for p in by_commit.pairs)
    assert "suite run " + first in regress_markdown(report)


def test_thresholds_layer_and_validate(tmp_path):
    assert Gate().thresholds == default_thresholds() and METRICS["ttft_ms"].sign == 1
    default = load_file(DEFAULT_THRESHOLDS)
    assert {k: v for k, v in default.thresholds.items() if v is not None} == default_thresholds()
    assert default.z == Gate().z and default.min_baseline_runs == Gate().min_runs
    f = tmp_path / "t.yaml"
    f.write_text("z: 4\nthresholds: {decode_tok_s: 0.05, itl_p99_ms: 0.5, e2e_ms: null}\n")
    gate = resolve_gate({"decode_tok_s": 0.1, "gpu_alloc_gb": 0.1}, f, {"gpu_alloc_gb": None, "ttft_ms": 0.3})
    assert gate.thresholds["decode_tok_s"] == 0.05 and gate.thresholds["itl_p99_ms"] == 0.5
    assert "e2e_ms" not in gate.thresholds and "gpu_alloc_gb" not in gate.thresholds
    assert gate.thresholds["ttft_ms"] == 0.3 and gate.z == 4 and gate.sources[-1] == "command line"
    assert parse_override("decode_tok_s=10%") == ("decode_tok_s", pytest.approx(0.1))
    assert parse_override("itl_p99_ms=off") == ("itl_p99_ms", None)
    for bad, msg in (("nope=0.1", "unknown metric 'nope'"), ("decode_tok_s", "METRIC=FRACTION"),
                     ("decode_tok_s=1.5", "higher is better"), ("ttft_ms=fast", "not a number")):
        with pytest.raises(UserError, match=msg):
            parse_override(bad)
    f.write_text("thresholds: {decode_tok_s: 0.1}\nzz: 3\n")
    with pytest.raises(UserError, match=r"t.yaml: unknown key 'zz'; allowed keys here: z, "):
        load_file(f)
    with pytest.raises(UserError, match="thresholds: unknown metric 'tok_s'"):
        parse_suite("name: x\nmodels: [{name: t, preset: tiny}]\nthresholds: {tok_s: 0.1}\n")


def test_explicit_thresholds_replace_the_practical_floor_per_metric():
    rows = fakerows.history(SUITE, ["h200"], 12, seed=10, noise=0.01, night_sd=0.01, step={"night": 11, "slow": 1.15})
    default = check(rows, newest(rows))  # 13% slower, far beyond the 1% noise and the 2% floor
    assert default.exit_code == 1 and {f.metric.name for _, f in default.findings("regression")} >= {
        "decode_tok_s", "decode_ms", "ttft_ms", "e2e_ms"}
    old = {m: 0.2 for m in default_thresholds()}  # the fixed 20% of the first release, now an override
    assert check(rows, newest(rows), gate=resolve_gate(old)).exit_code == 0
    tight = resolve_gate({**old, "decode_tok_s": 0.1})
    report = check(rows, newest(rows), gate=tight)
    assert report.exit_code == 1 and {f.metric.name for _, f in report.findings("regression")} == {"decode_tok_s"}
    assert {f.metric.name for _, f in report.findings("noisy")} == set()


def test_regress_reads_old_schema_rows(tmp_path):
    uri = str(tmp_path / "res")
    rows = fakerows.history(SUITE, ["h100-a"], 9, seed=11, step={"night": 8, "slow": 1.3})
    old = [r for r in rows if r["date"] < "2026-11-05"]
    fakerows.write_old_schema(uri, old)
    fakerows.write(uri, [r for r in rows if r["date"] >= "2026-11-05"])
    report = regress(uri)
    assert report.exit_code == 1 and report.suite_run_id == newest(rows)
    f = {f.metric.name: f for p in report.pairs if p.config_key == GPU_B1 for f in p.findings}
    assert f["decode_tok_s"].change.baseline.n == 8 and f["decode_tok_s"].verdict == "regression"
    assert "attainment_decode" not in f  # the old writer had no roofline: only 4 newer nights, not enough


def bench(*args: str, cwd) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("STREAMBENCH_RESULTS", None)
    return subprocess.Popen([*BENCH, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)


def test_cli_exit_codes(tmp_path):
    regressed, clean, short = (str(tmp_path / n) for n in ("regressed", "clean", "short"))
    fakerows.write(regressed, fakerows.history(SUITE, ["h200"], 7, seed=12, step={"night": 6, "slow": 1.4}))
    fakerows.write(clean, fakerows.history(SUITE, ["h200"], 7, seed=12))
    fakerows.write(short, fakerows.history(SUITE, ["h200"], 2, seed=12))
    procs = {  # in parallel: each is a fresh interpreter
        1: bench("regress", "--results", regressed, cwd=tmp_path),
        0: bench("regress", "--results", clean, "--suite", "nightly", cwd=tmp_path),
        3: bench("regress", "--results", short, cwd=tmp_path),
        2: bench("regress", "--results", clean, "--threshold", "decode_tok_s=2", cwd=tmp_path),
    }
    out = {k: (p.wait(timeout=120), *p.communicate()) for k, p in procs.items()}
    for want, (code, stdout, stderr) in out.items():
        assert code == want, (want, stdout[-2000:], stderr[-2000:])
    assert "**❌ regression**" in out[1][1] and "### Regressions" in out[1][1]
    assert "**✅ no regression**" in out[0][1] and "(defaults < suite)" in out[0][1]  # nightly's thresholds
    assert "**⚠️ not enough data**" in out[3][1]
    assert out[2][2].startswith("error: --threshold 'decode_tok_s=2': decode_tok_s: higher is better")
    assert len(out[2][2].strip().splitlines()) == 1
    runner = CliRunner()
    empty = runner.invoke(cli.bench, ["regress", "--results", str(tmp_path / "empty")])
    assert empty.exit_code == 3 and "no suite run to check" in empty.output
    as_json = runner.invoke(cli.bench, ["regress", "--results", regressed, "--format", "json"])
    doc = json.loads(as_json.output)
    assert as_json.exit_code == 1 and doc["exit_code"] == 1 and doc["regressions"] > 0
    unknown = runner.invoke(cli.bench, ["regress", "--results", clean, "--suite-run-id", "nope"])
    assert isinstance(unknown.exception, UserError)
    assert "suite run 'nope' is not in the results" in str(unknown.exception)
    both = runner.invoke(cli.bench, ["regress", "--results", clean, "--baseline-run", "a", "--baseline-commit", "b"])
    assert isinstance(both.exception, UserError) and "exclusive" in str(both.exception)
