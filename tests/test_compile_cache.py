"""Compiled kernels persist per host and commit (worker.model.compile_cache, issue 13 item 3).

The key separates what must not share kernels (torch, commit, a dirty tree's changes); processes
of one key share a directory under the project's cache dir, and the second one's graphs come from
the cache, which `report` says from torch's own counters. Each process here compiles a view-only
function (Inductor on the CPU, no C++ kernel to build), so a round trip takes seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker import envs
from worker.host import hostinfo
from worker.model import compile_cache

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import json, sys
import torch
from worker.host import hostinfo
hostinfo.git_commit = lambda: sys.argv[1]  # pretend to be this commit of a clean tree
hostinfo.git_dirty = lambda: False
from worker.model import aot, compile_cache
aot.ENABLED = False  # torch.compile's own path: its caches (tests/test_compile_aot.py: whole functions)
from worker.model.compiled import compiled
f = compiled(lambda x: x.t()[1:])
assert f(torch.arange(12.0).view(3, 4)).shape == (3, 3)
print(json.dumps(compile_cache.report()))
"""

AHEAD = """
import json, sys
import torch
from worker.host import hostinfo
hostinfo.git_commit = lambda: sys.argv[1]
hostinfo.git_dirty = lambda: False
from worker.model import aot, compile_cache
aot.ENABLED = False
started, again = compile_cache.prepare_ahead(), compile_cache.prepare_ahead()
from worker.model.compiled import compiled
f = compiled(lambda x: x.t()[1:])  # its prepare() waits for the thread's
assert f(torch.arange(12.0).view(3, 4)).shape == (3, 3)
print(json.dumps({"started": started, "again": again, **compile_cache.report()}))
"""


