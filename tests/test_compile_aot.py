"""Whole compiled functions per host (worker.model.aot, issue 13 item 3): a later process loads them.

Each process here compiles view-only functions (Inductor on the CPU, no C++ kernel to build), so a
round trip takes seconds. The first process of a commit compiles ahead and writes one file per input
signature; the next loads them without tracing, with the same results; a damaged file is compiled
again instead of failing the run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_compile_cache import _process as compile_process

from worker.errors import UserError
from worker.model import aot

SCRIPT = """
import json, sys
import torch
from worker.host import hostinfo
hostinfo.git_commit = lambda: sys.argv[1]  # pretend to be this commit of a clean tree
hostinfo.git_dirty = lambda: False
from worker.model import compile_cache
from worker.model.compiled import compiled
f = compiled(lambda x, n: x.t()[n:])
x = torch.arange(12.0).view(3, 4)
with torch.inference_mode():
    out = [f(x, 1).tolist(), f(x, 2).tolist(), f(x, 1).tolist()]  # two signatures, the first again
print(json.dumps({**compile_cache.report(), "out": out}))
"""


LAZY_BACKEND = SCRIPT.replace("from worker.model import compile_cache\n",
                              "from worker.model import compile_cache\ncompile_cache.BACKEND_AHEAD = False\n").replace(
    '"out": out}', '"out": out, "compile_fx": "torch._inductor.compile_fx" in sys.modules}')


def _process(tmp_path: Path, commit: str, script: str | None = None, **env: str) -> dict:
    """A fresh process runs this module's SCRIPT (or `script`): its report and its outputs."""
    return compile_process(tmp_path, commit, script or SCRIPT, **env)


def _files(report: dict) -> list[Path]:
    return sorted((Path(report["inductor_dir"]) / "aot").rglob("*.aot"))


@pytest.mark.side
def test_a_later_process_loads_whole_functions_without_tracing_them(tmp_path):
    first = _process(tmp_path, commit="1" * 40)
    x = torch.arange(12.0).view(3, 4)
    assert first["out"] == [x.t()[1:].tolist(), x.t()[2:].tolist(), x.t()[1:].tolist()]
    assert first["aot_compiled"] == 2 and first["aot_loaded"] == 0 and first["aot_fallback"] == 0
    assert first["compiled_from_cache"] is False and first["aot_error"] is None
    assert len(_files(first)) == 2  # one file per signature, in the commit's own directory

    second = _process(tmp_path, commit="1" * 40)
    assert second["out"] == first["out"]
    assert second["aot_loaded"] == 2 and second["aot_compiled"] == 0
    assert second["compiled_from_cache"] is True and second["graphs"] == 2
    assert not second["seconds"].get("bytecode_tracing")  # nothing traced: that is the point

    other = _process(tmp_path, commit="2" * 40)  # another commit never loads this one's files
    assert other["aot_compiled"] == 2 and other["aot_loaded"] == 0 and other["inductor_dir"] != first["inductor_dir"]


@pytest.mark.side
def test_a_damaged_file_is_compiled_again_and_the_run_goes_on(tmp_path):
    first = _process(tmp_path, commit="1" * 40)
    for p in _files(first):
        p.write_bytes(b"not a compiled function")
    again = _process(tmp_path, commit="1" * 40)
    assert again["out"] == first["out"]
    assert again["aot_compiled"] == 2 and again["aot_loaded"] == 0 and again["aot_fallback"] == 0
    assert _process(tmp_path, commit="1" * 40)["aot_loaded"] == 2  # rewritten whole


@pytest.mark.side
def test_a_process_that_loads_every_function_need_not_import_inductors_backend(tmp_path):
    assert "BACKEND_AHEAD = False" in LAZY_BACKEND and '"compile_fx"' in LAZY_BACKEND
    first = _process(tmp_path, commit="1" * 40, script=LAZY_BACKEND)
    assert first["aot_compiled"] == 2 and first["compile_fx"] is True  # compiling imported it when needed
    second = _process(tmp_path, commit="1" * 40, script=LAZY_BACKEND)
    assert second["aot_loaded"] == 2 and second["compile_fx"] is False and second["out"] == first["out"]


@pytest.mark.side
def test_the_variable_turns_it_off_for_a_process(tmp_path):
    off = _process(tmp_path, commit="1" * 40, STREAMBENCH_COMPILE_WHOLE="0")
    assert off["aot_compiled"] == off["aot_loaded"] == 0 and off["fxgraph_cache_miss"] >= 1
    assert not _files(off)


def test_a_bad_value_of_the_variable_is_the_users_error(monkeypatch):
    monkeypatch.setattr(aot, "ENABLED", None)
    monkeypatch.setenv("STREAMBENCH_COMPILE_WHOLE", "maybe")
    with pytest.raises(UserError, match="STREAMBENCH_COMPILE_WHOLE='maybe' must be 0 or 1"):
        aot.enabled()
    monkeypatch.setenv("STREAMBENCH_COMPILE_WHOLE", "0")
    assert aot.enabled() is False
    monkeypatch.delenv("STREAMBENCH_COMPILE_WHOLE")
    assert aot.enabled() is True  # the default


