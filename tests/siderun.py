"""Tests marked `side` run in a pytest process of their own, started at collection, at the lowest
priority, beside the serial suite; each such test then only reports what that process found.

Why: the suite runs in one process (README: a few timing checks do not hold beside a busy second
core), so on a 2-core machine, CI's, the second core idles most of the time, while a few tests are
long pure computations (the regression gate's false-alarm and power simulations, compiles checked
for the kernels they generate) that no timing check depends on. At nice 19 the side process takes
only what the suite leaves idle, as the Triton-interpreter run of tests/test_quant_kernels.py does.

Only a test that is a pure computation belongs here: no timing assertion, no fixture with state
the serial suite shares (the test's fixtures are set up in the side process; in the serial one only
the test's report is awaited), nothing that listens or starts Ray. Under pytest-xdist (whose
workers would each start one) and where only side tests are selected, nothing moves: they run in
place. The side process writes one JSON line per test phase report (`SIDE_OUT`), read at the first
side test, which the serial order puts last, so the wait overlaps the whole serial run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

SIDE_OUT = "STREAMBENCH_TEST_SIDE_OUT"  # set in the side process: where its reports go
ROOT = Path(__file__).resolve().parents[1]
_run: dict[str, object] = {}  # proc, dir, reports (once read)


def in_side_process() -> bool:
    return bool(os.environ.get(SIDE_OUT))


def under_xdist(config) -> bool:
    return bool(os.environ.get("PYTEST_XDIST_WORKER")) or getattr(config, "workerinput", None) is not None \
        or bool(getattr(config.option, "numprocesses", None))


def plan(config, items: list) -> None:
    """At collection's end (serial process): side tests to the end, their bodies replaced by the wait,
    and the side process started on their node ids."""
    if in_side_process() or under_xdist(config):
        return
    side = [it for it in items if it.get_closest_marker("side")]
    if not side or len(side) == len(items):
        return
    items[:] = [it for it in items if not it.get_closest_marker("side")] + side
    work = Path(tempfile.mkdtemp(prefix="sb-side-"))
    env = {**os.environ, SIDE_OUT: str(work / "reports.jsonl"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *[it.nodeid for it in side]]
    with open(work / "side.log", "w") as log:
        # preexec_fn: at collection, before this process has started any thread
        _run["proc"] = subprocess.Popen(args, cwd=config.rootpath, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        text=True, preexec_fn=lambda: os.nice(19))  # noqa: PLW1509
    _run["dir"] = work
    for it in side:
        it.runtest = _awaiter(it)
        it.fixturenames = []  # nothing to set up here: the side process does it (the list is its siblings' too)
        it.add_marker(pytest.mark.timeout(900))  # the first one waits for what is left of the side process


def _awaiter(item):
    def runtest() -> None:
        reports = _reports()
        mine = reports.get(item.nodeid)
        if not mine:
            tail = (_run["dir"] / "side.log").read_text()[-6000:]  # type: ignore[operator]
            pytest.fail(f"the side process did not report {item.nodeid}:\n{tail}", pytrace=False)
        for r in mine:
            if r["outcome"] == "failed":
                pytest.fail(f"{r['when']} failed in the side process (tests/siderun.py):\n{r['longrepr']}",
                            pytrace=False)
        for r in mine:
            if r["outcome"] == "skipped":
                pytest.skip(r["longrepr"])
        sys.stdout.write("".join(r["stdout"] for r in mine))  # what the test printed, for -s and failures
    return runtest


def _reports() -> dict[str, list[dict]]:
    """The side process's reports by node id, once it has ended."""
    if "reports" not in _run:
        proc = _run["proc"]
        proc.wait()  # type: ignore[attr-defined]
        path = _run["dir"] / "reports.jsonl"  # type: ignore[operator]
        out: dict[str, list[dict]] = {}
        for line in path.read_text().splitlines() if path.exists() else []:
            r = json.loads(line)
            out.setdefault(r["nodeid"], []).append(r)
        _run["reports"] = out
    return _run["reports"]  # type: ignore[return-value]


def record(report) -> None:
    """In the side process: every phase's report, one JSON line (the serial process replays it)."""
    path = os.environ.get(SIDE_OUT)
    if not path or (report.when != "call" and report.outcome == "passed"):
        return
    skip = report.skipped and isinstance(report.longrepr, tuple)
    longrepr = report.longrepr[2] if skip else str(report.longrepr or "")
    line = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome, "longrepr": longrepr,
            "stdout": report.capstdout}
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def stop() -> None:
    """At the session's end: a side process not waited for (interrupted) is killed, and its files go."""
    proc = _run.pop("proc", None)
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()
    work = _run.pop("dir", None)
    _run.pop("reports", None)
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)
