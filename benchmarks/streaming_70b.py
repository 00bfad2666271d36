"""Issue 3's benchmark: every streaming mode and the accelerate peer on a 70B-geometry checkpoint.

One command: make a `llama3.1-70b`-geometry checkpoint with as many layers as the disk allows (the
checkpoint and its pack both count), pack and verify it, probe the host (O_DIRECT SSD, pinned H2D,
HBM, bf16 matmul), then run `bench run` in a fresh process per configuration — gpu, cpu, ssd, mixed
(both CPU policies), a 2048-token prefill in cpu mode, and the accelerate peer (CPU offload) — all
greedy, batch 1, under the same GPU budget, and print one table: prefill, decode s/token, the I/O
floor, attainment, measured channel bandwidths (SSD also as a share of the probe), speedup over the
peer, and whether each mode's tokens equal gpu mode's. The disk is probed again right before each
SSD-bound run: a virtual disk's rate drifts by tens of percent over minutes.

    python benchmarks/streaming_70b.py --work /tmp/sb70 [--layers N] [--budget-gib 6]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

from worker.units import GiB as GIB

LAYER_BYTES = 1.713e9  # one 70B-geometry layer in bf16 (attn 302 MB + ffn 1.41 GB)
RESIDENT_BYTES = 4.2e9  # embeddings + lm_head (+ norm) in bf16


def fit_layers(work: Path, reserve_gb: float) -> int:
    """Layers whose checkpoint + pack fit on the disk holding `work`, keeping `reserve_gb` free."""
    free = shutil.disk_usage(work).free - reserve_gb * 1e9
    return max(1, int((free / 2 - RESIDENT_BYTES) // LAYER_BYTES))


def bench(*args: str) -> None:
    cmd = [sys.executable, str(Path(__file__).resolve().parents[1] / "cli.py"), "-v", "WARNING", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(args)}")
    print(f"  [{time.perf_counter() - t0:6.1f} s] bench {' '.join(args)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/sb70")
    ap.add_argument("--layers", type=int, default=None, help="default: as many as the disk allows")
    ap.add_argument("--reserve-gb", type=float, default=8.0, help="disk kept free (probe scratch, results)")
    ap.add_argument("--budget-gib", type=float, default=6.0, help="GPU memory budget of the streaming runs")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--prefill-len", type=int, default=2048)
    ap.add_argument("--only", nargs="*", default=None, help="run only these configurations")
    ap.add_argument("--resume", action="store_true",
                    help="reuse run JSONs already in --work (an earlier invocation cut short) instead of rerunning")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    existing = sorted(work.glob("llama3.1-70b-*L/config.json"))
    if args.layers is None and args.resume and len(existing) == 1:  # the disk is full of it: do not refit
        args.layers = int(existing[0].parent.name.rsplit("-", 1)[1][:-1])
    layers = args.layers or fit_layers(work, args.reserve_gb)
    ckpt = work / f"llama3.1-70b-{layers}L"
    budget = f"{args.budget_gib * GIB / 1e9:.3f}"  # GiB → the engine's GB
    print(f"70B geometry, {layers} layers, bf16; GPU budget {args.budget_gib} GiB; disk free "
          f"{shutil.disk_usage(work).free / 1e9:.1f} GB", flush=True)

    t0 = time.perf_counter()
    if not (ckpt / "config.json").exists():
        from worker.synth.checkpoints import make_model

        make_model(ckpt, preset="llama3.1-70b", layers=layers, dtype="bfloat16", seed=0)
    print(f"  [{time.perf_counter() - t0:6.1f} s] checkpoint {ckpt}", flush=True)
    from worker.pack.cache import ensure_pack

    t0 = time.perf_counter()
    ensure_pack(ckpt)  # packs
    ensure_pack(ckpt).close()  # verifies checksums once, so no timed run pays for it
    pack_dir = ckpt / ".streambench-pack"
    print(f"  [{time.perf_counter() - t0:6.1f} s] pack + verify in {pack_dir}", flush=True)
    bench("probe", "--path", str(pack_dir), *([] if args.resume else ["--refresh"]))  # reads the blob

    half = max(1, (layers - 1) // 2)
    common = ["--checkpoints", str(ckpt), "--temperature", "0", "--batch-size", "1", "--max-seq-len", "4096",
              "--warmup-rounds", "1"]
    short = ["--prompt-len", str(args.prompt_len), "--max-new-tokens", str(args.new_tokens)]
    lim = ["--gpu-memory-limit-gb", budget]
    configs = {
        "gpu": ["--mode", "gpu", *short],
        "cpu": ["--mode", "cpu", *short, *lim],
        "ssd": ["--mode", "ssd", *short, *lim],
        "mixed-subset": ["--mode", "mixed", "--gpu-cached-layers", "1", "--cpu-cache-layers", str(half),
                         "--cpu-policy", "pinned-subset", *short, *lim],
        "mixed-rolling": ["--mode", "mixed", "--gpu-cached-layers", "1", "--cpu-cache-layers", str(half),
                          "--cpu-policy", "rolling", *short, *lim],
        f"cpu-prefill{args.prefill_len}": ["--mode", "cpu", "--prompt-len", str(args.prefill_len),
                                           "--max-new-tokens", "2", *lim],
        "peer-accelerate-cpu": ["--engine", "accelerate", "--mode", "cpu", *short, *lim],
    }
    results = {}
    for name, extra in configs.items():
        if args.only and name not in args.only:
            continue
        out = work / f"run-{name}.json"
        if args.resume and out.exists():
            print(f"  [ reused ] {out}", flush=True)
        else:
            if name.startswith(("ssd", "mixed")):  # a virtual disk's rate wanders: probe it next to the run
                bench("probe", "--path", str(pack_dir), "--refresh")
            bench("run", *common, *extra, "--out-json", str(out))
        results[name] = json.loads(out.read_text())
    (work / "summary.json").write_text(json.dumps({k: {kk: v[kk] for kk in ("metrics", "io", "roofline", "system",
                                                                            "config", "warnings")}
                                                   for k, v in results.items()}, indent=1, default=str))
    table(results)


def table(results: dict) -> None:
    peer = results.get("peer-accelerate-cpu")
    peer_tok = per_token(peer) if peer else None
    ref = results.get("gpu")
    probe = next((r["roofline"] for r in results.values() if r.get("roofline")), {}) or {}
    print(f"\nprobe (the first run's; each SSD-bound run had a fresh one, used by its floor and /probe): "
          f"SSD O_DIRECT {fmt(probe.get('ssd_gbps'))} GB/s, pinned H2D {fmt(probe.get('h2d_gbps'))} GB/s, "
          f"HBM {fmt(probe.get('hbm_gbps'))} GB/s, bf16 matmul {fmt(probe.get('matmul_tflops'))} TFLOP/s")
    head = (f"{'config':22} {'prefill s':>9} {'decode s/tok':>12} {'floor s/tok':>11} {'bound':>6} "
            f"{'att.prefill':>11} {'att.decode':>10} {'SSD GB/s':>8} {'/probe':>6} {'H2D GB/s':>8} "
            f"{'vs peer':>7} {'= gpu':>5}")
    print(head)
    for name, r in results.items():
        m, io, roof = r["metrics"], r["io"], r.get("roofline") or {}
        h2d = io.get("weight_h2d") or {}
        ssd_gbps = (io.get("ssd_read") or {}).get("gbps")
        of_probe = ssd_gbps / roof["ssd_gbps"] if ssd_gbps and roof.get("ssd_gbps") else None
        same = (r["outputs"][0]["token_ids"] == ref["outputs"][0]["token_ids"]) if ref and "prefill" not in name \
            else None
        print(f"{name:22} {m['prefill_ms'] / 1e3:>9.3f} {fmt(per_token(r), 3):>12} "
              f"{fmt(roof.get('floor_decode_s'), 3):>11} {str(roof.get('bound_decode') or '—'):>6} "
              f"{fmt(roof.get('attainment_prefill')):>11} {fmt(roof.get('attainment_decode')):>10} "
              f"{fmt(ssd_gbps):>8} {fmt(of_probe):>6} "
              f"{fmt(h2d.get('gbps')):>8} "
              f"{fmt(peer_tok / per_token(r) if peer_tok and per_token(r) else None, 1):>7} "
              f"{'—' if same is None else ('yes' if same else 'NO'):>5}")


def per_token(r: dict | None) -> float | None:
    m = (r or {}).get("metrics") or {}
    return m["decode_ms"] / 1e3 / m["decode_steps"] if m.get("decode_steps") else None


def fmt(v, nd: int = 2) -> str:
    return "—" if v is None else f"{v:.{nd}f}"


if __name__ == "__main__":
    main()