def _process(tmp_path: Path, commit: str, script: str = SCRIPT, **env: str) -> dict:
    """A fresh process runs `script` (compiles) with the cache dir under tmp_path and `env`: its report
    (tests/test_compile_aot.py uses it too)."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "STREAMBENCH_COMPILE_WHOLE")}
    done = subprocess.run([sys.executable, "-c", script, commit], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, check=False, env={**clean, "STREAMBENCH_CACHE": str(tmp_path / "cache"), **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


PARTS = {"torch": "2.13.0+cu130", "cuda": "13.0", "triton": "3.6.0", "python": "3.11.7", "device": "NVIDIA H200",
         "capability": "9.0", "commit": "c3964f7" + "0" * 33, "engine_version": None, "diff": None}


def test_the_key_separates_torch_versions_commits_devices_and_dirty_trees():
    base = compile_cache.cache_key(PARTS)
    others = [{**PARTS, "torch": "2.14.0+cu130"}, {**PARTS, "commit": "a" * 40}, {**PARTS, "triton": "3.7.0"},
              {**PARTS, "device": "NVIDIA H100 80GB HBM3"}, {**PARTS, "capability": "10.0"},
              {**PARTS, "cuda": "12.8"}, {**PARTS, "python": "3.12.1"},
              {**PARTS, "diff": "0123456789abcdef"}, {**PARTS, "diff": "fedcba9876543210"}]
    keys = [compile_cache.cache_key(p) for p in others]
    assert len({base, *keys}) == len(others) + 1
    assert compile_cache.cache_key(dict(PARTS)) == base  # stable
    assert base.startswith("torch2.13.0_cu130-c3964f7000-") and "dirty" not in base
    assert "-dirty-" in compile_cache.cache_key({**PARTS, "diff": "0123456789abcdef"})
    assert "/" not in base


def test_key_parts_describe_this_process():
    parts = compile_cache.key_parts()
    assert parts["torch"] == __import__("torch").__version__
    assert parts["commit"] == hostinfo.git_commit()
    assert (parts["diff"] is not None) == bool(hostinfo.git_dirty())  # a dirty tree gets its changes' hash


def test_a_dirty_tree_gets_its_own_directory(monkeypatch):
    monkeypatch.setattr(hostinfo, "git_commit", lambda: "c" * 40)
    monkeypatch.setattr(hostinfo, "git_dirty", lambda: False)
    clean = compile_cache.cache_dir(compile_cache.key_parts())
    monkeypatch.setattr(hostinfo, "git_dirty", lambda: True)
    monkeypatch.setattr(hostinfo, "git_diff_hash", lambda: "0123456789abcdef")
    dirty = compile_cache.cache_dir(compile_cache.key_parts())
    assert dirty != clean and dirty.name.startswith(clean.name.rsplit("-", 1)[0] + "-dirty-")
    assert compile_cache.cache_dir(compile_cache.key_parts()) == dirty  # the same changes share
    monkeypatch.setattr(hostinfo, "git_diff_hash", lambda: None)  # changes that cannot be read share nothing
    assert len({compile_cache.cache_dir(compile_cache.key_parts()) for _ in range(2)} | {clean, dirty}) == 4


def test_nothing_compiled_reports_none():
    since = compile_cache.counters()
    got = compile_cache.report(since)
    assert got["compiled_from_cache"] is None and got["graphs"] == 0
    assert all(v == 0 for v in got["seconds"].values())  # no compile in the window: no compile seconds


@pytest.mark.side
def test_second_process_of_a_commit_loads_the_cache_and_another_commit_does_not(tmp_path):
    first = _process(tmp_path, commit="1" * 40)
    root = tmp_path / "cache" / "compile"
    assert Path(first["inductor_dir"]).parent == root and first["user_dirs"] == []
    assert first["triton_dir"] == os.path.join(first["inductor_dir"], "triton")
    assert first["compiled_from_cache"] is False and first["fxgraph_cache_miss"] >= 1
    assert first["entries_before"] == 0 and any(Path(first["inductor_dir"]).rglob("*"))
    assert first["prepared_ahead"] is False and first["prepare_s"] > 0  # the compile prepared itself

    second = _process(tmp_path, commit="1" * 40)
    assert second["inductor_dir"] == first["inductor_dir"] and second["key"] == first["key"]
    assert second["entries_before"] > 0
    assert second["compiled_from_cache"] is True and second["fxgraph_cache_hit"] >= 1
    assert second["fxgraph_cache_miss"] == 0
    # torch's own timers of the compile: the whole of it, and its parts inside it
    sec = second["seconds"]
    assert sec["_compile.compile_inner"] > 0 and 0 < sec["bytecode_tracing"] <= sec["_compile.compile_inner"]
    assert set(sec) <= set(compile_cache.TIMERS)

    other = _process(tmp_path, commit="2" * 40)
    assert other["inductor_dir"] != first["inductor_dir"]
    assert other["compiled_from_cache"] is False and other["entries_before"] == 0


def test_preparing_ahead_runs_once_on_its_own_thread_and_the_compile_waits_for_it(tmp_path):
    got = _process(tmp_path, commit="1" * 40, script=AHEAD)
    assert got["started"] is True and got["again"] is False  # one thread per process
    assert got["prepared_ahead"] is True and got["prepare_s"] > 0
    assert got["graphs"] == 1 and Path(got["inductor_dir"]).parent == tmp_path / "cache" / "compile"


def test_a_users_cache_dirs_win_and_torchs_own_default_does_not(monkeypatch, tmp_path):
    ours, mine, default = str(tmp_path / "ours"), str(tmp_path / "mine"), "/tmp/torchinductor_someone"
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):  # restored after the test
        monkeypatch.delenv(var, raising=False)

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default)  # what importing torch._inductor sets
    got = envs.use_compile_cache(ours, torch_default=default)
    assert got == {"inductor_dir": ours, "triton_dir": os.path.join(ours, "triton"), "user_dirs": []}
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == ours

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", mine)
    monkeypatch.delenv("TRITON_CACHE_DIR")
    got = envs.use_compile_cache(ours, torch_default=default)
    assert got == {"inductor_dir": mine, "triton_dir": None, "user_dirs": ["TORCHINDUCTOR_CACHE_DIR"]}
    assert "TRITON_CACHE_DIR" not in os.environ  # torch keeps Triton's under the user's directory

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default)
    monkeypatch.setenv("TRITON_CACHE_DIR", mine)
    got = envs.use_compile_cache(ours, torch_default=default)
    assert got == {"inductor_dir": ours, "triton_dir": mine, "user_dirs": ["TRITON_CACHE_DIR"]}


def test_a_run_refused_on_its_checkpoint_starts_no_compiler_thread(tmp_path, monkeypatch):
    """The side thread is not a daemon: started before the checkpoint check, a refused run would wait
    for the compiler's import (seconds on a GPU host) before it could exit."""
    import worker.engine
    from worker.errors import UserError
    from worker.run import resolve_config, run

    started = []
    monkeypatch.setattr(worker.engine, "compiles", lambda run_cfg, device: True)  # as on CUDA
    monkeypatch.setattr(compile_cache, "prepare_ahead", lambda **_: started.append(1) or True)
    (tmp_path / "ckpt").mkdir()  # no config.json
    cfg = resolve_config({"checkpoints": str(tmp_path / "ckpt"), "roofline": False})
    assert cfg.compile_ahead  # the default
    with pytest.raises(UserError):
        run(cfg)
    assert started == []


