"""Issue 14's benchmark: top-k decode against exact decode with the KV cache offloaded to CPU.

One command, one card: an 8B-geometry bf16 model (`bench make-model --preset llama3.1-8b --layers
32`), weights resident on the GPU (`--mode gpu`), the KV cache offloaded to pinned CPU memory with
64 blocks of 16 tokens per (row, layer) kept on the GPU, at 8k and 32k prompts: exact attention
against top-k with a 1024-token budget (`--topk-tokens 1024`). First the correctness checks of
`benchmarks/topk_check.py` (selection, exactness, no host sync, the zero-copy path) on the same card,
then per prompt a table: ms/token, the speed-up over exact, blocks read per (row, layer) step, KV
bytes per decode step, the KV H2D rate, write-back back-offs, the decode floor's attainment and
greedy-token agreement with exact. Targets: top-k >= 1.5x faster than exact at 8k, >= 3x at 32k.
`--compare-gather` adds a top-k run whose chosen blocks the host gathers (`--no-kv-zero-copy`);
`--compare-eager` one without CUDA graphs (`--no-cuda-graphs`: every step launched from Python). The
`graphed` column is the share of the measured round's KV bytes that moved inside CUDA graph replays
(`PagedKVCache.use_graphs`), so a top-k run says whether its steady steps replayed.

    python benchmarks/topk_decode.py --work /tmp/sbtopk
    python benchmarks/topk_decode.py --work /tmp/sbtopk-tiny --preset tiny --layers 2 --prompts 512  # CPU dry run

Budgets larger than a quarter of the prompt (the ring, the top-k tokens) are scaled down to a
quarter, so a short dry run still offloads and selects; at 8k and 32k the defaults stand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import kv_decode  # noqa: E402  (beside this script: its `bench run` subprocess and per-token figure)
from kv_decode import per_token_ms  # noqa: E402

TARGETS = {8192: 1.5, 32768: 3.0}


def bench_run(out: Path, resume: bool, *args: str) -> dict:
    if resume and out.exists():
        print(f"  [ reused ] {out.name}", flush=True)
        return json.loads(out.read_text())
    return kv_decode.bench_run(out, *args)


def agreement(toks: list[int], ref: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(toks, ref)) if x != y), min(len(toks), len(ref)))


def budgets(prompt: int, args) -> tuple[int, int]:
    """(ring blocks, top-k tokens) for a prompt: the asked ones, at most a quarter of the prompt each."""
    bt = args.block_tokens
    ring = max(2, min(args.gpu_blocks, prompt // bt // 4))
    tokens = max(2 * bt, min(args.topk_tokens, prompt // 4 // bt * bt))
    return ring, tokens


def measure(work: Path, ckpt: Path, prompt: int, args) -> dict:
    ring, tokens = budgets(prompt, args)
    if (ring, tokens) != (args.gpu_blocks, args.topk_tokens):
        print(f"  prompt {prompt}: scaled to {ring} GPU blocks and a {tokens}-token budget", flush=True)
    base = ["--checkpoints", str(ckpt), "--warmup-rounds", "1", "--mode", "gpu", "--prompt-len", str(prompt),
            "--max-new-tokens", str(args.new_tokens), "--max-seq-len", str(prompt + args.new_tokens + 16),
            "--kv-offload", "cpu", "--kv-block-tokens", str(args.block_tokens), "--kv-gpu-blocks", str(ring)]
    if not args.roofline:
        base.append("--no-roofline")
    exact = bench_run(work / f"p{prompt}-exact.json", args.resume, *base)
    topk = bench_run(work / f"p{prompt}-topk{tokens}.json", args.resume, *base, "--topk-tokens", str(tokens))
    out = {"prompt": prompt, "budget_tokens": tokens, "ring_blocks": ring, "exact": exact, "topk": topk}
    if args.compare_gather:  # option (b): the ids go to the host, which gathers and copies the blocks
        out["host gather"] = bench_run(work / f"p{prompt}-topk{tokens}-host.json", args.resume, *base,
                                       "--topk-tokens", str(tokens), "--no-kv-zero-copy")
    if args.compare_eager:
        out["eager"] = bench_run(work / f"p{prompt}-topk{tokens}-eager.json", args.resume, *base,
                                 "--topk-tokens", str(tokens), "--no-cuda-graphs")
    for bits in args.compare_key_bits:
        out[f"{bits}-bit"] = bench_run(work / f"p{prompt}-topk{tokens}-kb{bits}.json", args.resume, *base,
                                       "--topk-tokens", str(tokens), "--topk-key-bits", str(bits))
    return out


def row(name: str, r: dict, exact: dict) -> str:
    m, kv, roof = r["metrics"], r["io"].get("kv_h2d") or {}, r.get("roofline") or {}
    att = roof.get("attainment_decode")
    agree = agreement(r["outputs"][0]["token_ids"], exact["outputs"][0]["token_ids"])
    return (f"{name:22} {per_token_ms(r):>9.2f} {per_token_ms(exact) / per_token_ms(r):>8.2f}x "
            f"{m['kv_blocks_read_per_step']:>11.1f} {m['kv_bytes_per_step'] / 1e6:>11.1f} "
            f"{'—' if kv.get('gbps') is None else format(kv['gbps'], '.1f'):>9} {m['kv_write_backoffs']:>8} "
            f"{'—' if att is None else format(att, '.2f'):>6} {agree:>5}/{len(r['outputs'][0]['token_ids'])} "
            f"{kv.get('untimed_bytes', 0) / kv['bytes'] if kv.get('bytes') else 0:>7.2f}")


def table(results: list[dict]) -> list[str]:
    head = (f"{'prompt · run':22} {'ms/token':>9} {'speed-up':>9} {'blocks/step':>11} {'KV MB/step':>11} "
            f"{'H2D GB/s':>9} {'backoffs':>8} {'floor':>6} {'agree':>11} {'graphed':>7}")
    lines = [head]
    verdicts = []
    for res in results:
        p, ex, tk = res["prompt"], res["exact"], res["topk"]
        lines.append(row(f"{p} · exact", ex, ex))
        lines.append(row(f"{p} · top-k {res['budget_tokens']} tok", tk, ex))
        if "host gather" in res:
            lines.append(row(f"{p} · ... host gather", res["host gather"], ex))
        if "eager" in res:
            lines.append(row(f"{p} · ... no CUDA graphs", res["eager"], ex))
        for key in (k for k in res if k.endswith("-bit")):
            lines.append(row(f"{p} · ... {key} summary", res[key], ex))
        speed = per_token_ms(ex) / per_token_ms(tk)
        if p in TARGETS:
            verdicts.append(f"prompt {p}: top-k is {speed:.2f}x exact (target >= {TARGETS[p]}x): "
                            f"{'PASS' if speed >= TARGETS[p] else 'FAIL'}")
    return lines + verdicts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/sbtopk")
    ap.add_argument("--preset", default="llama3.1-8b")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompts", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--topk-tokens", type=int, default=1024)
    ap.add_argument("--block-tokens", type=int, default=16)
    ap.add_argument("--gpu-blocks", type=int, default=64, help="KV blocks per (row, layer) kept on the GPU")
    ap.add_argument("--no-roofline", dest="roofline", action="store_false", help="skip the host probe and floor")
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip benchmarks/topk_check.py")
    ap.add_argument("--resume", action="store_true", help="reuse run JSONs already in --work")
    ap.add_argument("--compare-gather", action="store_true",
                    help="also run top-k with --no-kv-zero-copy (the host gathers the device-chosen blocks)")
    ap.add_argument("--compare-eager", action="store_true",
                    help="also run top-k with --no-cuda-graphs (every decode step launched from Python)")
    ap.add_argument("--compare-key-bits", type=int, nargs="*", default=[], choices=range(1, 5), metavar="BITS",
                    help="also run top-k with --topk-key-bits BITS (each; the default run uses the engine's)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.check:
        import topk_check

        if topk_check.main([]):
            raise SystemExit("correctness checks failed: not measuring")
    from worker.pack.cache import ensure_pack
    from worker.synth.checkpoints import make_model

    ckpt = work / f"{args.preset}-{args.layers}L"
    if not (ckpt / "config.json").exists():
        make_model(ckpt, preset=args.preset, layers=args.layers, dtype="bfloat16")
    ensure_pack(ckpt).close()  # packed and verified once, outside any timed run
    from worker.config import KVConfig

    print(f"\n{args.preset}, {args.layers} layers, KV offloaded to CPU, blocks of {args.block_tokens}, "
          f"{args.new_tokens} new tokens, greedy; top-k block summary {KVConfig().topk_key_bits} bits per key "
          "and channel unless a row says otherwise", flush=True)
    results = [measure(work, ckpt, p, args) for p in args.prompts]
    lines = table(results)
    runs = ("exact", "topk", "host gather", "eager", *(f"{b}-bit" for b in args.compare_key_bits))
    lines += [f"warning ({r['prompt']} · {k}): {w}" for r in results for k in runs if k in r for w in r[k]["warnings"]]
    print("\n" + "\n".join(lines))
    (work / "summary.json").write_text(json.dumps(
        {"table": lines, "runs": [{"prompt": r["prompt"], "budget_tokens": r["budget_tokens"],
                                   "ring_blocks": r["ring_blocks"],
                                   **{k: {"metrics": r[k]["metrics"], "io": r[k]["io"], "roofline": r[k]["roofline"],
                                          "warnings": r[k]["warnings"]}
                                      for k in runs if k in r}} for r in results]},
        default=str, indent=1))


if __name__ == "__main__":
    main()
