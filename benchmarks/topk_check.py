"""Issue 14's correctness checks on the card the lead measures on (CUDA; runs on CPU too, smaller).

The paged cache is driven directly with random bf16 q/k/v of the 8B geometry (8 KV heads of 128,
32 query heads, blocks of 16), compiled as in a run, KV offloaded to pinned CPU memory:

1. selection: `select_blocks` / `candidates` on the device, eager and compiled, pick exactly what they
   pick on the CPU for the same scores (ties included).
2. exactness: a top-k budget that covers every block attends bit for bit like the resident cache.
3. no host sync: top-k decode steps run under `torch.cuda.set_sync_debug_mode("error")`: any op on
   the compute thread or the KV worker that would make the host wait for the device raises.
4. the path: the CPU tier is read by the device itself (zero-copy), a host-gather run of the same
   inputs attends bit for bit the same, the H2D bytes are the ring fill plus the counted candidate
   blocks, and the host's time per layer-step in the paged cache (top-k against exact).

    python benchmarks/topk_check.py [--layers 4 --prompt 4096]
"""

from __future__ import annotations

import argparse
import math
import types

import torch

from worker.config import KVConfig
from worker.host import timing
from worker.kv import kernels, paged
from worker.kv.factory import KVFactory
from worker.kv.static import StaticKVCache
from worker.kv.topk import candidates, recent_blocks, select_blocks
from worker.model.compiled import compiled as compile_fn
from worker.model.step import Step


def drive(cache, cfg, lens, steps, seed=0, strict_from=None):
    """Prefill rows of `lens`, then `steps` decode steps (span fixed: one bucket); the outputs. From
    decode step `strict_from` on, CUDA errors on any synchronizing op."""
    g = torch.Generator().manual_seed(seed)
    dev, b, t = cache_device(cache), len(lens), max(lens)
    h, kv, hd, dt = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, torch.bfloat16

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dt).to(dev)

    step = Step(torch.arange(t, device=dev).expand(b, t), t, tuple(lens))
    for layer in range(cfg.num_hidden_layers):
        cache.attend(layer, rnd(b, h, t, hd), rnd(b, kv, t, hd), rnd(b, kv, t, hd), step)
    pos, outs, span = torch.tensor(lens, device=dev), [], t + steps + 1
    inputs = [[(rnd(b, h, 1, hd), rnd(b, kv, 1, hd), rnd(b, kv, 1, hd)) for _ in range(cfg.num_hidden_layers)]
              for _ in range(steps)]
    for i in range(steps):
        strict = strict_from is not None and i + 1 >= strict_from and dev.type == "cuda"
        if strict:
            torch.cuda.set_sync_debug_mode("error")
        try:
            step = Step(pos[:, None].clone(), span)
            for layer, (q, k, v) in enumerate(inputs[i]):
                outs.append(cache.attend(layer, q, k, v, step))
            pos = pos + 1
        finally:
            if strict:
                torch.cuda.set_sync_debug_mode("default")
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return outs


def cache_device(cache) -> torch.device:
    return cache.bufs.wb_k.device if isinstance(cache, paged.PagedKVCache) else cache.rows.device


