"""Issue 13 on a GPU: a fresh `bench run` process's setup, with and without a setup option, in one command.

    python benchmarks/setup_ab.py --work /tmp/sbg --json $OUT/setup_ab.json [--pairs 3] \\
        [--flag --compile-ahead] [--base-flag --no-compile-ahead]
    # a variable instead of a flag: torch's bytecode kept under the cache dir (worker/host/bytecode.py) or not
    python benchmarks/setup_ab.py --work /tmp/sbg --json $OUT/bc.json --flag --base-flag \\
        --env STREAMBENCH_BYTECODE_CACHE=1 --base-env STREAMBENCH_BYTECODE_CACHE=0

The setup target (a fresh process of a cached config ready to measure in <= 10 s) is about what a
nightly suite without `reuse: weights` pays per run: process start, imports, tokenizer, pack, CPU tier
fill, GPU slots (with the model build and the device-resident groups' load), compile from the host's
cache. This runs one 70B-geometry `cpu`-mode point (bf16, `--layers`, packed once) as separate
`python cli.py run` processes: first one untimed process that fills the compile cache (not the page
cache: the fill reads O_DIRECT unless `--warm-page-cache` is among the flags, so every process fills from
the disk, as `setup_h200/v2/setup_ab.log` shows) and one of the variant (which may write a cache of its
own: bytecode), then `--pairs` pairs of (baseline with `--base-flag`,
variant with `--flag`) in alternating order, so drift of the machine over the minutes falls on both
variants alike. Printed per process: the time before its measured round (process start to the end of the warm-up: every
setup phase), the phases, the slots phase by its spans (`slots_parts`), the side-thread work
(`overlapped`); then per variant the median and the paired differences. The tokens must be the same
in every process (a setup option changes no kernel).

`--profile` adds one more baseline process under cProfile (its main thread: the model build and the
compile from cache run there) and `-X importtime`, and prints the functions with the most cumulative
time and the slowest imports: where the slots phase's model build and the compile phase spend a fresh
process's seconds. cProfile slows Python-heavy work (Dynamo's tracing) by up to ~2x, so read its
seconds as shares, not as the setup's time; that process is not in the comparison.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pstats
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from reuse_h200 import PHASES, add_point_args, parts_line, prepare_model  # noqa: E402  (the same point)

BEFORE_MEASURE = tuple(p for p in PHASES if p not in ("close_s", "other_s"))


def run_args(ckpt: Path, a, out: Path, extra: list[str]) -> list[str]:
    return ["run", "--checkpoints", str(ckpt), "--mode", "cpu", "--prompt-len", str(a.prompt_len),
            "--max-new-tokens", str(a.new_tokens), "--temperature", "0",
            "--gpu-memory-limit-gb", f"{a.budget_gib * 2**30 / 1e9:.3f}", "--out-json", str(out), *extra]


def one_run(cli: list[str], ckpt: Path, a, out: Path, variant: bool) -> dict:
    """A fresh process of the variant (`--flag`, `--env`) or the baseline (`--base-flag`, `--base-env`)."""
    flags, env = (a.flag, a.env) if variant else (a.base_flag, a.base_env)
    cmd = [*cli, *run_args(ckpt, a, out, flags)]
    t0 = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **dict(env)})
    if done.returncode != 0:
        raise SystemExit(f"{label(a, variant)}: bench run failed ({done.returncode}): "
                         f"{done.stderr.strip().splitlines()[-1:] or ''}")
    r = json.loads(out.read_text())
    s = r["setup"]
    return {"variant": label(a, variant), "bytecode": s.get("bytecode"), "process_wall_s": time.monotonic() - t0,
            "before_measure_s": sum(s.get(k) or 0.0 for k in BEFORE_MEASURE),
            "phases": {k: s.get(k) for k in PHASES}, "fill_gbps": s.get("fill_gbps"),
            "slots_parts": s.get("slots_parts"), "overlapped": s.get("overlapped"),
            "compiled_from_cache": (r.get("compile_cache") or {}).get("compiled_from_cache"),
            "compile_seconds": (r.get("compile_cache") or {}).get("seconds") or {},
            "decode_ms_per_token": r["metrics"]["decode_ms"] / r["metrics"]["decode_steps"],
            "tokens": [o["token_ids"] for o in r["outputs"]]}


def label(a, variant: bool) -> str:
    """"baseline", or the variant's flags and variables (as `--flag` / `--env` gave them)."""
    return (" ".join([*a.flag, *(f"{k}={v}" for k, v in a.env)]) or "variant") if variant else "baseline"


def env_pair(text: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VALUE")
    return key, value


def profile_run(cli: list[str], ckpt: Path, a, work: Path, top: int = 40) -> dict:
    """One baseline process under cProfile and -X importtime (`cli` is `prepare_model`'s: python -c ...)."""
    prof = work / "setup-profile.prof"
    code = f"import cProfile, cli; cProfile.run('cli.main()', {str(prof)!r})"
    cmd = [cli[0], "-X", "importtime", "-c", code, *cli[3:],
           *run_args(ckpt, a, work / "setup-profile.json", a.base_flag)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **dict(a.base_env)})
    if done.returncode != 0 or not prof.exists():
        return {"error": f"profiled run failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}"}
    buf = io.StringIO()
    # the project's and the compiler's own functions (not the import machinery or click's wrappers)
    pstats.Stats(str(prof), stream=buf).sort_stats("cumulative").print_stats(
        r"/worker/|/_dynamo/|/_inductor/|/_functorch/|/triton/|/cuda/|hostinfo", top)
    return {"cumulative": buf.getvalue(), "imports": slowest_imports(done.stderr)}


