"""Shared fixtures: synthetic checkpoints made once per test session.

`tiny_ckpt` is the tiny preset with 2 layers, float32 and a 1000-token vocabulary (the real 128256
makes the embeddings, lm_head and tokenizer ~100x larger and every test slower). `make_ckpt(...)`
makes any variant (`make_ckpt(dtype="bfloat16", num_key_value_heads=8, tie_word_embeddings=True)`)
and caches it by its arguments, so tests asking for the same checkpoint share one directory.
Treat the directories as read-only.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
import siderun  # tests/siderun.py

TINY_DEFAULTS: dict[str, Any] = {"preset": "tiny", "layers": 2, "dtype": "float32", "seed": 0,
                                 "shard_max_gb": 5.0}
TINY_OVERRIDES: dict[str, Any] = {"vocab_size": 1000}


# The files whose tests start a Ray cluster (marked `ray`): under pytest-xdist they run on one worker
RAY_FILES = frozenset({"tests/test_bisect_ray.py", "tests/test_embedded_ray.py", "tests/test_jobs.py",
                       "tests/test_orchestrator.py", "tests/test_orchestrator_cli.py"})


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist (`python -m pytest -q -n 2`, README): a worker takes a test file whole, so
    a file's module fixtures (packs, datasets, servers) are built once, and the files of RAY_FILES
    together, one test after another, in file order: two Ray clusters of this session never run at
    once, as without xdist (the Ray tests' timing bounds and the embedded Ray's socket-table test
    see one Ray). Files go out in collection order (xdist would send the files with most tests
    first: the long Ray unit would be late). An explicit `--dist` other than the default is left to
    xdist. (xdist's own `loadgroup` ignores its marks on pytest >= 9.2: pytest-xdist issue 1386.)"""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FilesRayTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "ray" if path in RAY_FILES else path

    config.option.loadscopereorder = False
    return FilesRayTogether(config, log)


def pytest_collection_modifyitems(config, items):
    """Every test marked `ray` is in a file of RAY_FILES (else xdist would run its cluster beside another)."""
    stray = sorted({item.nodeid.split("::", 1)[0] for item in items if item.get_closest_marker("ray")} - RAY_FILES)
    if stray:
        raise pytest.UsageError(f"tests marked ray in {', '.join(stray)}: add the file to tests/conftest.py RAY_FILES")


def pytest_collection_finish(session) -> None:
    """The Triton-interpreter run of tests/test_quant_kernels.py (the suite's longest test) starts now,
    beside the rest of the suite (`start_interpreter_run` says why), if it is among the tests selected
    (after -k / -m deselection); not under xdist, whose workers would each start one."""
    config = session.config
    siderun.plan(config, session.items)  # tests marked `side`: to a process of their own (tests/siderun.py)
    if siderun.under_xdist(config):
        return
    for item in session.items:
        module = getattr(item, "module", None)
        if item.name == getattr(module, "INTERPRETER_TEST", None) and module.interpreter_run_wanted():
            module.start_interpreter_run(Path(tempfile.mkdtemp(prefix="sb-interp-")))
            config.stash[INTERPRETER_RUN] = module
            return


INTERPRETER_RUN = pytest.StashKey[object]()  # the test module whose interpreter run started at collection


def pytest_runtest_logreport(report) -> None:
    siderun.record(report)  # in the side process only


def pytest_sessionfinish(session, exitstatus):
    siderun.stop()
    module = session.config.stash.get(INTERPRETER_RUN, None)
    if module is not None:
        module.stop_interpreter_run()


@pytest.fixture(scope="session")
def make_ckpt(tmp_path_factory) -> Callable[..., Path]:
    """Factory: `make_ckpt(preset=, layers=, dtype=, seed=, shard_max_gb=, **config_overrides) -> Path`.

    Defaults are those of `tiny_ckpt`; any other keyword is a config.json override (pass
    `vocab_size=128256` for the real vocabulary). The same arguments return the same directory.
    """
    from worker.synth.checkpoints import make_model

    root = tmp_path_factory.mktemp("ckpts")
    made: dict[str, Path] = {}

    def factory(**kwargs: Any) -> Path:
        args = {k: kwargs.pop(k, v) for k, v in TINY_DEFAULTS.items()}
        overrides = {**TINY_OVERRIDES, **kwargs}
        key = json.dumps({**args, "overrides": overrides}, sort_keys=True, default=str)
        if key not in made:
            out = root / hashlib.sha1(key.encode()).hexdigest()[:12]
            made[key] = make_model(out, overrides=overrides, **args)
        return made[key]

    return factory


@pytest.fixture(scope="session")
def tiny_ckpt(make_ckpt) -> Path:
    """The tiny preset: 2 layers, float32, vocabulary 1000 (hidden 256, 8 heads, 2 KV heads)."""
    return make_ckpt()


@pytest.fixture(autouse=True, scope="session")
def _private_lock_dir(tmp_path_factory):
    """The host-wide device and suite-run locks (worker.host.devlock) in a directory of this test
    session's own, so a `bench` running beside the tests (or another test session) cannot block them."""
    import os

    old = os.environ.get("STREAMBENCH_LOCK_DIR")
    os.environ["STREAMBENCH_LOCK_DIR"] = str(tmp_path_factory.mktemp("locks"))
    yield
    if old is None:
        os.environ.pop("STREAMBENCH_LOCK_DIR", None)
    else:
        os.environ["STREAMBENCH_LOCK_DIR"] = old


@pytest.fixture(autouse=True)
def _engine_process_settings():
    """A run in this process sets OMP_NUM_THREADS and MALLOC_ARENA_MAX where they are unset (the seed's
    engine settings: 8 threads) and torch's thread count from them. Undone after each test: one test's
    run left 8 torch threads on a 2-core box, and OMP_NUM_THREADS=8 for every child, to all later
    tests (OpenMP threads that outnumber the cores make timings erratic under load)."""
    import os

    import torch

    saved, threads = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MALLOC_ARENA_MAX")}, torch.get_num_threads()
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    torch.set_num_threads(threads)


@pytest.fixture()
def bench_here(monkeypatch, capsys) -> Callable[..., Any]:
    """`bench_here(*args, env=None, cwd=None)`: the `bench` command run in this process, returning what
    `benchcli.bench` returns for a real one (benchcli.bench_inprocess: which to use when)."""
    import functools

    from benchcli import bench_inprocess

    return functools.partial(bench_inprocess, monkeypatch, capsys)


@pytest.fixture()
def tiny_run(tiny_ckpt, tmp_path, monkeypatch) -> dict[str, Any]:
    """Flat settings of a quick in-process `worker.run.run` of the tiny preset in `mixed` mode (layer 0
    in the CPU tier, layer 1 on the SSD), with its own cache and pack dirs; override keys as needed."""
    monkeypatch.setenv("STREAMBENCH_CACHE", str(tmp_path / "cache"))
    for var in ("OMP_NUM_THREADS", "MALLOC_ARENA_MAX"):  # a run sets them: restore afterwards
        monkeypatch.setenv(var, "2")
    return {"checkpoints": str(tiny_ckpt), "prompt_len": 8, "batch_size": 1, "max_new_tokens": 6, "max_seq_len": 64,
            "temperature": 0.0, "warmup_rounds": 1, "pack_dir": str(tmp_path / "pack"), "out_json": None,
            "mode": "mixed", "gpu_cached_layers": 0, "cpu_cache_layers": 1}
