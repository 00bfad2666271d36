"""Which block score keeps the most attention mass: the scores tried for issue 14, per layer, on a recall model.

Teacher-forced decode of passkey answers (as `topk_recall.py`'s mass step; eager, float32, on CUDA
when there is one) through an all-resident paged cache whose top-k budget is all blocks but one, so
the queries are those of (nearly) exact attention. At every decode step of every layer the exact
attention weights are computed from the cache's keys, and each score below chooses k blocks with the
engine's own `topk.select_blocks` (sink and recent blocks forced); the table gives the mass each
keeps (mean over heads, rows and steps) over what the oracle keeps (the best k blocks by that mass,
`MassProbe`'s oracle), per layer and in all:

- `range bound, max over heads`: the per-channel key min/max bound (Quest), per head a log-softmax
  over blocks, a block's score the best over heads (the score before this change);
- `range bound, mean over heads`: the same per-head softmax, averaged over heads (what the mass counts);
- `range centre + slack/2`: q·centre + half the bound's slack per channel (an estimate, not a bound);
- `range bound, 2 / 4 keys`: the bound over sub-blocks of 2 or 4 keys, the block's best (2x / 4x
  the summary);
- `mean key`: q·(mean key) + log(keys), a centroid estimate;
- `key codes, b bit(s)`: the engine's score (`topk.block_scores`) with b = 1, 2, 3 bits per key and
  channel in the block summary (`KVConfig.topk_key_bits`; 2 is the default).

Under the mass table, `needle hit`: at the steps where one head puts more than half its weight on a
single key, how often the block holding that key is among the k selected (per layer, hits/cases):
what a retrieval needs, which a mean of the mass can hide.

    python benchmarks/topk_selection.py                                     # committed cpu-size model, 1k/2k
    python benchmarks/topk_selection.py --ckpt /tmp/sb-recall/recall-gpu --lengths 8192 32768 --n 24
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker.config import KVConfig  # noqa: E402
from worker.engine import build_engine  # noqa: E402
from worker.kv import kernels  # noqa: E402
from worker.kv import topk as sel  # noqa: E402
from worker.kv.factory import KVFactory  # noqa: E402
from worker.model.step import Step  # noqa: E402
from worker.pack.cache import ensure_pack  # noqa: E402
from worker.recall.build import copy_reference, task_of  # noqa: E402
from worker.recall.task import passkey_prompts  # noqa: E402
from worker.run import resolve_config  # noqa: E402

INF = float("inf")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _live(est: torch.Tensor, pos: torch.Tensor, bt: int) -> torch.Tensor:
    """est (B, H, n) with the blocks after each row's frontier at -inf."""
    n = est.shape[2]
    return est.masked_fill(torch.arange(n, device=est.device)[None, None, :] > (pos // bt)[:, None, None], -INF)


def _per_head(q: torch.Tensor, blocks: torch.Tensor, fn) -> torch.Tensor:
    """fn(qg (B, KV, G, hd), blocks (B, n, KV, bt, hd)) → (B, KV, G, n), reshaped to (B, H, n) and scaled."""
    b, h, _, hd = q.shape
    qg = q[:, :, 0].float().view(b, blocks.shape[2], -1, hd)
    return fn(qg, blocks.float()).reshape(b, h, -1) * hd ** -0.5


def _bound(qg, lo, hi):
    return (torch.einsum("bkgd,bnkd->bkgn", qg.clamp(min=0), hi)
            + torch.einsum("bkgd,bnkd->bkgn", qg.clamp(max=0), lo))


def range_bound(sub: int | None = None):
    def est(q, blocks, pos, bt):
        def fn(qg, k):
            if sub is None:
                return _bound(qg, k.amin(3), k.amax(3))
            s = k.unflatten(3, (-1, sub))  # (B, n, KV, bt / sub, sub, hd)
            lo, hi = s.amin(4), s.amax(4)
            return torch.stack([_bound(qg, lo[:, :, :, i], hi[:, :, :, i]) for i in range(lo.shape[3])]).amax(0)
        return _per_head(q, blocks, fn)
    return est


def range_centre(q, blocks, pos, bt):
    def fn(qg, k):
        lo, hi = k.amin(3), k.amax(3)
        return (torch.einsum("bkgd,bnkd->bkgn", qg, (lo + hi) / 2)
                + 0.5 * torch.einsum("bkgd,bnkd->bkgn", qg.abs(), (hi - lo) / 2))
    return _per_head(q, blocks, fn)


def mean_key(q, blocks, pos, bt):
    def fn(qg, k):
        return torch.einsum("bkgd,bnkd->bkgn", qg, k.mean(3))
    return _per_head(q, blocks, fn) + math.log(bt)


def max_over_heads(est):
    return lambda *a: torch.log_softmax(_live(est(*a), a[2], a[3]), -1).amax(1)


def mean_over_heads(est):
    return lambda *a: torch.log_softmax(_live(est(*a), a[2], a[3]), -1).exp().mean(1).log()


def key_codes(bits: int):
    return lambda q, blocks, pos, bt: sel.block_scores(q, *sel.block_summary(blocks, bits=bits), pos // bt)


SCORES = {
    "range bound, max over heads": max_over_heads(range_bound()),
    "range bound, mean over heads": mean_over_heads(range_bound()),
    "range centre + slack/2": mean_over_heads(range_centre),
    "range bound, 2 keys": mean_over_heads(range_bound(2)),
    "range bound, 4 keys": mean_over_heads(range_bound(4)),
    "mean key": mean_over_heads(mean_key),
    "key codes, 1 bit": key_codes(1),
    "key codes, 2 bits (default)": key_codes(2),
    "key codes, 3 bits": key_codes(3),
}
NEEDLE = 0.5  # a head's weight on its best key above which the step is a retrieval case


class Tally:
    """Mass kept per (budget, score, layer) and the oracle's, summed over steps (row means)."""

    def __init__(self, budgets: list[int], bt: int, layers: int):
        self.budgets, self.bt, self.layers = budgets, bt, layers
        self.kept: dict[tuple, float] = {}
        self.calls = 0

    def add(self, key: tuple, value: float) -> None:
        self.kept[key] = self.kept.get(key, 0.0) + value

    def measure(self, q, ring, pos) -> None:
        """One layer's decode step: ring (B, n, 2, KV, bt, hd) holds every block (an all-resident cache)."""
        layer = self.calls % self.layers
        self.calls += 1
        b, h, _, hd = q.shape
        n, kv, bt = ring.shape[1], ring.shape[3], self.bt
        # every position after a row's current one holds its newest key (what put_token summarizes them as)
        at = torch.minimum(torch.arange(n * bt, device=q.device)[None, :], pos[:, None])  # (B, n * bt)
        keys = ring[:, :, 0].transpose(1, 2).reshape(b, kv, n * bt, hd)
        keys = keys.gather(2, at[:, None, :, None].expand(b, kv, n * bt, hd))  # (B, KV, n * bt, hd)
        blocks = keys.view(b, kv, n, bt, hd).transpose(1, 2)  # (B, n, KV, bt, hd)
        s = (q.float() @ keys.repeat_interleave(h // kv, 1).float().transpose(-1, -2))[:, :, 0] * hd ** -0.5
        s = s.masked_fill(torch.arange(n * bt, device=q.device)[None, None, :] > pos[:, None, None], -INF)
        p = s.softmax(-1)
        mass = p.view(b, h, n, bt).sum(-1).mean(1)  # (B, n): exact weight per block, mean over heads
        top, at_key = p.max(-1)  # (B, H)
        sharp, needle = top > NEEDLE, torch.div(at_key, bt, rounding_mode="floor")  # (B, H)
        f = pos // bt
        j = torch.arange(n, device=q.device)[None, :]
        scores = {name: fn(q, blocks, pos, bt) for name, fn in SCORES.items()}
        for budget in self.budgets:
            k = budget // bt
            recent = sel.recent_blocks(k)
            forced = (j == 0) | ((j > f[:, None] - recent) & (j <= f[:, None]))
            best = torch.where(forced, 2.0, mass).topk(k, dim=1).indices
            self.add((budget, "oracle", layer), mass.gather(1, best).sum(1).mean().item())
            for name, sc in scores.items():
                chosen, valid = sel.select_blocks(sc, k, f, None, recent)
                self.add((budget, name, layer), (mass.gather(1, chosen) * valid).sum(1).mean().item())
                hit = ((chosen[:, None, :] == needle[:, :, None]) & valid[:, None, :]).any(-1)  # (B, H)
                self.add(("hit", budget, name, layer), (hit & sharp).sum().item())
            self.add(("cases", layer), sharp.sum().item() / len(self.budgets))

    def table(self, length: int) -> list[str]:
        out = []
        for budget in self.budgets:
            oracle = [self.kept[(budget, "oracle", la)] for la in range(self.layers)]
            for name in SCORES:
                kept = [self.kept[(budget, name, la)] for la in range(self.layers)]
                per = " ".join(f"{x / o:6.3f}" for x, o in zip(kept, oracle))
                out.append(f"{length:>6} {budget:>6}  {name:<30} {per}  {sum(kept) / sum(oracle):6.3f}")
        for budget in self.budgets:
            for name in SCORES:
                per = " ".join(f"{int(self.kept.get(('hit', budget, name, la), 0))}/"
                               f"{round(self.kept.get(('cases', la), 0))}" for la in range(self.layers))
                out.append(f"{length:>6} {budget:>6}  needle hit, {name:<30} {per}")
        return out


@torch.no_grad()
def run_length(engine, ckpt: Path, length: int, n: int, budgets: list[int], bt: int) -> list[str]:
    task = task_of(ckpt)
    prompts, answers = passkey_prompts(task, n, length, seed=length)  # topk_recall.py's prompts
    dev = DEV
    steps = task.value_tokens
    max_seq = length + steps
    layers = engine.cfg.num_hidden_layers
    kv = KVConfig(kv_block_tokens=bt, topk_blk=length // bt - 1)  # top-k at every step, all but one block
    factory = KVFactory(engine.cfg, kv, dev, torch.float32, max_seq, n)
    tally = Tally(budgets, bt, layers)
    fns = kernels.kernels(False)
    real = fns.topk

    def topk(q, k, v, pos, ring, *rest):
        out = real(q, k, v, pos, ring, *rest)
        tally.measure(q, ring, pos)
        return out

    fns.topk = topk
    try:
        cache = factory(n, max_seq)
        want = torch.tensor(answers, device=dev)
        engine.model.forward(torch.tensor(prompts, device=dev),
                             Step(torch.arange(length, device=dev).expand(n, length), length, (length,) * n),
                             cache, logits_at=torch.full((n,), length - 1, device=dev))
        pos = torch.full((n,), length, device=dev)
        for t in range(1, steps):
            engine.model.forward(want[:, t - 1, None], Step(pos[:, None], length + t), cache)
            pos += 1
    finally:
        fns.topk = real
        factory.close()
    return tally.table(length)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=None, help="a recall checkpoint [the committed cpu-size one, copied to --work]")
    ap.add_argument("--work", default="/tmp/sb-topk-selection")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--n", type=int, default=16, help="passkeys per length")
    ap.add_argument("--budgets", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--block-tokens", type=int, default=16)
    a = ap.parse_args()
    print("$ python benchmarks/topk_selection.py " + " ".join(sys.argv[1:]), flush=True)
    ckpt = Path(a.ckpt) if a.ckpt else copy_reference(Path(a.work) / "recall-cpu", force=True)
    t0 = time.perf_counter()
    layers = None
    for length in a.lengths:
        flat = {"checkpoints": str(ckpt), "max_seq_len": length + task_of(ckpt).value_tokens, "batch_size": a.n,
                "compile": False, "dtype": "float32"}
        engine = build_engine(resolve_config(flat), ensure_pack(ckpt, dtype="float32"), DEV)
        try:
            if layers is None:
                layers = engine.cfg.num_hidden_layers
                print(f"model: {ckpt}; {a.n} passkeys per length, blocks of {a.block_tokens} tokens, float32, {DEV}")
                print(f"{'length':>6} {'budget':>6}  {'score':<30} "
                      + " ".join(f"{'L' + str(la):>6}" for la in range(layers)) + f"  {'all':>6}   (kept / oracle)")
            for row in run_length(engine, ckpt, length, a.n, [b for b in a.budgets if b < length], a.block_tokens):
                print(row, flush=True)
        finally:
            engine.close()
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
