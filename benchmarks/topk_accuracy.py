"""How close top-k block attention comes to exact attention: a measured table for k = 2, 4, 8.

A synthetic Llama (random weights, the `tiny` preset) decodes after long prompts (1-2k tokens) on
the CPU, once with the exact cache and then with `topk_blk = k`, both with every block on the GPU
(selection by the current query) and with blocks offloaded to the CPU tier (kv_gpu_blocks 4: the
prefetch picks blocks by the previous step's scores, the selection then uses the current query among
what is on the device). Per setting it prints:

- free-running greedy agreement: generated tokens equal to the exact run's, position by position,
  and the mean step of the first difference per row;
- teacher-forced: the exact run's tokens are fed to the top-k cache, so each step sees the same
  context; argmax agreement and max / mean |logit difference| per step (logits are ~N(0, 1));
- attention mass kept (teacher-forced, all-on-GPU runs): the share of the exact softmax weight (mean
  over heads, rows, layers and steps) that falls in the k selected blocks, and what an oracle that
  knew the true weights would keep with the same k (sink and recent blocks forced alike).

Random weights attend more evenly than a trained model (no learned sinks or local heads), so the
errors here are on the pessimistic side of what a real checkpoint shows.

    python benchmarks/topk_accuracy.py --lengths 1024 2048 --batch 4 --new-tokens 32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from worker.config import KVConfig
from worker.engine import build_engine
from worker.kv import kernels
from worker.kv import topk as topk_sel
from worker.kv.factory import KVFactory
from worker.model.step import Step
from worker.pack.cache import ensure_pack
from worker.run import resolve_config
from worker.synth.checkpoints import make_model

DEV = torch.device("cpu")


def decode(model, cache, prompts: list[list[int]], steps: int, forced: torch.Tensor | None = None):
    """Greedy decode (or feed `forced` (B, steps) tokens); returns tokens (B, steps) and logits (steps, B, V)."""
    lens = torch.tensor([len(p) for p in prompts])
    width = int(lens.max())
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p)
    step = Step(torch.arange(width).expand(len(prompts), width), width, tuple(lens.tolist()))
    logits = model.forward(ids, step, cache, logits_at=lens - 1)
    toks, trace = [logits.argmax(-1)], [logits]
    pos = lens.clone()
    for t in range(1, steps):
        feed = forced[:, t - 1] if forced is not None else toks[-1]
        logits = model.forward(feed[:, None], Step(pos[:, None], width + t), cache)[:, 0]
        toks.append(logits.argmax(-1))
        trace.append(logits)
        pos += 1
    return torch.stack(toks, 1), torch.stack(trace)


class MassProbe:
    """Records, for each top-k decode step of an all-resident paged cache (eager kernels), the exact
    attention mass of the blocks it selected and the mass the best k blocks would hold (benchmark
    instrumentation only: it wraps `kernels.topk_step` and `topk.select_blocks` while active)."""

    def __init__(self):
        self.kept: list[float] = []
        self.oracle: list[float] = []
        self._sel = None

    def __enter__(self):
        self._fns = kernels.kernels(False)  # the eager namespace every uncompiled paged cache calls through
        self._select, self._topk = topk_sel.select_blocks, self._fns.topk
        probe = self

        def select(*args, **kw):
            probe._sel = probe._select(*args, **kw)
            return probe._sel

        def topk(q, k, v, pos, ring, kmin, kmax, signs, stage, cand, track, bt, topk, recent, *tier):
            out = probe._topk(q, k, v, pos, ring, kmin, kmax, signs, stage, cand, track, bt, topk, recent, *tier)
            if stage is None:  # every block is in the ring: the exact weights can be computed here
                probe._measure(q, pos, ring, kmin.shape[1], bt, topk, recent)
            return out

        topk_sel.select_blocks, self._fns.topk = select, topk
        return self

    def __exit__(self, *exc):
        topk_sel.select_blocks, self._fns.topk = self._select, self._topk

    def _measure(self, q, pos, ring, n, bt, k, recent) -> None:
        b, h, _, hd = q.shape
        keys = ring[:, :n, 0].transpose(1, 2).reshape(b, -1, n * bt, hd)  # (B, KV, n*bt, hd)
        keys = keys.repeat_interleave(h // keys.shape[1], dim=1)  # (B, H, n*bt, hd)
        s = (q.float() @ keys.float().transpose(-1, -2))[:, :, 0] * hd ** -0.5  # (B, H, n*bt)
        s = s.masked_fill(torch.arange(n * bt, device=q.device)[None, None, :] > pos[:, None, None], float("-inf"))
        mass = s.softmax(-1).view(b, h, n, bt).sum(-1).mean(1)  # (B, n): exact weight per block
        sel, valid = self._sel
        self.kept.append((mass.gather(1, sel) * valid).sum(1).mean().item())
        f = torch.div(pos, bt, rounding_mode="floor")
        j = torch.arange(n, device=q.device)[None, :]
        forced = (j == 0) | ((j > f[:, None] - recent) & (j <= f[:, None]))
        best = torch.where(forced, 2.0, mass).topk(k, dim=1).indices
        self.oracle.append(mass.gather(1, best).sum(1).mean().item())


def first_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the first step where a and b differ (steps if never)."""
    diff = a != b
    idx = torch.where(diff.any(1), diff.float().argmax(1), torch.tensor(a.shape[1]))
    return idx.float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/sb-topk-accuracy")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--block-tokens", type=int, default=16)
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--gpu-blocks", type=int, default=4, help="kv_gpu_blocks of the offloaded runs")
    args = ap.parse_args()
    print("$ python benchmarks/topk_accuracy.py " + " ".join(sys.argv[1:]))
    torch.manual_seed(0)
    ckpt = make_model(Path(args.work) / f"tiny-{args.layers}L", preset="tiny", layers=args.layers, dtype="float32",
                      overrides={"vocab_size": 1000}, force=True)
    max_seq = max(args.lengths) + args.new_tokens
    cfg = resolve_config({"checkpoints": str(ckpt), "max_seq_len": max_seq, "batch_size": args.batch})
    engine = build_engine(cfg, ensure_pack(ckpt), DEV)
    mc = engine.cfg
    print(f"model: synthetic tiny Llama, {mc.num_hidden_layers} layers, hidden {mc.hidden_size}, "
          f"{mc.num_attention_heads} heads / {mc.num_key_value_heads} KV heads, float32, CPU; "
          f"batch {args.batch}, {args.new_tokens} new tokens, blocks of {args.block_tokens} tokens")
    print(f"{'prompt':>6} {'k':>3} {'cache':<22} {'greedy agree':>12} {'1st diff':>8} "
          f"{'forced argmax':>13} {'max |dlogit|':>12} {'mean |dlogit|':>13} {'mass kept':>9} {'oracle':>6}")
    g = torch.Generator().manual_seed(1)
    t_start = time.perf_counter()
    for n in args.lengths:
        lens = [n, n - 1, 3 * n // 4, n // 2][:args.batch] + [n] * max(0, args.batch - 4)
        prompts = [torch.randint(10, mc.vocab_size - 20, (m,), generator=g).tolist() for m in lens]
        ref_tok, ref_logits = decode(engine.model, engine.new_cache(args.batch, max_seq), prompts, args.new_tokens)
        settings = [(0, "cpu offload (exact)", dict(kv_offload="cpu", kv_gpu_blocks=args.gpu_blocks))]
        for k in args.ks:
            settings += [(k, "all on GPU", dict(kv_offload="none")),
                         (k, f"cpu offload, {args.gpu_blocks} on GPU", dict(kv_offload="cpu", kv_gpu_blocks=args.gpu_blocks))]
        for k, name, kv in settings:
            factory = KVFactory(mc, KVConfig(kv_block_tokens=args.block_tokens, topk_blk=k, **kv), DEV, torch.float32,
                                max_seq, args.batch)
            try:
                tok, _ = decode(engine.model, factory(args.batch, max_seq), prompts, args.new_tokens)
                with MassProbe() as probe:
                    ftok, flog = decode(engine.model, factory(args.batch, max_seq), prompts, args.new_tokens,
                                        forced=ref_tok)
            finally:
                factory.close()
            d = (flog - ref_logits).abs()
            kept, oracle = (f"{sum(x) / len(x):>9.1%}" if x else f"{'-':>9}" for x in (probe.kept, probe.oracle))
            print(f"{n:>6} {k:>3} {name:<22} {(tok == ref_tok).float().mean().item():>11.1%} "
                  f"{first_diff(tok, ref_tok):>8.1f} {(ftok == ref_tok).float().mean().item():>12.1%} "
                  f"{d.max().item():>12.3e} {d.mean().item():>13.3e} {kept} {oracle.strip():>6}")
    engine.close()
    print(f"({time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
