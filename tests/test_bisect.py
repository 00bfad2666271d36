"""`bench bisect` without Ray: the search over a fake measurement, the pair and default commits read
from a generated dataset, the baseline that skips `.bisect` suites, and bad input at the CLI."""

from __future__ import annotations

import os
import subprocess
from collections import defaultdict

import numpy as np
import pytest
from benchcli import bench

from orchestrator.bisect.commits import between, resolve
from orchestrator.bisect.pair import choose
from orchestrator.bisect.search import Run, Settings, search
from orchestrator.regress.check import check
from orchestrator.regress.gate import Gate
from orchestrator.regress.metrics import METRICS
from tests import fakerows
from worker.errors import UserError

COMMITS = [f"c{i}" for i in range(10)]
LATENCY = METRICS["decode_ms"].sign  # +1: a rise is worse


class Fake:
    """decode_ms of each commit: ~100 with 1% noise, ~130 from `slow_from` on; `script` gives a
    commit's values in order (then the usual ones), `fail` commits whose runs fail."""

    def __init__(self, slow_from: str | None, script: dict[str, list[float]] | None = None, fail=(), seed=0):
        self.slow = COMMITS.index(slow_from) if slow_from else len(COMMITS)
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.fail, self.rng = set(fail), np.random.default_rng(seed)
        self.calls: dict[str, int] = defaultdict(int)

    def __call__(self, commit: str) -> Run:
        self.calls[commit] += 1
        if commit in self.fail:
            return Run(None, "error: No such option: --kv-offload")
        if self.script.get(commit):
            return Run(self.script[commit].pop(0))
        base = 130.0 if COMMITS.index(commit) >= self.slow else 100.0
        return Run(base * float(np.exp(self.rng.normal(0, 0.01))))


def test_the_search_names_the_slow_commit_with_few_runs():
    fake = Fake("c6")
    out = search(COMMITS, fake, LATENCY)
    assert (out.status, out.first_bad) == ("found", "c6")
    assert all(j.how in ("reference", "noise test") for j in out.judged)
    assert sum(fake.calls.values()) == 3 * 2 + 3 * 3  # references, then log2(9) ≈ 3 commits of 3 runs
    verdicts = {j.commit: j.verdict for j in out.judged}
    assert verdicts["c0"] == "good" and verdicts["c9"] == "bad" and verdicts["c6"] == "bad"


@pytest.mark.parametrize("slow", ["c1", "c9"])
def test_the_first_bad_commit_can_be_next_to_either_end(slow):
    assert search(COMMITS, Fake(slow), LATENCY).first_bad == slow


def test_a_throughput_metric_is_worse_when_it_falls():
    def tok_s(commit: str) -> Run:
        return Run(50.0 if commit >= "c4" else 80.0 + COMMITS.index(commit) * 0.01)

    assert search(COMMITS, tok_s, METRICS["decode_tok_s"].sign).first_bad == "c4"


def test_an_ambiguous_commit_gets_more_runs_until_the_noise_test_decides():
    # c4 (tested first) starts with a wild run, so its spread hides it from both; more runs settle it as good
    fake = Fake("c6", script={"c4": [100.0, 128.0, 101.0]})
    out = search(COMMITS, fake, LATENCY)
    c4 = next(j for j in out.judged if j.commit == "c4")
    assert c4.n > 3 and (c4.verdict, c4.how) == ("good", "noise test")
    assert out.first_bad == "c6"


def test_a_commit_the_noise_test_never_decides_goes_to_the_closer_median():
    wild = [105.0, 125.0, 110.0, 120.0, 115.0, 108.0, 122.0, 114.0]  # half way, spread wide
    out = search(COMMITS, Fake("c6", script={"c4": wild}), LATENCY, Settings(max_repeats=8))
    c4 = next(j for j in out.judged if j.commit == "c4")
    assert c4.n == 8 and c4.how.startswith("closer median") and c4.verdict in ("good", "bad")


def test_an_unreproduced_regression_is_refused_after_extra_repeats():
    fake = Fake(None, script={"c9": [100.6, 100.9, 100.4]})  # bad looks a little worse at first
    out = search(COMMITS, fake, LATENCY, Settings(repeats=3, max_repeats=6))
    assert out.status == "not-reproduced" and out.first_bad is None
    assert fake.calls["c0"] == fake.calls["c9"] == 6  # repeats were added before giving up
    assert set(fake.calls) == {"c0", "c9"}  # nothing between was run
    better = search(COMMITS, lambda c: Run(90.0 if c == "c9" else 100.0 + (c == "c0")), LATENCY)
    assert better.status == "not-reproduced"


def test_a_commit_that_cannot_run_is_skipped():
    fake = Fake("c6", fail={"c4"})
    out = search(COMMITS, fake, LATENCY)
    assert out.first_bad == "c6" and fake.calls["c4"] == 1  # one failed run is enough to skip it
    assert next(j for j in out.judged if j.commit == "c4").verdict == "skip"


