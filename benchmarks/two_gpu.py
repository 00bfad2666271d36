"""Issue 15 on a two-GPU host: the same suite through `bench submit` (embedded local Ray) on one GPU
and on two, with the rows that say which card ran what.

    python benchmarks/two_gpu.py --work /tmp/sb2 --json $OUT/two_gpu.json            # a 2-GPU box
    python benchmarks/two_gpu.py --work /tmp/sb2 --dry-run                             # any CPU machine

Why a script and not one command: the promise is a comparison. The suite (`--runs` repeats of one
point, default 4) runs once with `CUDA_VISIBLE_DEVICES=0` (Ray then sees one GPU: one slot) and once
with two GPUs visible (two slots, two pinned actors), each a fresh `bench submit` process, the same
command line; a priming submit first makes the synthetic checkpoint, its pack and the compile cache,
so neither timed pass pays for them. Printed: both wall times and their ratio (the issue expects
about 0.5), then per row its GPU index, UUID, name, the CUDA_VISIBLE_DEVICES Ray gave the actor, its
start/finish, the time it waited for a host-wide device lock (`device_wait_s`) and its GPU memory,
and the checks: two runs in flight at once, no two overlapping runs on one GPU (by UUID, else by
CUDA_VISIBLE_DEVICES), every GPU row's reserved memory within `--gpu-memory-limit-gb`.

GPU point: llama3.1-8b geometry, `--layers` layers, bf16, `cpu` mode (every weight pinned in RAM,
streamed over each card's own PCIe link) under a 6 GB budget per GPU, batch 8. `--dry-run`: the tiny
model on the CPU, with the embedded Ray told it has 1 or 2 GPUs (`RAY_OVERRIDE_RESOURCES`), so the
slots, actors, CUDA_VISIBLE_DEVICES and rows are exercised end to end where there is no GPU (the
engine then runs on the CPU, and both actors share the CPU's device lock: see `device_wait_s`).

One disk: every run holds a host-wide lock on the disk holding its pack (worker.host.devlock) from
build to close, so two runs whose packs share a disk take turns whatever GPUs they have: the rows
then overlap in flight, but `device_wait_s` of one is about the other's run. `--pack-dirs A B` gives
each slot its own pack location on its own filesystem (e.g. `/tmp/sb2/packs /dev/shm/sb2`): the
embedded Ray is told of two devices `nvme:p0`, `nvme:p1` (`RAY_OVERRIDE_RESOURCES`) and the suite
says `pack_dir: <work>/packs/{nvme}`, links to A and B; the one-GPU pass then uses p0 only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BENCH = [sys.executable, "-c", "import cli; cli.main()"]
log = logging.getLogger("two_gpu")


def suite_text(a, name: str, runs: int) -> str:
    pack = f", pack_dir: '{a.work / 'packs'}/{{nvme}}'" if a.pack_dirs else ""
    if a.dry_run:
        model = "{name: tiny, preset: tiny, layers: 2, dtype: float32, overrides: {vocab_size: 1000}}"
        point = ("mode: cpu, batch_size: 1, prompt_len: 8, max_new_tokens: 4, max_seq_len: 64, warmup_rounds: 0, "
                 "temperature: 0")
    else:
        model = f"{{name: l8b, preset: llama3.1-8b, layers: {a.layers}, dtype: bfloat16}}"
        point = (f"mode: cpu, batch_size: 8, prompt_len: 512, max_new_tokens: {a.new_tokens}, max_seq_len: 1024, "
                 f"warmup_rounds: 1, temperature: 0, gpu_memory_limit_gb: {a.limit_gb}")
    return (f"name: {name}\nrepeats: {runs}\nretries: 0\ntimeout_s: 1800\nmodels: [{model}]\n"
            f"defaults: {{{point}{pack}}}\nmatrix: {{host: [{{gpu: any}}]}}\n")


def child_env(a, gpus: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_OVERRIDE_RESOURCES")}
    env.update(PYTHONPATH=str(ROOT), STREAMBENCH_CACHE=str(a.work / "cache"), RAY_USAGE_STATS_ENABLED="0")
    override = {f"nvme:p{i}": 1 for i in range(len(a.pack_dirs))}
    if a.dry_run:  # no GPU: the embedded Ray is told it has `gpus` of them
        override["GPU"] = gpus
        env.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus))
    if override:
        env["RAY_OVERRIDE_RESOURCES"] = json.dumps(override)
    return env


def link_pack_dirs(a) -> None:
    """<work>/packs/p0 -> A, p1 -> B: what `pack_dir: .../{nvme}` resolves to on each slot."""
    root = a.work / "packs"
    root.mkdir(exist_ok=True)
    for i, target in enumerate(a.pack_dirs):
        target.mkdir(parents=True, exist_ok=True)
        link = root / f"p{i}"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target.resolve(), target_is_directory=True)
    devs = {os.stat(d).st_dev for d in a.pack_dirs}
    if len(devs) < len(a.pack_dirs):
        log.warning("--pack-dirs %s lie on one filesystem: the runs will still take turns on its lock",
                    " ".join(map(str, a.pack_dirs)))


def submit(a, label: str, gpus: int, runs: int) -> tuple[float, list[dict]]:
    """One `bench submit` process; its wall time and the rows it wrote."""
    from orchestrator.results.store import read_results

    suite = a.work / f"{label}.yaml"
    suite.write_text(suite_text(a, f"two-gpu-{label}", runs))
    results = a.work / f"results-{label}"
    shutil.rmtree(results, ignore_errors=True)
    cmd = [*BENCH, "submit", str(suite), "--results", str(results), "--suite-run-id", f"two-gpu-{label}"]
    shown = " ".join(["bench", *cmd[3:]])
    env = child_env(a, gpus)
    where = " ".join(f"{k}={env[k]}" for k in ("CUDA_VISIBLE_DEVICES", "RAY_OVERRIDE_RESOURCES") if k in env)
    log.info("$ %s   (%s)", shown, where)
    t0 = time.monotonic()
    done = subprocess.run(cmd, cwd=a.work, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if done.returncode != 0:
        log.error("exit %d\n%s\n%s", done.returncode, done.stdout[-3000:], done.stderr[-3000:])
    rows = sorted(read_results(str(results)).to_pylist(), key=lambda r: r["started_at"])
    bad = [r for r in rows if r["status"] != "ok"]
    if bad or len(rows) != runs:
        raise SystemExit(f"{label}: {len(rows)} rows of {runs}, failed: {[r['error'] for r in bad]}")
    return wall, rows


def overlapping(rows: list[dict]) -> list[tuple[dict, dict]]:
    return [(x, y) for i, x in enumerate(rows) for y in rows[i + 1:]
            if x["started_at"] < y["finished_at"] and y["started_at"] < x["finished_at"]]


def gpu_of(r: dict) -> str | None:
    return r["gpu_uuid"] or r["cuda_visible_devices"]


def report(label: str, wall: float, rows: list[dict], limit_gb: float | None) -> dict:
    t0 = rows[0]["started_at"]
    span = (max(r["finished_at"] for r in rows) - t0).total_seconds()
    log.info("%s: wall %.2f s (the bench submit process, Ray start included), rows span %.2f s (first start to "
             "last finish)", label, wall, span)
    log.info("  %-16s %-4s %-5s %-40s %-22s %-5s %8s %8s %8s %7s", "run", "cvd", "index", "gpu uuid", "gpu name",
             "nvme", "start s", "finish s", "wait s", "resv GB")
    for r in rows:
        log.info("  %-16s %-4s %-5s %-40s %-22s %-5s %8.2f %8.2f %8.2f %7s", r["run_id"], r["cuda_visible_devices"],
                 r["gpu_index"], r["gpu_uuid"], (r["gpu_name"] or "-")[:22], r["nvme_device"] or "-",
                 (r["started_at"] - t0).total_seconds(),
                 (r["finished_at"] - t0).total_seconds(), r["device_wait_s"] or 0.0,
                 "-" if r["gpu_reserved_gb"] is None else f"{r['gpu_reserved_gb']:.2f}")
    pairs = overlapping(rows)
    shared = [(x["run_id"], y["run_id"]) for x, y in pairs if gpu_of(x) is None or gpu_of(x) == gpu_of(y)]
    over = [r["run_id"] for r in rows if limit_gb and r["gpu_reserved_gb"] and r["gpu_reserved_gb"] > limit_gb]
    waited = [r for r in rows if (r["device_wait_s"] or 0) > 0.5]
    checks = {"two_in_flight": bool(pairs), "overlapping_pairs": len(pairs), "overlap_on_one_gpu": shared,
              "distinct_gpus": sorted({str(gpu_of(r)) for r in rows}), "over_gpu_limit": over,
              "runs_that_waited_for_a_device": [(r["run_id"], r["device_wait_s"]) for r in waited]}
    log.info("  checks: %s", json.dumps(checks))
    return {"wall_s": wall, "span_s": span, "checks": checks,
            "rows": [{k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in r.items()
                      if k in ("run_id", "nvme_device", "cuda_visible_devices", "gpu_index", "gpu_uuid", "gpu_name", "started_at",
                               "finished_at", "device_wait_s", "gpu_reserved_gb", "wall_s", "decode_tok_s")}
                     for r in rows]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="scratch directory (suites, results, cache)")
    ap.add_argument("--runs", type=int, default=4, help="runs in the suite (>= 4)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--limit-gb", type=float, default=6.0, help="--gpu-memory-limit-gb of every GPU run")
    ap.add_argument("--dry-run", action="store_true", help="tiny model on the CPU, GPUs faked in the embedded Ray")
    ap.add_argument("--pack-dirs", type=Path, nargs=2, default=[], metavar=("A", "B"),
                    help="a pack location per slot, on two filesystems (see above)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if a.runs < 4:
        raise SystemExit("--runs must be at least 4")
    a.work.mkdir(parents=True, exist_ok=True)
    a.work = a.work.resolve()
    if a.pack_dirs:
        link_pack_dirs(a)
    # checkpoint, pack(s), compile cache: paid here, not by either timed pass
    gpus = 2 if a.pack_dirs else 1  # with a pack per slot, both slots make theirs
    submit(a, "prime", gpus, gpus)
    one_wall, one = submit(a, "one", 1, a.runs)
    two_wall, two = submit(a, "two", 2, a.runs)
    limit = None if a.dry_run else a.limit_gb
    out = {"dry_run": a.dry_run, "runs": a.runs, "pack_dirs": [str(d) for d in a.pack_dirs], "one": report("one GPU", one_wall, one, limit),
           "two": report("two GPUs", two_wall, two, limit)}
    out["ratio"] = two_wall / one_wall
    out["span_ratio"] = out["two"]["span_s"] / out["one"]["span_s"]
    log.info("wall: one GPU %.2f s, two GPUs %.2f s, ratio %.3f (expected about 0.5); rows span ratio %.3f",
             one_wall, two_wall, out["ratio"], out["span_ratio"])
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
