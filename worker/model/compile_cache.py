"""Compiled kernels persist per host: torch's compile caches under the project's cache directory.

The second process of a config then loads what the first one compiled instead of compiling again:
Inductor's FX graph cache and the AOTAutograd cache (a hit skips lowering, code generation and,
with Triton's kernels bundled into the entry or found in Triton's own cache, their compilation).
On that path Dynamo still traces each function in every process; `worker.model.aot` keeps each function
whole per input signature under `<key>/aot` as well, so a later process loads it without tracing.

Everything lives in `<envs.cache_dir()>/compile/<key>`, the key a hash of what makes generated
kernels differ or go stale: torch, CUDA and Triton versions, the GPU (name and compute capability;
the CPU model on a CPU), the Python version, and the source tree's commit, plus the hash of its
uncommitted changes, so a dirty tree never shares a clean commit's entries. torch keys each entry
by the graph and the compile settings as well; the directory key is hygiene on top of that: a new
commit or torch starts afresh, and a stale directory can be deleted whole. A user's own
TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR wins (reported as `user_dirs`).

Determinism: a hit loads the code an earlier process generated for the same graph and settings.
With Inductor's deterministic mode (`compiled`) that code involves no timing-based choice, so it
is what this process would have generated itself: same kernels, same tokens, cached or not.

Ahead of the build: importing torch._dynamo and Inductor (what `prepare` and the first compile's
backend import) takes seconds of host time, once per process. A run that will compile starts
`prepare_ahead` first thing, so that import runs on a thread of its own while the main thread loads
the tokenizer and uploads the resident weights (mostly waits on reader threads and copies); the
model build's `prepare` then only waits for what is left of it. The kernels, their cache and the
tokens are the same either way: only when the modules are imported changes. A CPU tier fill from the
page cache runs before the import starts (`after`): beside it, that fill went at 0.59-0.65 of the
page cache's rate into fresh memory, without it at 0.71-0.93 (benchmarks/results/setup_h200/v7, N),
and the import is no shorter for running beside a fill that takes a fraction of a second; a fill
from the disk, seconds long and bound by the disk, lets it start as soon as its reads are issued.

`report(since)` says what this process (or the window since `counters()` was taken) compiled and
whether all of it came from the cache: `compiled_from_cache` is True when every compiled graph was
a cache hit, False when any was compiled afresh, None when nothing was compiled. Its `seconds` are
torch's own compile timers over the same window (`TIMERS`): how much of a compile from the cache is
Dynamo's tracing and guards and how much the loading of cached code, which decides what could
shorten it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from worker import envs
from worker.host import hostinfo

log = logging.getLogger(__name__)

_lock = threading.Lock()
_prepared: dict[str, Any] = {}  # what prepare() set up in this process
_ahead: list[threading.Thread] = []  # prepare_ahead's thread, once started

COUNTERS = {"fxgraph_cache_hit": ("inductor", "fxgraph_cache_hit"),
            "fxgraph_cache_miss": ("inductor", "fxgraph_cache_miss"),
            "fxgraph_cache_bypass": ("inductor", "fxgraph_cache_bypass"),
            "autograd_cache_hit": ("aot_autograd", "autograd_cache_hit"),
            "autograd_cache_miss": ("aot_autograd", "autograd_cache_miss"),
            "autograd_cache_bypass": ("aot_autograd", "autograd_cache_bypass")}


def key_parts() -> dict[str, Any]:
    """What the cached kernels depend on, as seen by this process."""
    cuda = torch.cuda.is_available()
    commit, dirty = hostinfo.git_commit(), hostinfo.git_dirty()
    diff = hostinfo.git_diff_hash() if dirty else None
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": hostinfo.dist_version("triton", "pytorch-triton"),
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if cuda else f"cpu:{hostinfo.cpu_model()}",
        "capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
        "commit": commit,
        "engine_version": None if commit else hostinfo.engine_version(),
        # a dirty tree whose diff cannot be read shares with nothing
        "diff": diff if diff or not dirty else f"unreadable-{uuid.uuid4().hex}",
    }


def cache_key(parts: dict[str, Any]) -> str:
    """A readable, path-safe key: torch version, short commit, `-dirty`, and a hash of all parts."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    commit = (parts.get("commit") or "nocommit")[:10]
    head = f"torch{parts.get('torch')}-{commit}{'-dirty' if parts.get('diff') else ''}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", head) + "-" + digest


