"""Issue 16 on a GPU: the gate's noise, a real 3% slowdown caught, and SSD floors from next to the run.

Two steps, so the GPU time goes to measuring:

    # on the GPU machine (PYTHONPATH=<repo>): fresh `bench run` processes, their JSONs in one tarball
    python benchmarks/gate_h200.py measure --work /tmp/sbg --out $OUT/gate_runs.tar.gz [--only cpu slow ssd]
    # anywhere: the runs as rows of a dataset, one "night" per run, then `bench regress` on them
    python benchmarks/gate_h200.py gate gate_runs.tar.gz --results /tmp/gate-res

`measure`: one 70B-geometry checkpoint (bf16, `--layers`); `--cpu-runs` runs in `cpu` mode, each a
fresh process; then `--slow-runs` of a build of the engine that copies 3% more bytes per streamed
group (a copy of the source tree whose weight streamer re-copies the first 3% of every piece into
its slot: the same bytes, so the same tokens, and a copy-bound `cpu` run really is ~3% slower; not an
edited number); then `--ssd-runs` in `ssd` mode on a `--ssd-layers` checkpoint, whose floors come
from the SSD measured right before and after each run. It prints the CV of every metric per mode.

`gate`: each normal `cpu` run becomes a night of its own (a suite run of one repeat) in a results
dataset, written with the project's own row pipeline (`build_row`, `write_row`); then two checks:
the last normal run as tonight against the others (unchanged: must not be flagged), and the slow
runs as tonight (3% slower: must be flagged). It prints both `bench regress` summaries.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTRA = 0.03  # the slow build copies this share of every piece a second time
ANCHOR = "                    dst.copy_(piece.host, non_blocking=True)\n"
SLOW_LINE = ("                    k = int(n * {extra}) // 4096 * 4096  # the slow build: {extra:.0%} more bytes\n"
             "                    dst[:k].copy_(piece.host[:k], non_blocking=True)\n")
METRICS = ("decode_ms", "decode_tok_s", "prefill_ms", "ttft_ms", "e2e_ms", "itl_p50_ms", "attainment_decode",
           "attainment_prefill")


def bench(tree: Path, *args: str, log: Path | None = None) -> float:
    cmd = [sys.executable, "-c", "import cli; cli.main()", "-v", "WARNING", *args]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tree, env=_env(tree))
    if log is not None:
        log.write_text(proc.stderr)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"failed ({proc.returncode}): bench {' '.join(args)}")
    return t0


def _env(tree: Path) -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": f"{tree}:{os.environ.get('PYTHONPATH', '')}"}


def slow_tree(work: Path) -> Path:
    """A copy of the source tree whose streamer copies EXTRA more bytes per piece (see the docstring)."""
    dst = work / "slow-tree"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "benchmarks", "tests"))
    path = dst / "worker" / "stream" / "streamer.py"
    text = path.read_text()
    if text.count(ANCHOR) != 1:
        raise SystemExit(f"the slow build's anchor is not in {path} exactly once: update ANCHOR")
    path.write_text(text.replace(ANCHOR, ANCHOR + SLOW_LINE.format(extra=EXTRA)))
    return dst


def run_args(ckpt: Path, mode: str, out: Path, a) -> list[str]:
    return ["run", "--checkpoints", str(ckpt), "--mode", mode, "--prompt-len", str(a.prompt_len),
            "--max-new-tokens", str(a.new_tokens), "--temperature", "0", "--gpu-memory-limit-gb",
            f"{a.budget_gib * 2**30 / 1e9:.3f}", "--out-json", str(out)]


def measure(a) -> None:
    work = Path(a.work)
    runs = work / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    models = {m: (work / f"{a.preset}-{n}L", n) for m, n in (("cpu", a.layers), ("ssd", a.ssd_layers))}
    wanted = {"cpu": "cpu" in a.only, "ssd": "ssd" in a.only}
    wanted["cpu"] = wanted["cpu"] or "slow" in a.only
    for ckpt, layers in {models[m] for m, on in wanted.items() if on}:
        if not (ckpt / "config.json").exists():
            bench(ROOT, "make-model", str(ckpt), "--preset", a.preset, "--layers", str(layers))
        bench(ROOT, "pack", "--checkpoints", str(ckpt))
    slow = slow_tree(work)
    plan = ([("cpu", ROOT, i) for i in range(a.cpu_runs) if "cpu" in a.only]
            + [("cpu-slow", slow, i) for i in range(a.slow_runs) if "slow" in a.only]
            + [("ssd", ROOT, i) for i in range(a.ssd_runs) if "ssd" in a.only])
    index_file = runs / "index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else []  # an earlier call's runs
    for kind, tree, i in plan:
        mode = kind.split("-")[0]
        out = runs / f"{kind}-{i}.json"
        t0 = bench(tree, *run_args(models[mode][0], mode, out, a), log=runs / f"{kind}-{i}.log")
        index.append({"kind": kind, "file": out.name, "started_at": t0, "finished_at": time.time()})
        index_file.write_text(json.dumps(index, indent=1))
        doc = json.loads(out.read_text())
        print(f"  {kind:8} #{i}: decode {doc['metrics']['decode_ms'] / doc['metrics']['decode_steps']:.2f} ms/token, "
              f"wall {index[-1]['finished_at'] - t0:.1f} s", flush=True)
    print_cv(runs)
    with tarfile.open(a.out, "w:gz") as tar:
        tar.add(runs, arcname="runs")
    print(f"wrote {a.out}")


def print_cv(runs: Path) -> None:
    index = json.loads((runs / "index.json").read_text())
    for kind in sorted({e["kind"] for e in index}):
        docs = [json.loads((runs / e["file"]).read_text()) for e in index if e["kind"] == kind]
        print(f"\n{kind}: {len(docs)} fresh processes")
        for m in METRICS:
            vals = [flat(d).get(m) for d in docs]
            vals = [v for v in vals if v is not None]
            if len(vals) >= 2:
                mean = statistics.mean(vals)
                print(f"  {m:20} mean {mean:12.4f}  CV {statistics.stdev(vals) / mean:7.2%}  "
                      f"min {min(vals):.4f} max {max(vals):.4f}")


def flat(doc: dict) -> dict:
    return {**doc["metrics"], **(doc.get("roofline") or {})}


def gate(a) -> None:
    """Rows from the run JSONs, one night per normal run, then the two checks (see the docstring)."""
    import tempfile

    from orchestrator.regress.check import check
    from orchestrator.regress.render import regress_markdown
    from orchestrator.results.query import select
    from orchestrator.results.store import write_row

    work = Path(tempfile.mkdtemp(prefix="gate-"))
    with tarfile.open(a.tarball) as tar:
        tar.extractall(work, filter="data")
    runs = work / "runs"
    print_cv(runs)
    index = json.loads((runs / "index.json").read_text())
    normal = [e for e in index if e["kind"] == "cpu"]
    slow = [e for e in index if e["kind"] == "cpu-slow"]
    spec = None
    for i, e in enumerate(normal + slow):
        doc = json.loads((runs / e["file"]).read_text())
        spec = spec or cpu_spec(doc)
        night = f"night-{i:02d}" if e["kind"] == "cpu" else "night-slow"
        commit = "normal-build" if e["kind"] == "cpu" else "slow-build-copies-3pct-more"
        write_row(a.results, as_row(spec, night, doc, e, commit), spec.suite,
                  datetime.fromtimestamp(e["started_at"], tz=timezone.utc).strftime("%Y-%m-%d"))
    rows = select(a.results)
    unchanged = [r for r in rows if r["suite_run_id"] != "night-slow"]
    for title, data, night in (("0%: the last normal run as tonight", unchanged, f"night-{len(normal) - 1:02d}"),
                               ("3%: the slow build's runs as tonight", rows, "night-slow")):
        report = check(data, night)
        print(f"\n==== {title}: exit code {report.exit_code}\n")
        print(regress_markdown(report))


def cpu_spec(doc: dict):
    """The suite point these runs are: a RunSpec whose config key every row shares."""
    from orchestrator.suite.load import parse_suite

    c = doc["config"]
    flat = {**{k: v for k, v in c.items() if not isinstance(v, dict)}, **c["stream"], **c["kv"], **c["sampling"]}
    keep = ("mode", "prompt_len", "max_new_tokens", "temperature", "gpu_memory_limit_gb")
    defaults = ", ".join(f"{k}: {json.dumps(flat[k])}" for k in keep)
    suite = parse_suite(f"name: h200-gate\nmodels: [{{name: {Path(c['checkpoints']).name}, path: {c['checkpoints']}}}]\n"
                        f"defaults: {{{defaults}}}\n", source="gate_h200.py")
    return suite.specs[0]


def as_row(spec, night: str, doc: dict, entry: dict, commit: str) -> dict:
    from orchestrator.cluster.actor import RunOutcome
    from orchestrator.results.schema import build_row

    outcome = RunOutcome("ok", None, doc, doc["system"], "h200", entry["started_at"], entry["finished_at"], commit,
                         False)
    return build_row(spec, night, outcome)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--work", default="/tmp/sbg")
    m.add_argument("--out", required=True)
    m.add_argument("--preset", default="llama3.1-70b", help="geometry (tiny: a CPU dry run of the script)")
    m.add_argument("--layers", type=int, default=6)
    m.add_argument("--ssd-layers", type=int, default=2)
    m.add_argument("--cpu-runs", type=int, default=9)
    m.add_argument("--slow-runs", type=int, default=3)
    m.add_argument("--ssd-runs", type=int, default=4)
    m.add_argument("--prompt-len", type=int, default=128)
    m.add_argument("--new-tokens", type=int, default=8)
    m.add_argument("--budget-gib", type=float, default=6.0)
    m.add_argument("--only", nargs="+", default=["cpu", "slow", "ssd"], choices=["cpu", "slow", "ssd"],
                   help="which runs (the rest of a --work kept from an earlier call is packed too)")
    g = sub.add_parser("gate")
    g.add_argument("tarball")
    g.add_argument("--results", required=True)
    a = ap.parse_args()
    measure(a) if a.cmd == "measure" else gate(a)


if __name__ == "__main__":
    main()
