"""`bench submit / results` as a user runs them: exit codes, one-line errors, the embedded default."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import benchcli
import pytest
from click.testing import CliRunner

import cli
from orchestrator.cli.commands import RESULT_VIEW
from orchestrator.results.schema import build_row
from orchestrator.results.store import read_results, write_row
from worker.errors import UserError


def bench(*args: str, tmp_path: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "STREAMBENCH_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    env.pop("RAY_ADDRESS", None)
    return benchcli.bench(*args, timeout=timeout, env=env, cwd=tmp_path)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_address_is_one_line_exit_2_and_fast(tmp_path):
    t0 = time.monotonic()
    done = bench("submit", "--address", f"127.0.0.1:{closed_port()}", tmp_path=tmp_path)
    assert done.returncode == 2, done.stderr
    assert time.monotonic() - t0 < 20
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach a Ray cluster at 127.0.0.1:"), done.stderr
    assert "ray start --head" in lines[0]


def test_invalid_suite_names_the_key_exit_2(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: bad\nmodels: [{name: t, preset: tiny}]\nmatrix: {batch_sise: [1]}\n")
    done = bench("submit", "bad.yaml", "--dry-run", tmp_path=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("error: bad.yaml: matrix: unknown key 'batch_sise'; allowed keys: ")
    assert "batch_size" in done.stderr


def test_detach_without_ray_default_says_how_to_install(tmp_path, monkeypatch):
    """Plain `ray` (no dashboard HTTP stack), simulated by hiding aiohttp: one line, before any connection."""
    from orchestrator.cluster.jobs import client
    from worker.errors import UserError

    monkeypatch.setitem(sys.modules, "aiohttp", None)
    with pytest.raises(UserError) as e:
        client("http://127.0.0.1:1")
    assert str(e.value) == "Ray Jobs need the dashboard: pip install 'ray[default]'"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, "-c", "import sys; sys.modules['aiohttp'] = None; import cli; cli.main()",
                           "submit", "--detach"], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("error: Ray Jobs need the dashboard: pip install 'ray")
    assert len(done.stderr.strip().splitlines()) == 1


def test_dry_run_prints_the_plan_of_the_default_suite():
    result = CliRunner().invoke(cli.bench, ["submit", "--dry-run"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "plan: suite smoke (configs/smoke.yaml): 4 runs" in result.output
    assert all(mode in result.output for mode in ("gpu", "cpu", "ssd", "mixed"))


def test_results_command_formats(tmp_path):
    from tests.test_results import SUITE, failed_outcome, ok_outcome  # noqa: PLC0415 (shared builders)

    a, b = SUITE.specs
    write_row(str(tmp_path), build_row(a, "sr-1", ok_outcome(a)), "s", "2026-11-26")
    write_row(str(tmp_path), build_row(b, "sr-1", failed_outcome("it broke")), "s", "2026-11-26")
    runner = CliRunner()
    out = runner.invoke(cli.bench, ["results", "--results", str(tmp_path), "--format", "json"])
    rows = json.loads(out.output)
    assert out.exit_code == 0 and len(rows) == 2 and {r["status"] for r in rows} == {"ok", "failed"}
    assert set(rows[0]) == set(RESULT_VIEW)
    out = runner.invoke(cli.bench, ["results", "--results", str(tmp_path), "--format", "csv", "--status", "failed",
                                    "--columns", "run_id,error,itl_ms"])
    assert out.output.splitlines() == ["run_id,error,itl_ms", f"{b.run_id},it broke,"]
    out = runner.invoke(cli.bench, ["results", "--results", str(tmp_path), "--columns", "all", "--format", "json",
                                    "--limit", "1"])
    (last,) = json.loads(out.output)
    assert "config_json" in last and "itl_ms" in last
    out = runner.invoke(cli.bench, ["results", "--results", str(tmp_path)], terminal_width=250)
    assert out.exit_code == 0 and out.output.startswith("2 runs")


@pytest.mark.ray
def test_default_submit_runs_the_smoke_suite_on_an_embedded_local_ray(tmp_path):
    t0 = time.monotonic()
    done = bench("submit", "--results", "res", "--suite-run-id", "smoke-test", tmp_path=tmp_path, timeout=240)
    wall = time.monotonic() - t0
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "suite run id: smoke-test" in done.stdout and "4 rows written, 0 failed" in done.stdout
    rows = read_results(str(tmp_path / "res")).to_pylist()
    assert sorted(r["mode"] for r in rows) == ["cpu", "gpu", "mixed", "ssd"]
    assert all(r["status"] == "ok" and r["decode_tok_s"] > 0 for r in rows), [r["error"] for r in rows]
    assert len({tuple(map(tuple, r["output_token_ids"])) for r in rows}) == 1  # every mode, same tokens (greedy)
    assert all(0 < r["measure_s"] < r["wall_s"] for r in rows)
    total, measured = sum(r["wall_s"] for r in rows), sum(r["measure_s"] for r in rows)
    share = next(ln for ln in done.stdout.splitlines() if ln.startswith("time: "))
    assert share == (f"time: {total:,.1f} s of wall time in 4 runs, {measured:,.1f} s in measured rounds "
                     f"({measured / total:.1%} measurement)")
    assert done.stdout.index("time: ") > done.stdout.index("suite smoke")  # under the run table
    assert wall < 120
    again = bench("submit", "--results", "res", "--suite-run-id", "smoke-test", tmp_path=tmp_path)
    assert again.returncode == 0 and "0 rows written, 0 failed, 4 already recorded" in again.stdout
    assert read_results(str(tmp_path / "res")).num_rows == 4


def test_detach_submits_bench_submit_as_a_ray_job(tmp_path, monkeypatch):
    """The request as sent (tests/test_jobs.py runs it on a real Jobs server); no address is contacted."""
    import ray.job_submission

    from orchestrator.cluster import jobs

    submitted, existing = {}, {}

    class FakeJobs:
        def __init__(self, url):
            submitted["url"] = url

        def get_job_info(self, job_id):
            if job_id not in existing:
                raise RuntimeError(f"Request failed with status code 404: Job {job_id} does not exist.")
            return existing[job_id]

        def submit_job(self, **kw):
            submitted.update(kw)
            if kw["runtime_env"]:
                submitted["suite_text"] = (Path(kw["runtime_env"]["working_dir"]) / "suite.yaml").read_text()
            return kw["submission_id"]

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeJobs)
    monkeypatch.setattr(jobs, "check_dashboard", lambda url: None)
    monkeypatch.setattr(jobs, "prefer_token_auth", lambda: False)  # leaves this process's Ray auth mode alone
    suite = tmp_path / "mine.yaml"
    suite.write_text("name: mine\nmodels: [{name: t, preset: tiny}]\n")
    job = jobs.submit_detached(str(suite), suite, "res", "mine-1", "10.0.0.5:6379")
    assert job == "mine-1" and submitted["url"] == "http://10.0.0.5:8265"
    prefix = f"COLUMNS=160 PATH=\"$PATH\":{Path(sys.executable).parent} bench submit "
    assert submitted["entrypoint"] == prefix + f"suite.yaml --results {Path('res').resolve()} --suite-run-id mine-1"
    assert submitted["suite_text"] == suite.read_text() and submitted["metadata"]["suite_run_id"] == "mine-1"
    assert not Path(submitted["runtime_env"]["working_dir"]).exists()  # uploaded by submit_job, then removed
    jobs.submit_detached("nightly", None, "s3://bucket/bench", "n-1", "http://head:8265")
    assert submitted["entrypoint"] == prefix + "nightly --results s3://bucket/bench --suite-run-id n-1"
    assert submitted["runtime_env"] is None and submitted["url"] == "http://head:8265"
    # a suite run resubmitted after its job ended: the next free job id; while it runs: refused
    existing["n-1"] = existing["n-1.2"] = SimpleNamespace(status="FAILED")
    assert jobs.submit_detached("nightly", None, "s3://b", "n-1", "http://head:8265") == "n-1.3"
    assert submitted["entrypoint"].endswith("--suite-run-id n-1")
    existing["n-1.3"] = SimpleNamespace(status="RUNNING")
    with pytest.raises(UserError, match=r"suite run n-1 is already running as job n-1.3 \(RUNNING\)"):
        jobs.submit_detached("nightly", None, "s3://b", "n-1", "http://head:8265")


@pytest.mark.parametrize("address, expected", [
    ("10.0.0.5:6379", ("10.0.0.5", 6379)), ("ray://head:10001", ("head", 10001)), ("head", ("head", 6379)),
    ("ray://head", ("head", 10001)), ("[::1]:6380", ("::1", 6380)),
])
def test_split_address(address, expected):
    from orchestrator.cluster.connect import split_address

    assert split_address(address) == expected
