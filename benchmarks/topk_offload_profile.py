"""Why top-k decode over an offloaded KV cache is slower than exact: where the host's time goes.

Runs `bench run` in-process (gpu weights, KV offloaded to CPU, long prompt) for top-k 0 and k, with
the engine's host-time spans recording (`worker.host.timing`): the compute thread's wait for the KV
worker (`kv.ready`), the fetch jobs (`kv.fetch`, inline on the compute thread for the CPU tier) and,
for a tier the device cannot read, the worker's host gather of the device-chosen candidates
(`kv.candidates`), the compiled top-k step (`kv.topk`),
the exact path (`kv.exact`) and all of a layer's KV work (`kv.decode`). The recorder is reset at the
run's "measure" phase, so the totals are the measured round's. Host milliseconds per decode step,
next to the step's CUDA-event time.

    python benchmarks/topk_offload_profile.py --work /tmp/sbkv --layers 32 --prompt 8192 [--k 64]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from worker.host import timing
from worker.run import resolve_config, run

# What each span times, in the order printed (the names are worker.host.timing's).
SPANS = {
    "kv.ready": "compute thread waits for the KV worker (ready)",
    "kv.fetch": "fetch job (KV worker, or inline: CPU tier)",
    "kv.candidates": "KV worker: host gather of the device's candidates",
    "kv.topk": "compute thread: top-k step (store, score, select, gather, attend)",
    "kv.exact": "compute thread: exact (assemble, attend)",
    "kv.decode": "compute thread: all of a layer's KV work",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/sbkv")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=8192)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--preset", default="llama3.1-8b")
    args = ap.parse_args()
    from worker.synth.checkpoints import make_model

    ckpt = Path(args.work) / f"{args.preset}-{args.layers}L"
    if not (ckpt / "config.json").exists():
        make_model(ckpt, preset=args.preset, layers=args.layers, dtype="bfloat16")
    for k in (0, args.k):
        cfg = resolve_config({"checkpoints": str(ckpt), "mode": "gpu", "prompt_len": args.prompt,
                              "max_new_tokens": args.new_tokens, "max_seq_len": args.prompt + 64,
                              "kv_offload": "cpu", "kv_block_tokens": 16, "kv_gpu_blocks": 64, "topk_blk": k,
                              "temperature": 0, "warmup_rounds": 1, "roofline": False})
        with timing.recording() as spans:

            def on_phase(name: str) -> None:
                if name == "measure":  # what is left after the run is the measured round's
                    spans.reset()

            r = run(cfg, on_phase)
        steps = r["metrics"]["decode_steps"]
        print(f"\n== top-k {k}: {r['metrics']['decode_ms'] / steps:.2f} ms/token (CUDA events), "
              f"{args.layers} layers, prompt {args.prompt}; host ms per decode step:")
        for name in [n for n in SPANS if n in spans.calls] + sorted(set(spans.calls) - set(SPANS)):
            print(f"  {SPANS.get(name, name):58} {spans.seconds[name] / steps * 1e3:8.2f} ms  "
                  f"({spans.calls[name]} calls)")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
