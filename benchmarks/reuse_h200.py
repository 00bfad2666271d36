"""Issue 13 on a GPU: a suite's runs with and without `reuse: weights`, in one worker process.

    python benchmarks/reuse_h200.py --work /tmp/sbr --json $OUT/reuse.json [--runs 8]

One 70B-geometry checkpoint (bf16, `--layers`, packed once); then the same suite twice through the
orchestrator's own worker (`BenchWorker.run`, what a Ray actor runs, minus Ray): `--runs` repeats of
one `cpu`-mode point with `reuse: none` (every run builds its engine: tokenizer, CPU tier fill, GPU
slots, compile from the host's cache) and then with `reuse: weights` (the first run builds, the rest
measure the kept engine). `--order` puts the reuse block first or second, so drift between the blocks
is visible when run both ways. Printed per run: wall time, the setup phases and decode ms/token, and
for a built engine the slots phase by its spans (`slots_parts`: worker.host.walltime);
per block: total wall, the share that was measurement, decode mean, CV and the difference of the
means against their combined standard error (Welch).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from settings import add_set_option  # noqa: E402  (beside this script)

PHASES = ("process_s", "imports_s", "tokenizer_s", "pack_s", "fill_s", "slots_s", "compile_s", "warmup_s",
          "probe_s", "close_s", "other_s")


def suite_text(ckpt: Path, a, reuse: str) -> str:
    """The block's suite (JSON, which the YAML loader reads): the point, plus `--set`'s defaults."""
    defaults = {"mode": "cpu", "prompt_len": a.prompt_len, "max_new_tokens": a.new_tokens, "temperature": 0,
                "gpu_memory_limit_gb": round(a.budget_gib * 2**30 / 1e9, 3), **dict(a.set)}
    return json.dumps({"name": f"reuse-{reuse}", "reuse": reuse, "repeats": a.runs,
                       "models": [{"name": "m", "path": str(ckpt)}], "defaults": defaults, "matrix": {}})


def block(worker, ckpt: Path, a, reuse: str) -> list[dict]:
    from orchestrator.suite.load import parse_suite

    out = []
    for spec in parse_suite(suite_text(ckpt, a, reuse)).specs:
        o = worker.run(spec)
        if o.status != "ok":
            raise SystemExit(f"run {spec.run_id} ({reuse}) failed: {o.error}")
        r = o.result
        m, s = r["metrics"], r["setup"]
        row = {"reuse": reuse, "repeat": spec.repeat, "reused_engine": r["reuse"]["reused_engine"],
               "wall_s": o.finished_at - o.started_at, "setup": {k: s.get(k, 0.0) for k in PHASES},
               "setup_total_s": sum(s.get(k, 0.0) for k in PHASES), "measure_s": s["measure_s"],
               "fill_gbps": s.get("fill_gbps"), "decode_ms_per_token": m["decode_ms"] / m["decode_steps"],
               "prefill_ms": m["prefill_ms"], "tokens": [o_["token_ids"] for o_ in r["outputs"]],
               "compiled_from_cache": (r.get("compile_cache") or {}).get("compiled_from_cache")}
        row["slots_parts"] = s.get("slots_parts")  # the engine build's spans (nulls when reused)
        out.append(row)
        print(f"  {reuse:7} #{spec.repeat} reused={row['reused_engine']!s:5} wall {row['wall_s']:6.2f} s  setup "
              f"{row['setup_total_s']:6.2f} s (" + " ".join(f"{k[:-2]} {v:.2f}" for k, v in row["setup"].items() if v >= 0.05)
              + f")  measure {row['measure_s']:.2f} s  decode {row['decode_ms_per_token']:.2f} ms/token", flush=True)
        if row["slots_parts"] and not row["reused_engine"]:
            print("          " + parts_line(row["slots_parts"], s.get("fill_gbps")), flush=True)
    return out


def parts_line(parts: dict, fill_gbps) -> str:
    """The slots phase by its spans, and the device-resident groups' load beside the fill."""
    up = parts.get("upload") or {}
    spans = " ".join(f"{k[:-2]} {v:.2f}" for k, v in parts.items() if k.endswith("_s") and (v or 0) >= 0.01)
    fill = f"; fill {fill_gbps:.2f} GB/s" if fill_gbps else ""
    return (f"slots: {spans}; upload {(up.get('bytes') or 0) / 1e9:.2f} GB "
            f"({(up.get('page_cache_bytes') or 0) / 1e9:.2f} cached) reads done {up.get('read_s') or 0:.2f} s, "
            f"copies {up.get('copy_s') or 0:.2f} s{fill}")


