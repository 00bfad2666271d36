"""Issue 17 on a GPU: the weight formats against their own floors, and the peer, in one command.

    # on the GPU machine (PYTHONPATH=<repo>), all in one call:
    python benchmarks/quant_h200.py --work /tmp/sbq --out $OUT/quant_runs.tar.gz
    # or split over calls (the runs of earlier calls in --work are kept and reported too):
    python benchmarks/quant_h200.py --work /tmp/sbq --out $OUT/q1.tar.gz --only native peer
    python benchmarks/quant_h200.py --work /tmp/sbq --out $OUT/q2.tar.gz --only int8 int4
    # the disk-bound modes, formats compared within rounds on the same disk (its rate drifts over minutes):
    python benchmarks/quant_h200.py --work /tmp/sbq --out $OUT/q3.tar.gz --modes gpu ssd --repeats 3

Time: every run is a fresh process that sets up, warms up and measures, and `ssd` / `mixed` runs
stream their layers from the disk in both rounds, so even at 2 layers the 12 format runs of one batch
size fill most of a 10-minute call (the wall of each run is printed; the H200's are in
benchmarks/results/quant_h200/v3/quant_v3.txt): split with `--only`, `--modes` and `--batches`
where a call is limited. A run that fails (e.g. out of memory under the budget) is reported and the
others still run; the table and tarball are rewritten after every run.
    # a CPU dry run of the script itself (tiny geometry; minutes on a laptop)
    python benchmarks/quant_h200.py --work /tmp/sbq-dry --out /tmp/sbq-dry.tar.gz --preset tiny --layers 2 \
        --prompt-len 64 --new-tokens 3 --no-roofline

One synthetic checkpoint (`bench make-model --preset llama3.1-70b --layers N`, bf16), packed once per
format (`native`, `int8`, `int4`; `fp8` with `--only fp8`); then, for each format and batch size
(1 and 16, prompt 512): a `gpu` mode run (all resident, no budget: the format's reference tokens),
a `cpu`, an `ssd` and a `mixed` run (no GPU-cached layer, half the layers pinned in CPU memory, the
rest read from the SSD; the disk probed right before each `ssd` and `mixed` run, as its rate wanders)
under `--budget-gib` of GPU memory, and the accelerate peer (`--engine
accelerate --mode cpu`, the same budget, native weights: the peer reads the checkpoint as it is).
Every run is its own
`bench run` process writing `--out-json`. Printed per run: ms/token (decode), speed-up against the
native run of the same mode and batch, decode attainment against the run's own floor (the floor of
a quantized run counts its quantized bytes, from the manifest), what bound the floor, and whether
its tokens equal the gpu-mode tokens of its format at its batch. With `--repeats N` the `ssd` and
`mixed` points (`--repeat-modes`) run N times, in rounds after the first pass, each round in the order
opposite to the one before; a repeated point prints its median, its range and, as `vs native`, the
median over the rounds of native's time over the format's in the same round, so a drift of the disk
between rounds does not count as a format's.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("native", "int8", "int4", "fp8")
MODES = ("gpu", "cpu", "ssd", "mixed")


def bench(*args: str, log: Path | None = None, must: bool = True) -> bool:
    """One `bench` process; a failed run (`must=False`) is reported and the rest still run."""
    import os

    cmd = [sys.executable, "-c", "import cli; cli.main()", "-v", "WARNING", *args]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if log is not None:
        log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        if must:
            raise SystemExit(f"failed ({proc.returncode}): bench {' '.join(args)}")
        print(f"failed ({proc.returncode}): bench {' '.join(args)}", file=sys.stderr)
    return proc.returncode == 0


def weight_args(fmt: str, a) -> list[str]:
    return [] if fmt == "native" else ["--weight-format", fmt, "--quant-group-size", str(a.group_size)]


def plan(a) -> list[tuple[str, str, int, int]]:
    """(format or "peer", mode, batch, repeat) of every run asked for, in run order: every point once,
    then the `--repeat-modes` points again in rounds (repeat 1, 2, ...), each round in the order
    opposite to the one before, so the disk's drift over the minutes falls on every format alike."""
    points = []
    for fmt in FORMATS:
        if fmt in a.only:
            points += [(fmt, mode, b) for b in a.batches for mode in MODES if mode in a.modes]
    if "peer" in a.only:
        points += [("peer", "cpu", b) for b in a.batches]
    again = [p for p in points if p[1] in a.repeat_modes and p[0] != "peer"]
    runs = [(*p, 0) for p in points]
    for rep in range(1, a.repeats):
        runs += [(*p, rep) for p in (again[::-1] if rep % 2 else again)]
    return runs


def run_name(fmt: str, mode: str, batch: int, rep: int) -> str:
    return f"{fmt}-{mode}-b{batch}" + (f"-r{rep}" if rep else "")


