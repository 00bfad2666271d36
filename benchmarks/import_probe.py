"""Issue 13: why a fresh process spends seconds importing torch and its compiler on one machine.

    python3 benchmarks/import_probe.py --json $OUT/import_probe.json [--repeats 3]

A fresh `bench run` process pays `import torch` (in `process_s`) and the compiler's import
(`torch._dynamo` / Inductor, `compile_prepare_s` on its side thread) before it can compile from the
cache; on the H200 machine the two took ~3.5 s and ~6 s where a 2-core laptop-class VM takes ~0.9 and
~1.7. Three causes look alike from inside a run, and this tells them apart, each in fresh
subprocesses:

- no bytecode: the install has no `__pycache__` files and its folders are read-only (or
  `PYTHONDONTWRITEBYTECODE` is set), so every process compiles torch's sources again. Then the import
  with `PYTHONPYCACHEPREFIX` pointing at a writable folder (and writing allowed) is much faster from its
  second process on (printed as `pycache_prefix`; `pycache_prefix_first` is the process that writes it).
- slow file system calls (a sandboxed kernel): the import's stat/open calls cost more; a pure-Python
  loop that does no I/O runs at the usual speed.
- a slow core: the pure-Python loop is slow too (its seconds are printed beside this machine's).

Printed: where torch lives, whether its folder is writable, how many of its `_inductor` / `_dynamo`
sources have bytecode next to them, and the median seconds of each import and of the loop.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

IMPORTS = ("import torch", "from torch._inductor.compile_fx import compile_fx")
TIMED = """
import time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
from torch._inductor.compile_fx import compile_fx  # what compile_cache.prepare imports
import torch._functorch.config
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""
LOOP = "import time; t = time.perf_counter(); sum(i * i for i in range(3_000_000)); print(time.perf_counter() - t)"


def layout() -> dict:
    """Where torch is, whether its folder is writable, and how many sources have bytecode."""
    out = subprocess.run([sys.executable, "-c", "import torch, os; print(os.path.dirname(torch.__file__))"],
                         capture_output=True, text=True, check=True)
    root = Path(out.stdout.strip())
    tag = sys.implementation.cache_tag
    counts = {}
    for sub in ("_inductor", "_dynamo"):
        sources = list((root / sub).rglob("*.py"))
        with_pyc = sum(1 for s in sources if (s.parent / "__pycache__" / f"{s.stem}.{tag}.pyc").exists())
        counts[sub] = {"sources": len(sources), "with_bytecode": with_pyc}
    return {"python": sys.executable, "torch_dir": str(root), "writable": os.access(root, os.W_OK),
            "bytecode": counts, "cpus": os.cpu_count(),
            "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE")}


def timed(env: dict, repeats: int) -> dict:
    torch_s, compiler_s = [], []
    for _ in range(repeats):
        done = subprocess.run([sys.executable, "-c", TIMED], capture_output=True, text=True, env=env, check=True)
        a, b = map(float, done.stdout.split())
        torch_s.append(a)
        compiler_s.append(b)
    return {"import_torch_s": torch_s, "import_compiler_s": compiler_s,
            "median_torch_s": statistics.median(torch_s), "median_compiler_s": statistics.median(compiler_s)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    doc = {"layout": layout()}
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPYCACHEPREFIX"}
    doc["plain"] = timed(base, a.repeats)
    with tempfile.TemporaryDirectory(prefix="pyc-") as prefix:
        env = {**{k: v for k, v in base.items() if k != "PYTHONDONTWRITEBYTECODE"}, "PYTHONPYCACHEPREFIX": prefix}
        doc["pycache_prefix_first"] = timed(env, 1)  # writes the bytecode
        doc["pycache_prefix"] = timed(env, a.repeats)  # reads it
    loops = [float(subprocess.run([sys.executable, "-c", LOOP], capture_output=True, text=True,
                                  check=True).stdout) for _ in range(a.repeats)]
    doc["python_loop_s"] = {"runs": loops, "median": statistics.median(loops)}
    Path(a.json).write_text(json.dumps(doc, indent=1))
    lay = doc["layout"]
    print(f"torch at {lay['torch_dir']} (writable: {lay['writable']}), {lay['cpus']} CPUs, "
          f"PYTHONDONTWRITEBYTECODE={lay['PYTHONDONTWRITEBYTECODE']}; bytecode present: "
          + ", ".join(f"{k} {v['with_bytecode']}/{v['sources']}" for k, v in lay["bytecode"].items()))
    for name in ("plain", "pycache_prefix_first", "pycache_prefix"):
        d = doc[name]
        print(f"{name:22} import torch {d['median_torch_s']:6.2f} s   compiler {d['median_compiler_s']:6.2f} s"
              f"   (runs: {[round(x, 2) for x in d['import_compiler_s']]})")
    print(f"pure-Python loop (no I/O) {doc['python_loop_s']['median']:.3f} s")


if __name__ == "__main__":
    main()