def summary(rows: list[dict]) -> dict:
    dec = [r["decode_ms_per_token"] for r in rows]
    wall = sum(r["wall_s"] for r in rows)
    later = rows[1:]
    return {"runs": len(rows), "suite_wall_s": wall, "measure_share": sum(r["measure_s"] for r in rows) / wall,
            "decode_mean": statistics.mean(dec), "decode_sd": statistics.stdev(dec),
            "decode_cv": statistics.stdev(dec) / statistics.mean(dec),
            "later_runs_setup_mean_s": statistics.mean(r["setup_total_s"] for r in later),
            "later_runs_wall_mean_s": statistics.mean(r["wall_s"] for r in later)}


def add_point_args(p: argparse.ArgumentParser) -> None:
    """The measured point (setup_ab.py measures the same one): model geometry, prompt, tokens, GPU budget."""
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--preset", default="llama3.1-70b")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--budget-gib", type=float, default=6.0)


def prepare_model(a) -> tuple[Path, list[str]]:
    """The point's checkpoint under --work, made and packed once; and the `bench` command line to run."""
    ckpt = Path(a.work) / f"{a.preset}-{a.layers}L"
    cli = [sys.executable, "-c", "import cli; cli.main()", "-v", "WARNING"]
    if not (ckpt / "config.json").exists():
        subprocess.run([*cli, "make-model", str(ckpt), "--preset", a.preset, "--layers", str(a.layers)], check=True,
                       cwd=ROOT)
    subprocess.run([*cli, "pack", "--checkpoints", str(ckpt)], check=True, cwd=ROOT)
    return ckpt, cli


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--runs", type=int, default=8)
    add_point_args(p)
    p.add_argument("--order", choices=("none-first", "weights-first"), default="none-first")
    add_set_option(p, "more suite defaults for both blocks, e.g. warm_page_cache=true")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ckpt, _ = prepare_model(a)

    from orchestrator.cluster.actor import BenchWorker

    worker = BenchWorker()
    t0 = time.time()
    order = ("none", "weights") if a.order == "none-first" else ("weights", "none")
    rows = {reuse: block(worker, ckpt, a, reuse) for reuse in order}
    worker.close()
    res = {reuse: summary(r) for reuse, r in rows.items()}
    same = all(r["tokens"] == rows["none"][0]["tokens"] for rs in rows.values() for r in rs)
    diff = res["weights"]["decode_mean"] - res["none"]["decode_mean"]
    se = (res["weights"]["decode_sd"] ** 2 / res["weights"]["runs"] + res["none"]["decode_sd"] ** 2
          / res["none"]["runs"]) ** 0.5
    print(f"\n{'block':8} {'suite wall s':>12} {'measured':>9} {'decode ms/token':>16} {'CV':>7} "
          f"{'later runs: setup s':>20} {'wall s':>7}")
    for reuse, s in res.items():
        print(f"{reuse:8} {s['suite_wall_s']:12.1f} {s['measure_share']:9.1%} {s['decode_mean']:16.3f} "
              f"{s['decode_cv']:7.2%} {s['later_runs_setup_mean_s']:20.2f} {s['later_runs_wall_mean_s']:7.2f}")
    print(f"decode weights - none: {diff:+.3f} ms/token = {diff / se:+.2f} standard errors "
          f"({diff / res['none']['decode_mean']:+.2%}); suite wall none/weights "
          f"{res['none']['suite_wall_s'] / res['weights']['suite_wall_s']:.2f}x; same tokens in every run: {same}")
    Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows, "summary": res, "diff_ms": diff,
                                        "diff_se": diff / se, "same_tokens": same, "wall_s": time.time() - t0},
                                       indent=1))


if __name__ == "__main__":
    main()
