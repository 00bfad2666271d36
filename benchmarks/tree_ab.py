"""The same `bench run` points in two source trees, interleaved, in one command on one card.

    git archive <commit> | tar -x -C benchmarks/_tree_b   # the other tree (untracked, carried along)
    python benchmarks/tree_ab.py --tree-b benchmarks/_tree_b --work /tmp/sbab --preset llama3.1-8b --layers 8 \
        --point "exact:--mode gpu --prompt-len 8192 --kv-offload cpu --kv-gpu-blocks 64" \
        --point "topk:--mode gpu --prompt-len 8192 --kv-offload cpu --kv-gpu-blocks 64 --topk-blk 64"

Why: a speed difference between two commits measured on two machines (or days apart on the lent
card) says little; interleaving A, B, A, B on one card does. Each run is a fresh `bench run` process
of its tree writing `--out-json`; printed: decode ms/token per run, and per point the ratio B / A of
the medians. The model is made and packed once, with tree A (this checkout).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(tree: Path, args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": f"{tree}:{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", "import cli; cli.main()", "-v", "WARNING", *args], cwd=tree, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed in {tree}: bench {' '.join(args)}\n{proc.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree-b", required=True, type=Path)
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--preset", default="llama3.1-8b")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--point", action="append", required=True, help="NAME:bench run flags")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    ckpt = a.work / f"{a.preset}-{a.layers}L"
    if not (ckpt / "config.json").exists():
        bench(ROOT, ["make-model", str(ckpt), "--preset", a.preset, "--layers", str(a.layers)])
    bench(ROOT, ["pack", "--checkpoints", str(ckpt)])
    trees = {"A": ROOT, "B": a.tree_b.resolve()}
    got: dict[tuple[str, str], list[float]] = {}
    tokens: dict[tuple[str, str], list] = {}
    for r in range(a.rounds):
        for spec in a.point:
            name, flags = spec.split(":", 1)
            for label, tree in trees.items():
                out = a.work / f"{name}-{label}-{r}.json"
                t0 = time.time()
                bench(tree, ["run", "--checkpoints", str(ckpt), *shlex.split(flags), "--max-new-tokens",
                             str(a.new_tokens), "--temperature", "0", "--out-json", str(out)])
                doc = json.loads(out.read_text())
                ms = doc["metrics"]["decode_ms"] / doc["metrics"]["decode_steps"]
                got.setdefault((name, label), []).append(ms)
                tokens.setdefault((name, label), []).append([o["token_ids"] for o in doc["outputs"]])
                print(f"  round {r} {name:10} tree {label}: {ms:8.2f} ms/token  ({time.time() - t0:.0f} s)", flush=True)
    print(f"\nA = {ROOT}, B = {trees['B']}")
    for spec in a.point:
        name = spec.split(":", 1)[0]
        ma, mb = statistics.median(got[(name, "A")]), statistics.median(got[(name, "B")])
        same = tokens[(name, "A")][0] == tokens[(name, "B")][0]
        print(f"{name:10} A {ma:8.2f}  B {mb:8.2f} ms/token  B/A {mb / ma:.3f}  same tokens: {same}")


if __name__ == "__main__":
    main()
