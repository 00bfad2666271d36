"""Compiled functions kept whole per host, so a later process skips Dynamo instead of re-tracing.

The FX graph and AOTAutograd caches (`compile_cache`) spare a fresh process Inductor's work, but not
Dynamo's: every process still traces each compiled function, builds its guards and hashes its graph
to find the cache entry, most of the compile phase of a fresh process whose caches are warm
(`compile_cache.report`'s timers; measured: benchmarks/results/README.md, setup_h200/v7). torch's
ahead-of-time compile (`aot_compile`) packs what one compile made, bytecode, guards and Inductor's code,
into a file that a later process loads without tracing.

`aot_compiled` (`compiled` uses it unless STREAMBENCH_COMPILE_WHOLE=0) keeps one such file per function
and input signature under `<compile cache dir>/aot`, which `compile_cache` already keys by commit, torch,
CUDA, Triton and GPU: a file is only ever loaded by the code and torch that wrote it. The signature is
every tensor's shape, stride, dtype, device and autograd flags, every other argument's value, and the
grad and inference modes: what the compiled code specialises on and what can change between calls.
A loaded file's own guards are checked once, on the arguments that first need it, and then no more
(they cost a Python call each time): what else they look at, the function's globals and torch's global
settings, does not change inside an engine process.

Exactness: the file holds the kernels Inductor generated for that graph and settings (its
deterministic mode included), so a process that loads them runs what the process that wrote them ran.
Every weight mode and KV tier calls the same functions on the same shapes through this wrapper, so they
stay bit-identical to each other. Where torch cannot compile ahead (an older torch, a function it
cannot serialise) the wrapper falls back on `torch.compile`'s usual path for that signature, in every
process alike, and counts it (`counts()`).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from worker import envs

log = logging.getLogger(__name__)

# None: as STREAMBENCH_COMPILE_WHOLE says (default on); module-level, so a benchmark can compare both
# paths in one command (fill_trace.py --set worker.model.aot:ENABLED=false)
ENABLED: bool | None = None


def enabled() -> bool:
    """Whether `compiled` keeps whole functions (a bad STREAMBENCH_COMPILE_WHOLE is the user's error)."""
    return envs.compile_whole() if ENABLED is None else ENABLED


_lock = threading.Lock()
_counts = {"aot_loaded": 0, "aot_compiled": 0, "aot_fallback": 0}
_errors: list[str] = []  # why signatures fell back or were not kept; the first goes in the run record


def counts() -> dict[str, int]:
    """Since process start: signatures loaded from a file, compiled ahead and written, and run on
    `torch.compile`'s own path because the ahead-of-time one failed."""
    with _lock:
        return dict(_counts)


def first_error() -> str | None:
    """Why the first signature fell back on torch.compile's own path or could not be kept on disk (None:
    none)."""
    with _lock:
        return _errors[0] if _errors else None


def _ahead(fn: Callable, jit: Callable, options: dict, args: tuple, kwargs: dict) -> Any:
    """torch's ahead-of-time compile of `fn` on these arguments. torch 2.13's compiled function has it
    as a method; torch 2.11's only as `aot_compile_fullgraph`, given the backend torch.compile makes."""
    if hasattr(jit, "aot_compile"):
        return jit.aot_compile((args, kwargs))
    import inspect

    from torch._dynamo.aot_compile import aot_compile_fullgraph
    from torch._dynamo.hooks import Hooks

    wrapper = torch._TorchCompileInductorWrapper
    params = inspect.signature(wrapper).parameters
    backend = wrapper(*[{"mode": None, "options": options, "dynamic": False, "name": None}[p] for p in params])
    extra = {"dynamic": False} if "dynamic" in inspect.signature(aot_compile_fullgraph).parameters else {}
    return aot_compile_fullgraph(fn, (args, kwargs), hooks=Hooks(), backend=backend, **extra)


def _note(count: str | None, error: str | None = None) -> None:
    with _lock:
        if count:
            _counts[count] += 1
        if error:
            _errors.append(error)


def _describe(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return (x.shape, x.stride(), x.dtype, x.device, x.requires_grad, x.is_inference())
    if isinstance(x, (tuple, list)):  # a quantized weight's parts (a NamedTuple of tuples)
        return (type(x).__name__, *map(_describe, x))
    if x is None or isinstance(x, (bool, int, float, str, torch.dtype, torch.device)):
        return (type(x), x)
    raise TypeError(f"no signature for an argument of type {type(x).__name__}")


def signature(args: tuple, kwargs: dict) -> tuple:
    """What the compiled code may specialise on, hashable (see the module's docstring): a plain tuple,
    not a pytree walk, since it is built on every call."""
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), *map(_describe, args),
            *((k, _describe(v)) for k, v in sorted(kwargs.items())))