def factory(cfg, dev, max_seq, batch, compiled, **kv):
    """KV offloaded to CPU, a ring of 64 blocks of 16 tokens (fewer for short prompts: a quarter of them)."""
    ring = min(64, max_seq // 16 // 4)
    return KVFactory(cfg, KVConfig(kv_block_tokens=16, kv_offload="cpu", kv_gpu_blocks=ring, **kv), dev,
                     torch.bfloat16, max_seq, batch, None, compiled=compiled)


def check_selection(dev: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    b, n, k, ring = 4, 512, 64, 64
    scores = ((torch.randn(b, n, generator=g) * 4).round() / 4)  # ties everywhere
    frontier = torch.tensor([n - 1, n // 2, 70, 3])
    avail = torch.rand(b, n, generator=g) < 0.6
    want = select_blocks(scores, k, frontier, avail, recent_blocks(k))
    want_c = candidates(scores, frontier, ring, k, recent_blocks(k))
    fns = {"eager": (select_blocks, candidates)}
    if dev.type == "cuda":
        fns["compiled"] = (compile_fn(select_blocks), compile_fn(candidates))
    for name, (sel, cand) in fns.items():
        got = sel(scores.to(dev), k, frontier.to(dev), avail.to(dev), recent_blocks(k))
        got_c = cand(scores.to(dev), frontier.to(dev), ring, k, recent_blocks(k))
        ok = all(torch.equal(a.cpu(), w) for a, w in zip(got, want)) and torch.equal(got_c.cpu(), want_c)
        report(f"1. selection on {dev.type} ({name}) = on the CPU, ties included", ok)


def check_exact(cfg, dev, lens, steps, compiled) -> None:
    max_seq = max(lens) + steps + 16
    ref = drive(StaticKVCache(cfg, len(lens), max_seq, dev, torch.bfloat16, compiled), cfg, lens, steps)
    f = factory(cfg, dev, max_seq, len(lens), compiled, topk_blk=math.ceil(max_seq / 16))
    try:
        got = drive(f(len(lens), max_seq), cfg, lens, steps)
    finally:
        f.close()
    report("2. top-k covering every block = resident cache, bit for bit", all(torch.equal(a, b) for a, b in zip(got, ref)))


def check_topk(cfg, dev, lens, steps, compiled, budget) -> None:
    max_seq = max(lens) + steps + 16
    runs = {}
    for name in ("device gather", "host gather"):
        plans = []
        real_fetch = paged.run_fetch

        def spy(m, cache, plan, free, cand, plans=plans, real_fetch=real_fetch):
            plans.append(plan)
            return real_fetch(m, cache, plan, free, cand)

        paged.run_fetch = spy
        f = factory(cfg, dev, max_seq, len(lens), compiled, topk_tokens=budget, kv_zero_copy=name == "device gather")
        try:
            cache = f(len(lens), max_seq)
            drive(cache, cfg, lens, 2, seed=1)  # compile outside the strict steps
            strict = None if name == "host gather" else 2  # the host gather waits on the worker by design
            out = drive(cache, cfg, lens, steps, seed=2, strict_from=strict)
            io = f.io_stats()
            bb = cache.geo.block_bytes
            moved = sum(sum(p.counts) + len(p.fill) for p in plans) * bb
            runs[name] = (out, cache.host_ids, io["kv_h2d"]["bytes"], moved, io["kv_step"])
        finally:
            f.close()
            paged.run_fetch = real_fetch
    out, host_ids, h2d, moved, step = runs["device gather"]
    report("3. top-k decode steps under set_sync_debug_mode('error'): no host sync" if dev.type == "cuda" else
           "3. (no sync debug mode on a CPU: tests/test_kv_topk_device.py counts host syncs there)", True)
    report("4a. the device reads the CPU tier itself (zero-copy)", not host_ids)
    report("4b. device gather = host gather, bit for bit",
           all(torch.equal(a, b) for a, b in zip(out, runs["host gather"][0])))
    report(f"4c. H2D bytes {h2d} = ring fill + counted candidates {moved}", h2d == moved)
    print(f"    blocks read per (row, layer) step {step['blocks_read_per_step']:.1f} of budget "
          f"{step['topk_blocks']}; KV bytes per decode step {step['bytes_per_step'] / 1e6:.2f} MB")


def host_time(cfg, dev, lens, steps, compiled, budget) -> None:
    max_seq = max(lens) + steps + 16
    for name, kv in (("exact", {}), (f"top-k {budget} tokens", {"topk_tokens": budget})):
        f = factory(cfg, dev, max_seq, len(lens), compiled, **kv)
        try:
            cache = f(len(lens), max_seq)
            drive(cache, cfg, lens, 2, seed=1)
            with timing.recording() as spans:
                drive(cache, cfg, lens, steps, seed=2)
        finally:
            f.close()
        per = {s: spans.seconds[s] / spans.calls[s] * 1e6 for s in spans.calls}
        print(f"    host us per layer-step, {name:22}: " + ", ".join(f"{s} {v:.0f}" for s, v in sorted(per.items())))


def report(what: str, ok: bool) -> None:
    print(f"  [{'ok' if ok else 'FAIL'}] {what}", flush=True)
    if not ok:
        FAILED.append(what)


FAILED: list[str] = []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=None, help="longest row's prompt (default 4096 on CUDA, 512 on CPU)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--topk-tokens", type=int, default=None, help="default 1024 on CUDA, 128 on CPU")
    args = ap.parse_args(argv)
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    cuda = dev.type == "cuda"
    prompt = args.prompt or (4096 if cuda else 512)
    budget = args.topk_tokens or (1024 if cuda else 128)
    heads, kv_heads, hd = (32, 8, 128) if cuda else (8, 2, 32)
    cfg = types.SimpleNamespace(num_hidden_layers=args.layers, num_key_value_heads=kv_heads, head_dim=hd,
                                num_attention_heads=heads)
    lens = [prompt, prompt * 3 // 4]
    print(f"topk checks on {dev}: {args.layers} layers, KV {kv_heads}x{hd}, rows {lens}, budget {budget} tokens, "
          f"compiled {cuda}", flush=True)
    kernels.kernels.cache_clear()
    check_selection(dev)
    check_exact(cfg, dev, lens, args.steps, cuda)
    check_topk(cfg, dev, lens, args.steps, cuda, budget)
    host_time(cfg, dev, lens, args.steps, cuda, budget)
    print("all checks passed" if not FAILED else f"FAILED: {FAILED}", flush=True)
    return 1 if FAILED else 0


if __name__ == "__main__":
    raise SystemExit(main())
