"""worker.host.bytecode: torch's bytecode under the cache directory only where the install has none.

Each case runs a fresh interpreter (the decision is per process and must come before `import torch`)
against a stand-in `torch` package on PYTHONPATH, so what is measured is Python's own behaviour:
where it writes bytecode and whether the next process finds it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = ("import json, sys; from worker.host import bytecode; d = bytecode.use_bytecode_cache(); "
         "import torch, torch._inductor.compile_fx; print(json.dumps(d))")


def fake_torch(site: Path) -> Path:
    """A `torch` package with the two modules the decision looks at, and no bytecode."""
    pkg = site / "torch"
    (pkg / "_inductor").mkdir(parents=True)
    (pkg / "__init__.py").write_text("X = 1\n")
    (pkg / "_inductor" / "__init__.py").write_text("")
    (pkg / "_inductor" / "compile_fx.py").write_text("def compile_fx():\n    return 2\n")
    return pkg


def run(site: Path, cache: Path, **env) -> dict:
    base = {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE", "STREAMBENCH_BYTECODE_CACHE")}
    full = {**base, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "STREAMBENCH_CACHE": str(cache), **env}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=full, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def pycs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.pyc"))


def test_no_bytecode_and_not_writable_goes_to_the_cache(tmp_path):
    pkg = fake_torch(tmp_path / "site")
    first = run(tmp_path / "site", tmp_path / "cache", PYTHONDONTWRITEBYTECODE="1")
    assert first["prefix"] == str(tmp_path / "cache" / "pycache")
    assert "no bytecode" in first["reason"]
    written = pycs(tmp_path / "cache" / "pycache")
    assert any(n.startswith("__init__.") for n in written) and any(n.startswith("compile_fx.") for n in written)
    assert pycs(pkg) == []  # nothing beside the sources: PYTHONDONTWRITEBYTECODE's clean tree is kept
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "pycache").rglob("*.pyc")}
    again = run(tmp_path / "site", tmp_path / "cache", PYTHONDONTWRITEBYTECODE="1")
    assert again["prefix"] == first["prefix"]  # the install still has none: the next process reads the cache's
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "pycache").rglob("*.pyc")} == before


def test_an_edited_source_is_recompiled_not_read_stale(tmp_path):
    pkg = fake_torch(tmp_path / "site")
    run(tmp_path / "site", tmp_path / "cache", PYTHONDONTWRITEBYTECODE="1")
    (pkg / "_inductor" / "compile_fx.py").write_text("def compile_fx():\n    return 3  # changed, longer\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE")}
    code = ("from worker.host import bytecode; bytecode.use_bytecode_cache(); "
            "from torch._inductor.compile_fx import compile_fx; print(compile_fx())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**env, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{ROOT}",
                              "STREAMBENCH_CACHE": str(tmp_path / "cache"), "PYTHONDONTWRITEBYTECODE": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3"


@pytest.mark.parametrize("env, reason", [
    ({"STREAMBENCH_BYTECODE_CACHE": "0", "PYTHONDONTWRITEBYTECODE": "1"}, "off"),
    ({"PYTHONPYCACHEPREFIX": "USER", "PYTHONDONTWRITEBYTECODE": "1"}, "the user's PYTHONPYCACHEPREFIX"),
    ({}, "Python writes torch's bytecode beside it"),  # writable install, writing allowed: Python's own way
])
def test_left_alone(tmp_path, env, reason):
    fake_torch(tmp_path / "site")
    env = {k: (str(tmp_path / "user-pyc") if v == "USER" else v) for k, v in env.items()}
    got = run(tmp_path / "site", tmp_path / "cache", **env)
    assert got["prefix"] is None and got["reason"].startswith(reason)
    assert not (tmp_path / "cache" / "pycache").exists()


def test_shipped_bytecode_is_used_as_it_is(tmp_path):
    site = tmp_path / "site"
    fake_torch(site)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(site)], check=True)
    got = run(site, tmp_path / "cache", PYTHONDONTWRITEBYTECODE="1")
    assert got == {"prefix": None, "reason": "torch ships its bytecode"}


def test_too_late_once_torch_is_imported():
    code = ("import torch, json; from worker.host import bytecode; "
            "print(json.dumps(bytecode.use_bytecode_cache()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"prefix": None, "reason": "torch was imported before"}


def test_a_bad_switch_value_is_one_line_exit_2():
    out = subprocess.run([sys.executable, "cli.py", "--help"], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "STREAMBENCH_BYTECODE_CACHE": "maybe"})
    assert out.returncode == 2
    assert "STREAMBENCH_BYTECODE_CACHE='maybe' must be 0 or 1" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("entry", [
    "from orchestrator.cluster.actor import BenchWorker; BenchWorker()",  # a Ray actor's start
    "import cli, sys; sys.argv = ['bench', '--version']\ntry:\n    cli.main()\nexcept SystemExit:\n    pass",
])
def test_engine_processes_decide_before_torch_is_imported(entry):
    """Both entries of an engine process ask before anything imports torch (else the answer would be
    "torch was imported before" and the imports would compile again in every process)."""
    code = f"{entry}\nimport json, sys\nfrom worker.host import bytecode\nprint(json.dumps(bytecode.state()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["reason"] not in ("not asked", "torch was imported before"), got
