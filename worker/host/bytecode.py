"""Bytecode for installs that ship none: torch's imports cost seconds less from a process's second run.

Python compiles a module's source to bytecode on import and, normally, keeps it in `__pycache__`
beside the source, so the next process only loads it. An install without those files whose
folders are read-only (a container image), or a process with `PYTHONDONTWRITEBYTECODE` set, compiles
every imported source again in every process: for torch and its compiler that is most of their
import time (`benchmarks/import_probe.py` measures it; numbers in benchmarks/results/README.md). A
fresh `bench run` process pays it twice, for `import torch` and for torch._dynamo / Inductor before
the first compile.

`use_bytecode_cache()` runs first thing in an engine process (the `bench` command, a Ray worker),
before torch is imported. Where torch has no bytecode next to its sources and Python would not
write it there, it points `sys.pycache_prefix` at `<cache>/pycache` (the project's cache directory)
and lets Python write there: the first process compiles as before, every later one loads. Python
keys each file by its source's full path and checks its size and mtime, so two installs or an
upgraded torch never read each other's bytecode. Nothing is written beside any source, so
`PYTHONDONTWRITEBYTECODE`'s purpose (a clean source tree) is kept. It does nothing where the user
set `PYTHONPYCACHEPREFIX`, where torch's bytecode is there, or with `STREAMBENCH_BYTECODE_CACHE=0`.
Bytecode changes no computation: the same source compiles to the same code.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any

from worker import envs

log = logging.getLogger(__name__)

# what a fresh run imports before it can compile: torch itself and the compiler's entry
PROBES = ("__init__.py", "_inductor/compile_fx.py")

_applied: dict[str, Any] = {}


def _has_bytecode(root: Path) -> bool:
    return all(Path(importlib.util.cache_from_source(str(root / rel))).exists() for rel in PROBES)


def _writes_beside(root: Path) -> bool:
    """Would Python write bytecode next to torch's sources itself?"""
    return not sys.dont_write_bytecode and os.access(root, os.W_OK)


def use_bytecode_cache(cache_dir: str | None = None) -> dict[str, Any]:
    """Point Python's bytecode at the project's cache when torch has none of its own (see the module's
    docstring); returns {"prefix": the folder or None, "reason": why} (also `state()` later)."""
    if _applied:
        return dict(_applied)
    if not envs.bytecode_cache():
        reason, prefix = "off (STREAMBENCH_BYTECODE_CACHE=0)", None
    elif sys.pycache_prefix:
        reason, prefix = "the user's PYTHONPYCACHEPREFIX", None
    elif "torch" in sys.modules:
        reason, prefix = "torch was imported before", None
    else:
        spec = importlib.util.find_spec("torch")
        root = Path(spec.origin).parent if spec is not None and spec.origin else None
        if root is None:
            reason, prefix = "torch not found", None
        elif _has_bytecode(root):
            reason, prefix = "torch ships its bytecode", None
        elif _writes_beside(root):
            reason, prefix = "Python writes torch's bytecode beside it", None
        else:
            prefix = str(Path(cache_dir or envs.cache_dir()) / "pycache")
            try:
                os.makedirs(prefix, exist_ok=True)
            except OSError as e:
                reason, prefix = f"cannot create {prefix}: {e.strerror}", None
            else:
                reason = "torch has no bytecode and Python would not write it"
                sys.pycache_prefix = prefix
                sys.dont_write_bytecode = False
                envs.export_pycache_prefix(prefix)
    _applied.update(prefix=prefix, reason=reason)
    log.debug("bytecode cache: %s (%s)", prefix, reason)
    return dict(_applied)


def state() -> dict[str, Any]:
    """What `use_bytecode_cache` decided in this process ({"prefix": None, "reason": "not asked"} if
    it was never called): the run record's `setup.bytecode`."""
    return dict(_applied) if _applied else {"prefix": None, "reason": "not asked"}
