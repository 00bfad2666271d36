"""tests/siderun.py on a small project of its own: side tests run in another process at nice 19, after
the serial ones in report order, and their failures, skips and passes reach the serial session."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent

CONFTEST = f"""
import sys
sys.path.insert(0, {str(HERE)!r})
import siderun

def pytest_collection_finish(session):
    siderun.plan(session.config, session.items)

def pytest_runtest_logreport(report):
    siderun.record(report)

def pytest_sessionfinish(session, exitstatus):
    siderun.stop()
"""

TESTS = """
import os
import pytest

def where(name):
    with open(os.environ["WHERE"], "a") as f:
        f.write(f"{name} {os.getpid()} {os.nice(0)}\\n")

@pytest.mark.side
def test_side_passes():
    where("side")
    print("printed on the side")

@pytest.mark.side
@pytest.mark.parametrize("n", [1, 2])
def test_side_fails(n):
    assert n == 1, "two is not one"

@pytest.mark.side
def test_side_skips():
    pytest.skip("nothing to do here")

def test_serial():
    where("serial")
"""


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """The small project's session; its temporary files (the side process's) under tmp_path/tmp."""
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "WHERE": str(tmp_path / "where"), "TMPDIR": str(tmp_path / "tmp")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                           f"--basetemp={tmp_path / 'bt'}", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=env, check=False)


def test_side_tests_run_in_a_nice_process_and_report_in_the_serial_session(tmp_path):
    (tmp_path / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (tmp_path / "test_x.py").write_text(textwrap.dedent(TESTS))
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    side: beside\n")
    out = run(tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert "1 failed, 3 passed, 1 skipped" in text, text
    assert "FAILED test_x.py::test_side_fails[2]" in text and "two is not one" in text
    assert "failed in the side process" in text
    assert "nothing to do here" in text and "printed on the side" in text
    lines = [line.split() for line in (tmp_path / "where").read_text().splitlines()]
    (serial,) = [x for x in lines if x[0] == "serial"]
    (side,) = [x for x in lines if x[0] == "side"]
    assert side[1] != serial[1] and side[2] == "19" and serial[2] != "19"
    # the report order: the serial test first, the side ones after it
    order = [line.split(" ", 1)[1] for line in text.splitlines() if line.startswith(("PASSED", "FAILED", "SKIPPED"))]
    assert order and order[0].startswith("test_x.py::test_serial"), order
    assert not list((tmp_path / "tmp").glob("sb-side-*"))  # the side process's files are gone


def test_selecting_only_side_tests_runs_them_in_place(tmp_path):
    (tmp_path / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (tmp_path / "test_x.py").write_text(textwrap.dedent(TESTS))
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    side: beside\n")
    out = run(tmp_path, "-k", "side_passes", "-s")
    assert out.returncode == 0, out.stdout + out.stderr
    (side,) = [line.split() for line in (tmp_path / "where").read_text().splitlines()]
    assert side[2] != "19"  # this process: nothing to overlap with
