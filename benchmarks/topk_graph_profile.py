"""Where a top-k decode step over an offloaded KV cache spends its GPU time, stream by stream.

`benchmarks/topk_decode.py` says how fast top-k is against exact; this says why, when a target is
missed: which stream is busy and which idles. One engine per variant (weights resident, `--mode gpu`;
the KV cache offloaded to the pinned CPU tier with `--gpu-blocks` blocks per row and layer on the
GPU; a `--topk-tokens` budget), a prefill of `--prompt` random tokens, then decode steps through the
engine's own decode path (`worker.model.graphs.GraphedDecode` for the `graphs` variant: the steady
steps replay as CUDA graphs; `eager`: every step launched from Python). Printed per variant: ms per
step (CUDA events over `--steps` steady steps), then over `--profile-steps` steps under
torch.profiler: kernel time per step on each CUDA stream (the compute stream, the KV stream's
gathers from the mapped tier) and the share of the step that stream was busy, and the top kernels.

    python benchmarks/topk_graph_profile.py --work /tmp/sbtg --layers 8 --prompt 32768
    python benchmarks/topk_graph_profile.py --work /tmp/sbtg-tiny --preset tiny --layers 2 --prompt 512 \\
        --gpu-blocks 4 --topk-tokens 64   # CPU dry run (no streams, no graphs)
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from step_timing import time_and_profile  # noqa: E402  (beside this script)
from worker.engine import build_engine
from worker.generate import kv_span
from worker.model.graphs import GraphedDecode
from worker.model.step import Step
from worker.pack.cache import ensure_pack
from worker.run import resolve_config
from worker.synth.checkpoints import make_model


def stream_busy(prof) -> tuple[dict[int, float], collections.Counter]:
    """Kernel microseconds per CUDA stream (from the trace's per-kernel stream ids), and per kernel name."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.loads(Path(f.name).read_text())
    per_stream: dict[int, float] = collections.defaultdict(float)
    names: collections.Counter = collections.Counter()
    for e in trace.get("traceEvents", []):
        if e.get("cat") == "kernel" or e.get("cat") == "gpu_memcpy":
            per_stream[int(e.get("args", {}).get("stream", -1))] += float(e.get("dur", 0))
            names[e["name"][:90]] += float(e.get("dur", 0))
    return per_stream, names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/sbtg")
    ap.add_argument("--preset", default="llama3.1-8b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32768)
    ap.add_argument("--topk-tokens", type=int, default=1024)
    ap.add_argument("--block-tokens", type=int, default=16)
    ap.add_argument("--gpu-blocks", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32, help="steady decode steps timed with CUDA events")
    ap.add_argument("--profile-steps", type=int, default=4)
    ap.add_argument("--variants", nargs="+", default=["graphs", "eager"], choices=["graphs", "eager"])
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    ckpt = Path(a.work) / f"{a.preset}-{a.layers}L"
    if not (ckpt / "config.json").exists():
        make_model(ckpt, preset=a.preset, layers=a.layers, dtype="bfloat16" if cuda else "float32")
    pack = ensure_pack(ckpt)
    steps = 2 + a.steps + a.profile_steps  # the first step (fills the ring) and the capture are not timed
    max_seq = a.prompt + steps + 1
    print(f"{a.preset}, {a.layers} layers, prompt {a.prompt}, KV offloaded to CPU ({a.gpu_blocks} blocks of "
          f"{a.block_tokens} on the GPU), top-k {a.topk_tokens} tokens, on {dev}", flush=True)
    for name in a.variants:
        graphed = name == "graphs" and cuda
        cfg = resolve_config({"checkpoints": str(ckpt), "mode": "gpu", "kv_offload": "cpu",
                              "kv_block_tokens": a.block_tokens, "kv_gpu_blocks": a.gpu_blocks,
                              "topk_tokens": a.topk_tokens, "max_seq_len": max_seq, "cuda_graphs": graphed,
                              "roofline": False})
        engine = build_engine(cfg, pack, dev)
        try:
            cache = engine.new_cache(1, max_seq)
            n = a.prompt
            ids = torch.randint(0, engine.cfg.vocab_size, (1, n), device=dev)
            engine.model.forward(ids, Step(torch.arange(n, device=dev)[None], n, (n,)), cache,
                                 logits_at=torch.tensor([n - 1], device=dev))
            graphs = GraphedDecode(engine.model, cache, 1, dev) if graphed else None
            tok = torch.tensor([[5]], device=dev)
            pos = torch.tensor([n], device=dev)  # advanced on the device, as generate does: no host wait per step
            t = [0]

            def step(t=t, pos=pos, tok=tok, graphs=graphs, cache=cache, engine=engine, n=n) -> None:
                t[0] += 1
                s = Step(pos[:, None], kv_span(n, t[0], max_seq))
                logits = graphs(tok, s) if graphs else engine.model.forward(tok, s, cache)[:, 0]
                tok.copy_(logits.argmax(-1, keepdim=True))
                pos.add_(1)

            ms, prof = time_and_profile(step, a.steps, a.profile_steps, cuda)
            replays = graphs.replays if graphs else 0
            print(f"\n== {name}: " + (f"{ms:.3f} ms/step (CUDA events, {a.steps} steps)" if cuda else "CPU: untimed")
                  + f"; {replays} of {t[0]} steps replayed", flush=True)
            if cuda:
                per_stream, names = stream_busy(prof)
                for sid, us in sorted(per_stream.items(), key=lambda kv: -kv[1]):
                    per = us / a.profile_steps / 1e3
                    print(f"  stream {sid:>3}: {per:8.3f} ms of kernels and copies per step ({per / ms:.2f} of the step)")
                print("  top kernels (ms per step):")
                for k, us in names.most_common(12):
                    print(f"    {us / a.profile_steps / 1e3:8.3f}  {k}")
            else:
                print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=10, max_name_column_width=60))
        finally:
            engine.close()
            engine = cache = graphs = None
            if cuda:
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