def function_id(fn: Callable) -> str:
    """The function's name and a hash of its code, so two functions of one name (lambdas) never share."""
    code = fn.__code__
    h = hashlib.sha256(repr((code.co_filename, code.co_firstlineno, code.co_code, code.co_consts)).encode())
    name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', 'fn')}"
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name) + "-" + h.hexdigest()[:12]


class AheadCompiled:
    """`fn` compiled once per input signature, each loaded from its file when there is one."""

    def __init__(self, fn: Callable, jit: Callable, options: dict, directory: Path):
        self.fn, self.jit, self.options, self.directory = fn, jit, options, directory / function_id(fn)
        self.variants: dict[tuple, Callable] = {}
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            key = signature(args, kwargs)
        except TypeError:  # an argument this wrapper cannot describe: torch.compile's own guards decide
            return self.jit(*args, **kwargs)
        run = self.variants.get(key)
        if run is None:
            with self._lock:
                run = self.variants.get(key) or self.variants.setdefault(key, self._variant(key, args, kwargs))
        return run(*args, **kwargs)

    def _variant(self, key: tuple, args: tuple, kwargs: dict) -> Callable:
        path = self.directory / (hashlib.sha256(repr(key).encode()).hexdigest()[:24] + ".aot")
        if path.is_file():
            try:
                with open(path, "rb") as f:
                    loaded = torch.compiler.load_compiled_function(f)
                if loaded.guard_check(*args, **kwargs):
                    loaded.disable_guard_check()
                    _note("aot_loaded")
                    return loaded
                log.warning("compile ahead: %s fails its own guards here; compiling it again", path)
            except Exception as e:  # noqa: BLE001 - a damaged or foreign file is compiled again, not fatal
                log.warning("compile ahead: cannot load %s (%s: %s); compiling it again", path, type(e).__name__, e)
        try:
            made = _ahead(self.fn, self.jit, self.options, args, kwargs)
        except Exception as e:  # noqa: BLE001 - any failure of the experimental path falls back on the usual one
            log.debug("compile ahead: %s falls back on torch.compile (%s: %s)", self.fn, type(e).__name__, e)
            _note("aot_fallback", f"{function_id(self.fn)}: {type(e).__name__}: {str(e)[:300]}")
            return self.jit
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            made.save_compiled_function(str(path))  # torch writes a temporary file and renames it
        except Exception as e:  # noqa: BLE001 - compiled already: this process uses it, the next compiles again
            log.warning("compile ahead: cannot keep %s (%s: %s); the next process compiles it again", path,
                        type(e).__name__, e)
            _note(None, f"{function_id(self.fn)} not kept: {type(e).__name__}: {str(e)[:300]}")
        made.disable_guard_check()
        _note("aot_compiled")
        return made


def aot_compiled(fn: Callable, jit: Callable, options: dict, directory: Path) -> Callable:
    """`fn` through files under `directory` (see the module's docstring); `jit` is its torch.compile
    with Inductor's `options`."""
    return AheadCompiled(fn, jit, options, directory)