@pytest.mark.parametrize("fails", [False, True])
def test_the_ahead_thread_shortens_the_switch_interval_only_while_it_imports(monkeypatch, fails):
    """The fill's reader threads wait for the GIL the imports hold: a shorter interval while they run,
    the interpreter's own again afterwards, also when the preparation fails (the build retries it)."""
    seen = []

    def fake_prepare():
        seen.append(sys.getswitchinterval())
        if fails:
            raise OSError("no cache dir")
        return {"key": "k"}

    monkeypatch.setattr(compile_cache, "_prepared", {})
    monkeypatch.setattr(compile_cache, "_prepare", fake_prepare)
    before = sys.getswitchinterval()
    assert before > compile_cache.AHEAD_SWITCH_S  # the default, 5 ms
    compile_cache._prepare_quietly()
    assert seen == [pytest.approx(compile_cache.AHEAD_SWITCH_S)]
    assert sys.getswitchinterval() == before
    assert compile_cache._prepared == ({} if fails else {"key": "k", "prepare_s": pytest.approx(0, abs=1),
                                                          "prepared_ahead": False})


def test_the_ahead_thread_imports_only_once_the_fill_leaves_the_host(monkeypatch):
    """`after` (the run's: its CPU tier fill from the page cache is over) holds the imports back."""
    import threading

    seen = []
    monkeypatch.setattr(compile_cache, "_prepared", {})
    monkeypatch.setattr(compile_cache, "_prepare", lambda: seen.append(1) or {"key": "k"})
    host_free = threading.Event()
    t = threading.Thread(target=compile_cache._prepare_quietly, args=(host_free,))
    t.start()
    t.join(0.3)
    assert t.is_alive() and seen == []  # waiting for the fill
    host_free.set()
    t.join(5)
    assert not t.is_alive() and seen == [1]


@pytest.mark.parametrize("mode,held", [("cpu", True), ("ssd", False)])
def test_a_run_holds_the_import_for_its_cpu_tier_fill_only(tiny_run, monkeypatch, mode, held):
    """The run's `host_free` is still clear when a build with a CPU tier starts (its fill sets it), set
    already for a build without one, and set on the run's way out either way."""
    import worker.engine
    from worker.run import resolve_config, run

    build = worker.engine.build_engine
    seen = []

    def recording(*a, on_host_free=None, **k):
        event = on_host_free.__self__
        seen.append((event, event.is_set()))
        return build(*a, on_host_free=on_host_free, **k)

    monkeypatch.setattr(worker.engine, "build_engine", recording)
    run(resolve_config({**tiny_run, "mode": mode}))
    [(event, at_build)] = seen
    assert at_build is (not held) and event.is_set()
