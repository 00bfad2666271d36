"""`bench run --mode gpu` against HF transformers on the same card, same weights, same prompt ids.

Makes a synthetic checkpoint (default: llama3.1-8b geometry, few layers), runs the engine through
the real `bench run` path, then HF `LlamaForCausalLM.generate` (greedy) on exactly the prompt ids the
engine fed, and prints token agreement and timings. In fp32 the tokens must agree; in bf16 the two
engines use different kernels (fused SDPA vs HF's), so agreement can end at a near-tie: the script
reports where, and the prefill logits' relative difference.

    python benchmarks/gpu_vs_hf.py --work /tmp/sb --layers 4 --dtype bfloat16 float32
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from worker.run import resolve_config, run
from worker.synth.checkpoints import make_model

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def hf_generate(ckpt: Path, dtype: torch.dtype, prompt_ids: list[list[int]], new_tokens: int):
    model = LlamaForCausalLM.from_pretrained(ckpt, dtype=dtype).to(DEV).eval()
    out = []
    for ids in prompt_ids:
        x = torch.tensor([ids], device=DEV)
        with torch.no_grad():
            first = model(x).logits[0, -1].float()
        model.generate(x, max_new_tokens=2, do_sample=False, eos_token_id=None, pad_token_id=0)  # warm-up
        sync()
        t0 = time.perf_counter()
        gen = model.generate(x, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        sync()
        out.append((gen[0, len(ids):].tolist(), first, time.perf_counter() - t0))
    del model
    return out


def engine_prefill_logits(ckpt: Path, prompt: list[int], dtype: str) -> torch.Tensor:
    from worker.engine import build_engine
    from worker.model.step import Step
    from worker.pack.cache import ensure_pack

    cfg = resolve_config({"checkpoints": str(ckpt), "mode": "gpu", "dtype": dtype})
    engine = build_engine(cfg, ensure_pack(ckpt, dtype=dtype), torch.device(DEV))
    x = torch.tensor([prompt], device=DEV)
    logits = engine.model.forward(x, Step(torch.arange(len(prompt), device=DEV)[None], len(prompt)),
                                  engine.new_cache(1, len(prompt)), logits_at=torch.tensor([len(prompt) - 1],
                                                                                            device=DEV))
    return logits[0].float()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/sb-gpu-vs-hf")
    ap.add_argument("--preset", default="llama3.1-8b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if DEV == "cuda":  # bring the clocks up before anything is timed (an idle H200 sits at 345 MHz)
        a = torch.randn(8192, 8192, device=DEV)
        for _ in range(50):
            a @ a
        sync()
    rows = []
    for dtype in args.dtype:
        ckpt = make_model(Path(args.work) / f"{args.preset}-{args.layers}L-{dtype}", preset=args.preset,
                          layers=args.layers, dtype=dtype, seed=0, force=True)
        res = run(resolve_config({"checkpoints": str(ckpt), "mode": "gpu", "temperature": 0.0, "device": "auto",
                                  "prompt_len": args.prompt_len, "max_new_tokens": args.new_tokens,
                                  "out_json": None, "roofline": False}))
        prompts = [o["prompt_token_ids"] for o in res["outputs"]]
        ours = [o["token_ids"] for o in res["outputs"]]
        theirs = hf_generate(ckpt, getattr(torch, dtype), prompts, args.new_tokens)
        ref_first = theirs[0][1]
        our_first = engine_prefill_logits(ckpt, prompts[0], dtype)
        rel = ((our_first - ref_first).norm() / ref_first.norm()).item()
        agree = next((i for i, (a, b) in enumerate(zip(ours[0], theirs[0][0])) if a != b), len(ours[0]))
        m = res["metrics"]
        rows.append({"dtype": dtype, "gpu": res["system"].get("gpu_name"), "layers": args.layers,
                     "prompt_len": len(prompts[0]), "new_tokens": args.new_tokens,
                     "tokens_equal": ours[0] == theirs[0][0], "agree_prefix": agree,
                     "prefill_logits_rel_diff": rel,
                     "engine_decode_ms_per_token": m["decode_ms"] / max(m["decode_steps"], 1),
                     "engine_e2e_ms": m["e2e_ms"], "hf_generate_e2e_ms": theirs[0][2] * 1e3,
                     "engine_tokens": ours[0], "hf_tokens": theirs[0][0]})
    print(f"{'dtype':9} {'gpu':24} {'tokens equal':>12} {'agree':>6} {'logit rel diff':>15} "
          f"{'engine ms/tok':>13} {'engine e2e ms':>13} {'HF e2e ms':>10}")
    for r in rows:
        print(f"{r['dtype']:9} {str(r['gpu'])[:24]:24} {str(r['tokens_equal']):>12} "
              f"{r['agree_prefix']:>3}/{r['new_tokens']:<2} {r['prefill_logits_rel_diff']:>15.2e} "
              f"{r['engine_decode_ms_per_token']:>13.2f} {r['engine_e2e_ms']:>13.1f} {r['hf_generate_e2e_ms']:>10.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