def cache_dir(parts: dict[str, Any]) -> Path:
    return _keyed(cache_key(parts))


def _keyed(key: str) -> Path:
    return Path(envs.cache_dir()) / "compile" / key


def aot_dir() -> Path:
    """Where `worker.model.aot` keeps whole compiled functions: under this process's keyed directory."""
    return _keyed(prepare()["key"]) / "aot"


def prepare() -> dict[str, Any]:
    """Once per process, before the first compile: the cache directories set and the caches on.
    Returns what `report` starts from (key, directories, files already there, `prepare_s`: the host
    seconds it took, `prepared_ahead`: whether on `prepare_ahead`'s thread). Waits for that thread's
    preparation when one is under way."""
    with _lock:
        return _prepare_locked()


def _prepare_locked() -> dict[str, Any]:
    """`prepare` with `_lock` held by the caller."""
    if not _prepared:
        t = time.perf_counter()
        _prepared.update(_prepare())
        _prepared.update(prepare_s=time.perf_counter() - t,
                         prepared_ahead=threading.current_thread().name == AHEAD_THREAD)
    return dict(_prepared)


AHEAD_THREAD = "compile-prepare"

# Import Inductor's compile_fx in `prepare` (on the ahead thread) rather than at the first compile. A process
# whose compiled functions all load whole (worker.model.aot) never compiles, and the import is a third of
# the compiler's (benchmarks/results/setup_h200/v7/R/importtime_top.txt); False leaves it to the first
# compile that needs it. Module-level for an A/B (setup_h200/v7/callAA.sh, not yet run on a GPU).
BACKEND_AHEAD = True


AHEAD_HOLD_S = 60.0  # the longest the thread waits for `after` (a run sets it on every way out)


def prepare_ahead(after: threading.Event | None = None) -> bool:
    """Start `prepare` on a thread of its own (see the module's docstring), once `after` is set (the run's
    CPU tier fill from the page cache, which goes at the source's rate only with the host to itself).
    True when this call started it; False when this process is prepared already or a thread is at it.
    Not a daemon: an interpreter that exits (a run that failed on bad input) waits for the imports
    instead of finalizing in the middle of one."""
    with _lock:
        if _prepared or _ahead:
            return False
        _ahead.append(threading.Thread(target=_prepare_quietly, args=(after,), name=AHEAD_THREAD))
    _ahead[0].start()
    return True


AHEAD_SWITCH_S = 0.0005  # the interpreter's switch interval while the ahead thread imports


def _prepare_quietly(after: threading.Event | None = None) -> None:
    """`prepare_ahead`'s thread: a failure is the build's to raise (its own `prepare` tries again).

    The imports hold the GIL for long stretches, and at the interpreter's default switch interval
    (5 ms) every reader thread of the CPU tier's fill, back from a read of the page cache, waits up to
    that long for it (benchmarks/results/setup_h200/v4: the page-cache fill, slowed beside this thread). While
    the imports run, the interval is shorter, so the GIL changes hands sooner; restored when they are
    done, before the build's `prepare` returns and so before anything is measured."""
    if after is not None and not after.wait(AHEAD_HOLD_S):
        log.debug("compile cache: preparing ahead without waiting longer for the fill")
    previous = sys.getswitchinterval()
    sys.setswitchinterval(min(previous, AHEAD_SWITCH_S))
    try:
        with _lock:  # restored while the lock is held: the build's prepare() waits for it
            try:
                _prepare_locked()
            finally:
                sys.setswitchinterval(previous)
    except Exception:  # re-raised where it matters: by the build's own prepare()
        log.debug("compile cache: preparing ahead failed; the build prepares itself", exc_info=True)