def run_args(ckpt: Path, fmt: str, mode: str, batch: int, out: Path, a) -> list[str]:
    args = ["run", "--checkpoints", str(ckpt), "--mode", mode, "--batch-size", str(batch),
            "--prompt-len", str(a.prompt_len), "--max-new-tokens", str(a.new_tokens), "--temperature", "0",
            "--out-json", str(out)]
    if mode != "gpu":  # the gpu reference runs unbudgeted; streaming runs act as a small card
        args += ["--gpu-memory-limit-gb", f"{a.budget_gib * 2**30 / 1e9:.3f}"]
    if mode == "mixed":  # no layer kept on the GPU; half of them in pinned CPU memory, the rest from the SSD
        args += ["--gpu-cached-layers", "0", "--cpu-cache-layers", str(max(1, a.layers // 2)),
                 "--cpu-policy", "pinned-subset"]
    if not a.roofline:
        args += ["--no-roofline"]
    if fmt == "peer":
        return args + ["--engine", "accelerate"]
    return args + weight_args(fmt, a) + shlex.split(a.run_flags)


def save(runs: Path, a, t0: float) -> str:
    """Table and tarball of every run so far: written after each run, so a call cut by its time limit
    still brings back what finished (its last tarball), and the next call's runs add to them."""
    table = report(runs)
    head = (f"{a.preset}, {a.layers} layers, prompt {a.prompt_len}, {a.new_tokens} new tokens, budget "
            f"{a.budget_gib} GiB, int4 group {a.group_size}{f', run flags {a.run_flags}' if a.run_flags else ''}; "
            f"{time.time() - t0:.0f} s")
    (runs / "table.txt").write_text(f"{head}\n\n{table}\n")
    part = Path(f"{a.out}.part")
    with tarfile.open(part, "w:gz") as tar:
        tar.add(runs, arcname=a.runs)
    part.replace(a.out)  # never a half-written tarball under the final name
    return f"{head}\n\n{table}"


def measure(a, t0: float) -> Path:
    work = Path(a.work)
    runs = work / a.runs
    runs.mkdir(parents=True, exist_ok=True)
    ckpt = work / f"{a.preset}-{a.layers}L"
    if not (ckpt / "config.json").exists():
        bench("make-model", str(ckpt), "--preset", a.preset, "--layers", str(a.layers))
    for fmt in FORMATS:  # packed (and verified) outside any timed run
        if fmt in a.only:
            tp = time.time()
            bench("pack", "--checkpoints", str(ckpt), *weight_args(fmt, a), log=runs / f"pack-{fmt}.log")
            print(f"packed {fmt} in {time.time() - tp:.1f} s", flush=True)
    for fmt, mode, batch, rep in plan(a):
        name = run_name(fmt, mode, batch, rep)
        t1 = time.time()
        (runs / f"{name}.json").unlink(missing_ok=True)  # a failed run must not report an earlier call's JSON
        if mode in ("ssd", "mixed") and a.roofline:  # a virtual disk's rate wanders: probe it next to the run
            bench("probe", "--path", str(ckpt / ".streambench-pack"), "--refresh", log=runs / f"{name}.probe.log",
                  must=False)
        ok = bench(*run_args(ckpt, fmt, mode, batch, runs / f"{name}.json", a), log=runs / f"{name}.log", must=False)
        print(f"  {name:18} wall {time.time() - t1:6.1f} s{'' if ok else '  FAILED (see its .log)'}", flush=True)
        save(runs, a, t0)
    return runs


RUN_FILE = re.compile(r"^(?P<fmt>[a-z0-9]+)-(?P<mode>[a-z]+)-b(?P<b>\d+)(?:-r(?P<rep>\d+))?$")


def load(runs: Path) -> dict[tuple[str, str, int], dict[int, dict]]:
    """(format, mode, batch) → {repeat: run JSON}."""
    out: dict[tuple[str, str, int], dict[int, dict]] = {}
    for f in sorted(runs.glob("*-b*.json")):
        m = RUN_FILE.match(f.stem)
        if m:
            key = (m["fmt"], m["mode"], int(m["b"]))
            out.setdefault(key, {})[int(m["rep"] or 0)] = json.loads(f.read_text())
    return out


def ms_per_token(doc: dict) -> float | None:
    m = doc["metrics"]
    return m["decode_ms"] / m["decode_steps"] if m.get("decode_steps") else None


def tokens(doc: dict) -> list[list[int]]:
    return [o["token_ids"] for o in doc["outputs"]]


def speedup(docs: dict, fmt: str, mode: str, b: int) -> float | None:
    """Native's ms/token over the format's at one point: the median over the repeats both have (the same
    round: the same disk), else the ratio of the medians."""
    base, mine = docs.get(("native", mode, b)), docs.get((fmt, mode, b))
    if not base or not mine:
        return None
    both = [r for r in mine if r in base and ms_per_token(base[r]) and ms_per_token(mine[r])]
    if both:
        return statistics.median(ms_per_token(base[r]) / ms_per_token(mine[r]) for r in both)
    mb, mm = median_of(base, ms_per_token), median_of(mine, ms_per_token)
    return mb / mm if mb and mm else None


def median_of(reps: dict[int, dict], value) -> float | None:
    got = [v for v in (value(d) for d in reps.values()) if v is not None]
    return statistics.median(got) if got else None


def attainment(doc: dict) -> float | None:
    return (doc.get("roofline") or {}).get("attainment_decode")


def disk(reps: dict[int, dict], key: str, fmt: str) -> str:
    """The SSD reader's figure over the measured round (`io.ssd_read`: the rate it delivered, the reads
    in flight on average while busy), median over the repeats; "—" where the run read no disk."""
    got = median_of(reps, lambda d: ((d.get("io") or {}).get("ssd_read") or {}).get(key))
    return "—" if got is None else format(got, fmt)


def report(runs: Path) -> str:
    docs = load(runs)
    many = any(len(reps) > 1 for reps in docs.values())
    lines = [f"{'format':7} {'mode':4} {'batch':>5} {'ms/token':>10} {'vs native':>9} {'attain':>7} {'bound':>6} "
             f"{'weights GB':>10} {'= gpu tokens':>12} {'disk GB/s':>9} {'depth':>5}"
             + (f" {'runs':>4} {'ms/token min-max':>18}" if many else "")]
    order = lambda k: (k[2], FORMATS.index(k[0]) if k[0] in FORMATS else 9, MODES.index(k[1]))  # noqa: E731
    for (fmt, mode, b), reps in sorted(docs.items(), key=lambda kv: order(kv[0])):
        first = reps[min(reps)]
        ms = median_of(reps, ms_per_token)
        if fmt == "peer" and ("native", "cpu", b) in docs:  # the peer against native cpu
            native = median_of(docs[("native", "cpu", b)], ms_per_token)
            ratio = native / ms if native and ms else None
        else:
            ratio = speedup(docs, fmt, mode, b) if fmt != "native" else None
        speed = "—" if ratio is None else f"{ratio:8.2f}x"
        att = median_of(reps, attainment)
        roof = first.get("roofline") or {}
        ref = docs.get((fmt if fmt != "peer" else "native", "gpu", b))
        ref_doc = ref[min(ref)] if ref else None
        same = ("—" if ref_doc is None or (mode == "gpu" and fmt != "peer")
                else str(all(tokens(d) == tokens(ref_doc) for d in reps.values())))
        gb = (first["model"].get("weight_bytes") or 0) / 1e9
        line = (f"{fmt:7} {mode:4} {b:5d} {ms:10.2f} {speed:>9} {'—' if att is None else f'{att:.2f}':>7} "
                f"{roof.get('bound_decode') or '—':>6} {gb:10.3f} {same:>12} {disk(reps, 'gbps', '.3f'):>9} "
                f"{disk(reps, 'mean_inflight', '.1f'):>5}")
        if many:
            each = [v for v in (ms_per_token(d) for d in reps.values()) if v is not None]
            line += f" {len(reps):4d} {f'{min(each):.1f}-{max(each):.1f}':>18}"
        lines.append(line)
    lines.append("vs native: native ms/token of the same mode and batch over this run's (the peer: native cpu's); "
                 "attain: decode floor / measured, the floor counting the run's packed bytes; "
                 "= gpu tokens: greedy tokens equal that format's gpu-mode run (the peer: native gpu's); "
                 "disk GB/s, depth: the SSD reader over the measured round, its delivered rate and its reads in "
                 "flight on average while busy"
                 + ("; repeated points: median ms/token and attainment, vs native the median of the rounds' "
                    "ratios (the same round, the same disk)" if many else ""))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/sbq")
    ap.add_argument("--out", required=True, help="tarball of the run JSONs, logs and the printed table")
    ap.add_argument("--preset", default="llama3.1-70b", help="geometry (tiny: a CPU dry run of the script)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--budget-gib", type=float, default=6.0, help="GPU memory of the cpu/ssd/peer runs")
    ap.add_argument("--group-size", type=int, default=None,
                    help="int4 group [default: 128; 16 for the tiny preset, whose 688-wide MLP 128 does not divide]")
    ap.add_argument("--no-roofline", dest="roofline", action="store_false")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                    help="which modes (gpu is every format's reference for the token check)")
    ap.add_argument("--only", nargs="+", default=["native", "int8", "int4", "peer"], choices=[*FORMATS, "peer"],
                    help="which formats (each with its runs of --modes) and/or the peer [default: all but "
                         "fp8, which adds 6 runs]")
    ap.add_argument("--run-flags", default="", help="more `bench run` flags for the engine's runs (not the peer's), "
                    "e.g. '--no-embed-zero-copy': with --runs, a variant beside the default in one call")
    ap.add_argument("--runs", default="runs", help="folder under --work for this call's run JSONs and table")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run each --repeat-modes point this many times, in alternating rounds after the first "
                         "pass (the disk's rate drifts by tens of percent over minutes: compare within a round)")
    ap.add_argument("--repeat-modes", nargs="+", default=["ssd", "mixed"], choices=MODES)
    a = ap.parse_args()
    a.group_size = a.group_size or (16 if a.preset == "tiny" else 128)
    if a.repeats < 1:
        ap.error("--repeats must be at least 1")
    t0 = time.time()
    runs = measure(a, t0)
    print(f"\n{save(runs, a, t0)}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