def test_the_signature_separates_what_compiled_code_specialises_on():
    x = torch.zeros(2, 3)
    sig = aot.signature
    base = sig((x, 1e-5, 4), {})
    assert sig((torch.ones(2, 3), 1e-5, 4), {}) == base  # the values of a tensor are not in it
    for other in [(torch.zeros(3, 2), 1e-5, 4), (torch.zeros(3, 2).t(), 1e-5, 4),  # shape, stride
                  (x.double(), 1e-5, 4), (x, 1e-6, 4), (x, 1e-5, 8), (x, 1e-5, 4.0)]:  # dtype, values, type
        assert sig(other, {}) != base
    assert sig((x, 1e-5), {"n": 4}) != sig((x, 1e-5, 4), {})
    with torch.no_grad():
        assert sig((x, 1e-5, 4), {}) != base
    with torch.inference_mode():
        assert sig((x, 1e-5, 4), {}) != base
    parts = (("int4", ((torch.zeros(2, 2, dtype=torch.int32), torch.zeros(2)),)),)  # a quantized weight's parts
    assert sig(parts, {}) != sig((("int8", ((torch.zeros(2, 2, dtype=torch.int32), torch.zeros(2)),)),), {})
    with pytest.raises(TypeError, match="object"):
        sig((object(),), {})


def _jit_counting(fn):
    calls = []

    def jit(*args, **kwargs):
        calls.append(args)
        return fn(*args, **kwargs)

    return jit, calls


def test_an_argument_without_a_signature_takes_torch_compiles_own_path(tmp_path):
    fn = lambda x, obj: x + 1
    jit, calls = _jit_counting(fn)
    wrapped = aot.aot_compiled(fn, jit, {}, tmp_path)
    assert torch.equal(wrapped(torch.zeros(2), object()), torch.ones(2))
    assert len(calls) == 1 and not any(tmp_path.rglob("*"))  # nothing compiled ahead, nothing written


def test_a_failed_ahead_compile_falls_back_and_says_why(tmp_path, monkeypatch):
    def refuse(*_):
        raise RuntimeError("cannot serialise this")

    monkeypatch.setattr(aot, "_ahead", refuse)
    monkeypatch.setattr(aot, "_errors", [])
    before = aot.counts()["aot_fallback"]
    fn = lambda x: x * 2
    jit, calls = _jit_counting(fn)
    wrapped = aot.aot_compiled(fn, jit, {}, tmp_path)
    for _ in range(3):
        assert torch.equal(wrapped(torch.ones(2)), torch.full((2,), 2.0))
    assert len(calls) == 3 and aot.counts()["aot_fallback"] == before + 1  # decided once per signature
    assert "cannot serialise this" in aot.first_error() and aot.function_id(fn) in aot.first_error()


def _view(x: torch.Tensor) -> torch.Tensor:
    return x.t()[1:]


def test_torch_without_the_compiled_functions_method_compiles_ahead_all_the_same(tmp_path):
    """torch 2.11 (the H200's) has no `aot_compile` on a compiled function, only
    `aot_compile_fullgraph` given torch.compile's backend: `_ahead` takes that route for any callable
    without the method, and what it makes saves, loads and computes the same."""
    jit = torch.compile(_view, dynamic=False, fullgraph=True)
    x = torch.arange(12.0).view(3, 4)
    made = aot._ahead(_view, lambda *a: jit(*a), {}, (x,), {})
    assert torch.equal(made(x), _view(x))
    made.save_compiled_function(str(tmp_path / "f.aot"))
    with open(tmp_path / "f.aot", "rb") as f:
        loaded = torch.compiler.load_compiled_function(f)
    assert loaded.guard_check(x) and torch.equal(loaded(x), _view(x))


def test_a_cache_that_cannot_be_written_costs_the_file_not_the_compile(tmp_path, monkeypatch, caplog):
    """A read-only or full cache directory: the function compiled ahead is used all the same (no second
    compile on torch.compile's path), the next process compiles it again, and the run record says why."""
    monkeypatch.setattr(aot, "_errors", [])
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    jit = torch.compile(_view, dynamic=False, fullgraph=True)
    calls = []
    wrapped = aot.aot_compiled(_view, lambda *a: calls.append(a) or jit(*a), {}, blocked)
    before = aot.counts()
    x = torch.arange(12.0).view(3, 4)
    with caplog.at_level("WARNING", logger="worker.model.aot"):
        assert torch.equal(wrapped(x), _view(x)) and torch.equal(wrapped(x), _view(x))
    assert calls == []  # never torch.compile's own path
    assert aot.counts()["aot_compiled"] == before["aot_compiled"] + 1 and aot.counts()["aot_fallback"] == before["aot_fallback"]
    assert "not kept" in aot.first_error() and "cannot keep" in caplog.text