def slowest_imports(stderr: str, top: int = 25) -> list[tuple[str, float]]:
    """-X importtime's lines (`import time: self | cumulative | name`): the packages with the most
    cumulative microseconds that are not inside one already listed."""
    rows = []
    for m in re.finditer(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$", stderr, re.M):
        rows.append((m.group(4), int(m.group(2)) / 1e6, len(m.group(3))))
    shallow = [(name, s) for name, s, depth in rows if depth <= 3]  # top-level and their direct imports
    return sorted(shallow, key=lambda r: -r[1])[:top]


def show(row: dict) -> None:
    ph = " ".join(f"{k[:-2]} {v:.2f}" for k, v in row["phases"].items() if (v or 0) >= 0.05)
    print(f"  {row['variant']:18} before measuring {row['before_measure_s']:6.2f} s ({ph}); from cache: "
          f"{row['compiled_from_cache']}; decode {row['decode_ms_per_token']:.2f} ms/token", flush=True)
    if row["slots_parts"]:
        print("      " + parts_line(row["slots_parts"], row["fill_gbps"]), flush=True)
    timers = row.get("compile_seconds") or {}
    if timers:  # torch's own compile timers (worker.model.compile_cache.TIMERS)
        print("      compile timers: " + " ".join(f"{k.split('.')[-1]} {v:.2f}" for k, v in timers.items()), flush=True)
    bc = row.get("bytecode") or {}
    print(f"      bytecode: {bc.get('prefix') or 'as installed'} ({bc.get('reason')})", flush=True)
    side = {k: v for k, v in (row["overlapped"] or {}).items() if v is not None}
    if side:
        print("      overlapped: " + " ".join(f"{k[:-2]} {v:.2f}" for k, v in side.items()), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--flag", nargs="*", default=["--compile-ahead"], help="the variant's extra `bench run` flags")
    p.add_argument("--env", nargs="*", type=env_pair, default=[], metavar="NAME=VALUE",
                   help="environment variables of the variant's processes (e.g. STREAMBENCH_BYTECODE_CACHE=1)")
    p.add_argument("--base-env", nargs="*", type=env_pair, default=[], metavar="NAME=VALUE",
                   help="environment variables of the baseline's processes")
    p.add_argument("--base-flag", nargs="*", default=["--no-compile-ahead"],
                   help="the baseline's flags (default: the option off, now that it is on by default)")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="one more baseline process under cProfile + importtime")
    add_point_args(p)
    a = p.parse_args()
    if a.pairs < 1:
        raise SystemExit("--pairs must be >= 1")
    if (a.flag, a.env) == (a.base_flag, a.base_env):
        raise SystemExit("the variant (--flag, --env) is the baseline (--base-flag, --base-env): nothing to compare")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt, cli = prepare_model(a)
    print(f"{a.preset}, {a.layers} layers, cpu mode, prompt {a.prompt_len}, {a.new_tokens} new tokens; "
          f"baseline ({' '.join([*a.base_flag, *(f'{k}={v}' for k, v in a.base_env)]) or 'defaults'}) vs "
          f"{label(a, True)}, {a.pairs} pair(s) of fresh "
          "processes", flush=True)
    # one untimed process of each fills the per-host caches either may write (compile, bytecode): not compared
    first = one_run(cli, ckpt, a, work / "setup-first.json", False)
    first_v = one_run(cli, ckpt, a, work / "setup-first-v.json", True)
    print("  (the first process of each, filling the host's caches; not compared)")
    show(first)
    show(first_v)
    rows: list[dict] = []
    for i in range(a.pairs):
        for variant in ((False, True) if i % 2 == 0 else (True, False)):
            rows.append(one_run(cli, ckpt, a, work / f"setup-{i}-{'v' if variant else 'b'}.json", variant))
            show(rows[-1])
    base = [r for r in rows if r["variant"] == "baseline"]
    var = [r for r in rows if r["variant"] != "baseline"]
    diffs = [v["before_measure_s"] - b["before_measure_s"] for b, v in zip(base, var)]
    same = all(r["tokens"] == first["tokens"] for r in [*rows, first_v])
    print(f"\n{'variant':30} {'before measuring, median s':>27} {'fill GB/s':>10} {'slots s':>8} {'compile s':>10}")
    for name, rs in (("baseline", base), (label(a, True), var)):
        med = lambda key: statistics.median(r["phases"][key] or 0.0 for r in rs)  # noqa: E731
        print(f"{name:30} {statistics.median(r['before_measure_s'] for r in rs):27.2f} "
              f"{statistics.median(r['fill_gbps'] or 0.0 for r in rs):10.2f} {med('slots_s'):8.2f} "
              f"{med('compile_s'):10.2f}")
    print(f"paired differences (variant - baseline), s: {' '.join(f'{d:+.2f}' for d in diffs)}; "
          f"same tokens in every process: {same}")
    profile = profile_run(cli, ckpt, a, work) if a.profile else None
    if profile:
        print("\nprofiled baseline process (cProfile, main thread; slower than unprofiled):")
        print(profile.get("error") or profile["cumulative"])
        for name, sec in profile.get("imports", []):
            print(f"  import {name:50} {sec:7.3f} s")
    Path(a.json).write_text(json.dumps({"args": vars(a), "first": first, "first_variant": first_v, "rows": rows, "diffs_s": diffs,
                                        "same_tokens": same, "profile": profile}, indent=1))


if __name__ == "__main__":
    main()