def _prepare() -> dict[str, Any]:
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    parts = key_parts()
    directory = cache_dir(parts)
    dirs = envs.use_compile_cache(str(directory), torch_default=os.path.abspath(default_cache_dir()))
    inductor_config.fx_graph_cache = True  # torch's default; a TORCHINDUCTOR_FX_GRAPH_CACHE=0 still wins
    functorch_config.enable_autograd_cache = True
    if BACKEND_AHEAD:
        from torch._inductor.compile_fx import compile_fx  # noqa: F401 - the backend's own import at the first compile, paid here
    root = Path(dirs["inductor_dir"])
    entries = sum(1 for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0
    log.info("compile cache: %s (%d files already there)", root, entries)
    return {"key": cache_key(parts), **dirs, "entries_before": entries}


# where a compile's host seconds go, as torch's own timers (`dynamo_timed`) name them: the whole
# compile, Dynamo's bytecode tracing and guards, the backend (Inductor, or its caches' load), and
# loading the generated code (Triton kernels on CUDA); names torch does not have are left out
TIMERS = ("_compile.compile_inner", "bytecode_tracing", "build_guards", "OutputGraph.call_user_compiler",
          "AOTAutogradCache.inductor_load", "PyCodeCache.load_by_key_path", "async_compile.wait")


def counters() -> dict[str, Any]:
    """This process's cache counters and compile timers now (torch's, cumulative): a `since` for
    `report`. All zero while torch._dynamo is not imported: nothing can have compiled yet, and
    importing it costs a second."""
    from worker.model import aot

    if "torch._dynamo" not in sys.modules:
        return {**dict.fromkeys(COUNTERS, 0), **aot.counts(), "timers": {}}
    from torch._dynamo import utils

    timers = getattr(utils, "compilation_time_metrics", {})
    return {**{name: int(utils.counters[group][leaf]) for name, (group, leaf) in COUNTERS.items()},
            **aot.counts(), "timers": {k: float(sum(timers[k])) for k in TIMERS if k in timers}}


def report(since: dict[str, int] | None = None) -> dict[str, Any]:
    """The run record's `compile_cache`: where the caches are, the hit / miss / bypass counts since
    `since` (default: process start) and `compiled_from_cache`."""
    from worker.model import aot

    now = counters()
    delta = {k: now[k] - (since or {}).get(k, 0) for k in (*COUNTERS, *aot.counts())}
    before = (since or {}).get("timers", {})
    seconds = {k: v - before.get(k, 0.0) for k, v in now["timers"].items()}
    hits = delta["fxgraph_cache_hit"]
    fresh = delta["fxgraph_cache_miss"] + delta["fxgraph_cache_bypass"]
    if hits + fresh == 0:  # no graph reached Inductor's cache: fall back on AOTAutograd's view
        hits = delta["autograd_cache_hit"]
        fresh = delta["autograd_cache_miss"] + delta["autograd_cache_bypass"]
    # a signature loaded whole (worker.model.aot) is a graph from the cache that reached no torch
    # cache; one compiled ahead traced again, whatever Inductor's cache gave it
    hits += delta["aot_loaded"]
    with _lock:
        info = dict(_prepared)  # empty when nothing in this process asked for a compile
    return {"key": None, "inductor_dir": None, "triton_dir": None, "user_dirs": [], "entries_before": None,
            "prepare_s": None, "prepared_ahead": None, **info,
            **delta, "graphs": hits + fresh,
            "compiled_from_cache": None if hits + fresh == 0 else fresh + delta["aot_compiled"] == 0,
            "seconds": seconds, "aot_error": aot.first_error()}