def test_skips_at_the_boundary_name_the_candidates():
    out = search(COMMITS, Fake("c5", fail={"c4", "c5"}), LATENCY)
    assert out.status == "undecided" and out.candidates == ["c4", "c5", "c6"]
    fake = Fake("c5", fail={"c0"})
    failed_good = search(COMMITS, fake, LATENCY)
    assert failed_good.status == "undecided" and "good commit c0 could not be measured" in failed_good.message
    assert dict(fake.calls) == {"c0": 1, "c9": 1}  # no repeats of a reference that cannot run


# ---- the pair and its default commits, from the dataset ------------------------------------------------


SUITE = fakerows.suite()
GPU_B8 = fakerows.config_key(SUITE, "gpu", 8)


def _rows(**step):
    rows = fakerows.history(SUITE, ["h100-a"], 10, seed=21, step={"night": 7, "slow": {GPU_B8: 1.3}, **step})
    return rows


def test_the_default_pair_is_the_regressed_one_and_its_commits_bracket_the_step():
    rows = _rows(commit=fakerows.COMMITS[1])
    choice = choose(rows, lambda _: Gate())
    assert choice.pair.config_key == GPU_B8 and choice.pair.hardware_key == rows[0]["hardware_key"]
    assert (choice.good, choice.bad) == (fakerows.COMMITS[0], fakerows.COMMITS[1])
    assert choice.metric.name == "decode_ms"
    explicit = choose(rows, lambda _: Gate(), config_key=GPU_B8[:6], good="abc", bad="def", metric_name="e2e_ms")
    assert (explicit.good, explicit.bad, explicit.metric.name) == ("abc", "def", "e2e_ms")


def test_choosing_a_pair_says_what_is_wrong():
    rows = _rows()
    with pytest.raises(UserError, match="no .config, hardware. pair matches"):
        choose(rows, lambda _: Gate(), config_key="ffff")
    clean = fakerows.history(SUITE, ["h100-a"], 6, seed=22)
    with pytest.raises(UserError, match="none regressed"):
        choose(clean, lambda _: Gate())
    with pytest.raises(UserError, match="did not regress"):
        choose(clean, lambda _: Gate(), config_key=GPU_B8)


def test_bisect_rows_never_form_a_baseline():
    rows = fakerows.history(SUITE, ["h100-a"], 7, seed=23)
    last = rows[-1]["suite_run_id"]
    checked = {p.status for p in check(rows, last).pairs}
    bisect_rows = [{**r, "suite": "nightly.bisect"} if r["suite_run_id"] != last else r for r in rows]
    assert checked == {"checked"} and {p.status for p in check(bisect_rows, last).pairs} == {"no-baseline"}


# ---- git and the command line ------------------------------------------------------------------------


def _git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    r = tmp_path / "repo"
    r.mkdir()
    _git(r, "init", "-q", "-b", "main")
    _git(r, "config", "user.email", "t@example.com")
    _git(r, "config", "user.name", "t")
    for i in range(4):
        (r / "f").write_text(str(i))
        _git(r, "add", "f")
        _git(r, "commit", "-qm", f"c{i}")
    return r


def test_commits_between_good_and_bad(repo):
    shas = _git(repo, "rev-list", "--reverse", "HEAD").split()
    assert between(str(repo), shas[1], shas[-1]) == shas[1:]
    assert resolve(str(repo), shas[2][:8], "--good") == shas[2]
    with pytest.raises(UserError, match="not an ancestor"):
        between(str(repo), shas[-1], shas[1])
    with pytest.raises(UserError, match="same commit"):
        between(str(repo), shas[1], shas[1])
    with pytest.raises(UserError, match="no such commit"):
        resolve(str(repo), "deadbeef", "--good")


def test_bad_input_is_one_line_and_exit_2(tmp_path, repo, bench_here):
    env = {**os.environ, "STREAMBENCH_CACHE": str(tmp_path / "cache")}
    res = tmp_path / "res"
    fakerows.write(str(res), _rows(commit=fakerows.COMMITS[1]))
    cases = [
        (["--results", str(tmp_path / "nothing")], "does not exist"),
        (["--results", str(res), "--repeats", "4", "--max-repeats", "3"], "below --repeats"),
        (["--results", str(res), "--metric", "speed"], "unknown metric"),
        (["--results", str(res), "--repo", str(tmp_path / "nowhere")], "no such directory"),
        (["--results", str(res), "--repo", str(repo)], "no such commit"),  # the fake rows' commits are not there
        (["--results", str(res), "--repo", str(repo), "--good", "HEAD~1", "--bad", "HEAD~1"], "same commit"),
    ]
    for i, (args, message) in enumerate(cases):  # the first as a real process, the rest in this one
        done = (bench if i == 0 else bench_here)("bisect", *args, env=env, cwd=tmp_path)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        err = done.stderr.strip().splitlines()
        assert message in err[-1] and err[-1].startswith("error:") and "Traceback" not in done.stderr, (args, err)
