"""Top-k block attention: what it selects, that its block score is the defined estimate (a brute-force
reference) and finds what the key-range bound missed, and that it is exact when the blocks it keeps
hold all the attention mass (and bit-exact when k covers every block)."""

from __future__ import annotations

import math
import types

import pytest
import torch

from worker.config import KVConfig
from worker.kv.factory import KVFactory
from worker.kv.static import StaticKVCache
from worker.kv.topk import (MAX_KEY_BITS, block_scores, block_summary, code_bits, code_bytes, pack_bits, pack_codes,
                            recent_blocks, select_blocks, unpack_bits, unpack_codes)
from worker.kv.tracker import BlockTracker
from worker.model.step import Step

DEV = torch.device("cpu")
CFG = types.SimpleNamespace(num_hidden_layers=2, num_key_value_heads=2, head_dim=8, num_attention_heads=4)


def test_selection_keeps_sink_and_recent_blocks():
    g = torch.Generator().manual_seed(0)
    n = 12
    frontier = torch.tensor([11, 6, 3, 1])
    scores = torch.rand(4, n, generator=g)
    scores[:, 0] = -50.0  # the sink and the recent blocks score worst...
    for b, f in enumerate(frontier.tolist()):
        scores[b, max(f - 1, 0):f + 1] = -40.0
    for k in (2, 3, 4, 6):
        sel, valid = select_blocks(scores, k, frontier, recent=recent_blocks(k))
        for b, f in enumerate(frontier.tolist()):
            chosen = sel[b][valid[b]].tolist()
            assert chosen == sorted(chosen) and len(set(chosen)) == len(chosen)
            assert 0 in chosen and f in chosen  # ... and are kept anyway
            if k >= 4 and f >= 1:
                assert f - 1 in chosen
            assert all(j <= f for j in chosen)  # never a block after the frontier (no keys yet)
            assert len(chosen) == min(k, f + 1)
            rest = [j for j in range(1, f + 1) if j not in (f, f - 1 if k >= 4 else f)]
            best = sorted(rest, key=lambda j: -scores[b, j].item())[:len(chosen) - len(set(chosen) - set(rest))]
            assert set(best) <= set(chosen)  # the others are the best scored


def test_selection_only_uses_available_blocks():
    scores = torch.arange(10.0)[None].repeat(2, 1)  # later blocks score higher
    avail = torch.ones(2, 10, dtype=torch.bool)
    avail[:, 7:9] = False  # e.g. offloaded and not prefetched
    sel, valid = select_blocks(scores, 4, torch.tensor([9, 9]), avail, recent=1)
    assert sel[0].tolist() == [0, 5, 6, 9] and bool(valid.all())


def _estimate(q: list[float], keys: list[list[float]], block: list[list[float]], bits: int) -> float:
    """Brute force: the best q·k̂ / sqrt(hd) over `keys`, each channel of k̂ at the middle of the slice of
    the channel's [min, max] over `block` (the block's written keys, cut into 2^bits equal slices) that
    its value lies in (above a slice's lower edge: in it, or higher)."""
    best = -math.inf
    slices = 1 << bits
    for key in keys:
        s = 0.0
        for c, x in enumerate(key):
            lo, hi = min(k[c] for k in block), max(k[c] for k in block)
            w = (hi - lo) / slices
            level = sum(1 for t in range(1, slices) if x > lo + (hi - lo) * t / slices)
            s += q[c] * (lo + w * (level + 0.5))
        best = max(best, s / math.sqrt(len(q)))
    return best


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_block_scores_equal_a_brute_force_estimate(bits):
    """The score is the log of the head-averaged softmax over the row's live blocks of each block's best
    estimated key; the block being written counts only its written keys (put_token's summary)."""
    g = torch.Generator().manual_seed(1)
    b, n, kv, bt, hd, h = 3, 5, 2, 4, 12, 4  # hd not a multiple of 8: the last byte of each plane is partial
    blocks = torch.randn(b, n, kv, bt, hd, generator=g) * 3
    blocks[:, :, :, :, 5] = 0.5  # a constant channel: its estimate is exact
    q = torch.randn(b, h, 1, hd, generator=g)
    frontier, written = [4, 2, 0], [3, 1, 2]  # the frontier block's written positions; the rest is stale
    kmin, kmax, codes = block_summary(blocks, bits=bits)
    assert codes.shape[-1] == bits * 2
    for r, (f, w) in enumerate(zip(frontier, written)):
        for dst, part in zip((kmin, kmax, codes), block_summary(blocks[r:r + 1, f:f + 1], torch.tensor([w]), bits)):
            dst[r, f] = part[0, 0]
    got = block_scores(q, kmin, kmax, codes, torch.tensor(frontier))
    for r, f in enumerate(frontier):
        est = [[0.0] * (f + 1) for _ in range(h)]
        for head in range(h):
            for j in range(f + 1):
                keys = blocks[r, j, head // (h // kv)].tolist()[:written[r] if j == f else bt]
                est[head][j] = _estimate(q[r, head, 0].tolist(), keys, keys, bits)
        mass = [sum(math.exp(e[j] - max(e)) / sum(math.exp(x - max(e)) for x in e) for e in est) / h
                for j in range(f + 1)]
        torch.testing.assert_close(got[r, :f + 1], torch.tensor([math.log(m) for m in mass]), rtol=1e-5, atol=1e-5)
        assert bool(torch.isneginf(got[r, f + 1:]).all())  # no keys yet


def test_the_summary_defaults_agree_with_the_kv_config():
    """topk.KEY_BITS (the functions' default) is what a run gets; topk.MAX_KEY_BITS is the config's bound."""
    from worker.kv import topk

    assert KVConfig().topk_key_bits == topk.KEY_BITS
    KVConfig(topk_key_bits=topk.MAX_KEY_BITS)
    with pytest.raises(ValueError):
        KVConfig(topk_key_bits=topk.MAX_KEY_BITS + 1)


def test_key_bits_pack_and_unpack():
    g = torch.Generator().manual_seed(2)
    for hd in (8, 12, 64):
        bits = torch.rand(3, 5, hd, generator=g) < 0.5
        packed = pack_bits(bits)
        assert packed.dtype == torch.uint8 and packed.shape == (3, 5, -(-hd // 8))
        assert torch.equal(unpack_bits(packed, hd), bits.to(torch.uint8))
        for nbits in range(1, MAX_KEY_BITS + 1):
            levels = torch.randint(0, 1 << nbits, (3, 5, hd), generator=g, dtype=torch.uint8)
            codes = pack_codes(levels, nbits)
            assert codes.shape == (3, 5, code_bytes(hd, nbits)) and code_bits(codes, hd) == nbits
            assert torch.equal(unpack_codes(codes, hd), levels)


def test_a_key_matching_the_query_is_found_where_the_key_range_bound_misses_it():
    """The failure on the trained recall model (topk.py): one key holds the head's weight, but wide
    key ranges elsewhere give other blocks a higher range bound. The estimate from the keys' bits ranks
    the block holding that key first."""
    g = torch.Generator().manual_seed(3)
    b, n, kv, bt, hd, h = 1, 64, 1, 16, 64, 1
    blocks = torch.randn(b, n, kv, bt, hd, generator=g) * 4
    q = torch.randn(b, h, 1, hd, generator=g)
    blocks[0, 37, 0, 5] = 1.5 * q[0, 0, 0]  # the key that matters, in block 37
    kmin, kmax, signs = block_summary(blocks)
    true = torch.einsum("bhd,bnhtd->bhnt", q[:, :, 0], blocks).amax(-1)[0, 0]  # (n,)
    assert int(true.argmax()) == 37
    quest = (q[0, 0, 0].clamp(min=0) * kmax[0, :, 0] + q[0, 0, 0].clamp(max=0) * kmin[0, :, 0]).sum(-1)  # (n,)
    assert int((quest > quest[37]).sum()) >= 5  # the range bound ranks it far down
    assert int(block_scores(q, kmin, kmax, signs, torch.tensor([n - 1]))[0].argmax()) == 37


@pytest.mark.side
def test_more_key_bits_find_a_needle_more_often():
    """Why the summary holds 2 bits per key and channel by default (topk.py): one key 15% above every
    other key's score among 256 blocks of random keys (the recall model's layer 1 at 32k, in small).
    One bit ranks its block first in under half of the draws; two bits in most; three in all but one."""
    firsts = {1: 0, 2: 0, 3: 0}
    draws = 40
    for seed in range(draws):
        g = torch.Generator().manual_seed(seed)
        n, bt, hd = 256, 16, 64
        blocks = torch.randn(1, n, 1, bt, hd, generator=g)
        q = torch.randn(1, 1, 1, hd, generator=g)
        qv = q[0, 0, 0]
        scores = torch.einsum("d,ntd->nt", qv, blocks[0, :, 0])
        blocks[0, 100, 0, 7] += qv * (1.15 * scores.max() - scores[100, 7]) / (qv @ qv)  # the needle, block 100
        assert int(torch.einsum("d,ntd->nt", qv, blocks[0, :, 0]).amax(-1).argmax()) == 100
        for bits in firsts:
            s = block_scores(q, *block_summary(blocks, bits=bits), torch.tensor([n - 1]))[0]
            firsts[bits] += int(s.argmax()) == 100
    assert firsts[1] < 0.6 * draws and firsts[2] >= 0.75 * draws and firsts[3] >= draws - 1, firsts


def _massive(lens, steps, important, seed=0, a=24.0):
    """Decode inputs where every query only sees keys of `important` blocks (and its own new keys).

    Channel 0 of every query is `a`; other keys have -a there, which puts their scores ~200 below the
    rest: their softmax weight is exactly 0 in float32, and their key bound ranks them last."""
    g = torch.Generator().manual_seed(seed)
    b, t, bt = len(lens), max(lens), 4
    kv, hd, h = CFG.num_key_value_heads, CFG.head_dim, CFG.num_attention_heads

    def keys(n, far):
        k = torch.randn(b, kv, n, hd, generator=g)
        k[..., 0] = torch.where(far, -a, 0.0)[None, None, :]
        return k

    def query():
        q = torch.randn(b, h, 1, hd, generator=g)
        q[..., 0] = a
        return q

    far = torch.tensor([p // bt not in important for p in range(t)])
    prefill = [(torch.randn(b, h, t, hd, generator=g), keys(t, far), torch.randn(b, kv, t, hd, generator=g))
               for _ in range(CFG.num_hidden_layers)]
    decode = [[(query(), keys(1, torch.tensor([False])), torch.randn(b, kv, 1, hd, generator=g))
               for _ in range(CFG.num_hidden_layers)] for _ in range(steps)]
    return prefill, decode


def _run(cache, lens, prefill, decode):
    b, t = len(lens), max(lens)
    outs = []
    for layer, (q, k, v) in enumerate(prefill):
        cache.attend(layer, q, k, v, Step(torch.arange(t).expand(b, t), t))
    pos = torch.tensor(lens)
    for i, per_layer in enumerate(decode):
        for layer, (q, k, v) in enumerate(per_layer):
            outs.append(cache.attend(layer, q, k, v, Step(pos[:, None].clone(), t + i + 1)))
        pos = pos + 1
    return outs


@pytest.mark.parametrize("kv", [dict(kv_offload="none"), dict(kv_offload="cpu", kv_gpu_blocks=1),
                                dict(kv_offload="cpu", kv_gpu_blocks=2), dict(kv_offload="ssd", kv_gpu_blocks=1)],
                         ids=["resident", "cpu-one-block", "cpu-two-blocks", "ssd-one-block"])
def test_topk_equals_exact_when_selected_blocks_hold_all_mass(tmp_path, kv):
    lens, steps, important = [40, 30], 8, {3, 7}
    prefill, decode = _massive(lens, steps, important)
    ref = _run(StaticKVCache(CFG, 2, 64, DEV, torch.float32), lens, prefill, decode)
    tracker = BlockTracker(2, CFG.num_hidden_layers, 16)
    f = KVFactory(CFG, KVConfig(kv_block_tokens=4, topk_blk=5, **kv), DEV, torch.float32, 64, 2, tracker, tmp_path)
    try:
        got = _run(f(2, 64), lens, prefill, decode)
    finally:
        f.close()
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    hits = tracker.snapshot()["hits"]  # (B, L, blocks)
    assert bool((hits[:, :, sorted(important)] == steps).all())  # the mass-holding blocks, every step
    assert bool((hits[:, :, 0] == steps).all())  # the sink, always
    # row 0 (frontier blocks 10, 11): k = 5 is exactly the sink, two recent blocks and the two that matter
    assert int(hits[0, :, [1, 2, 4, 5, 6, 8]].sum()) == 0


def test_topk_without_mass_concentration_is_approximate(tmp_path):
    """With random keys (attention spread over every block) top-k must differ from exact attention."""
    lens = [40, 30]
    g = torch.Generator().manual_seed(3)
    prefill = [(torch.randn(2, 4, 40, 8, generator=g), torch.randn(2, 2, 40, 8, generator=g),
                torch.randn(2, 2, 40, 8, generator=g)) for _ in range(2)]
    decode = [[(torch.randn(2, 4, 1, 8, generator=g), torch.randn(2, 2, 1, 8, generator=g),
                torch.randn(2, 2, 1, 8, generator=g)) for _ in range(2)] for _ in range(4)]
    ref = _run(StaticKVCache(CFG, 2, 64, DEV, torch.float32), lens, prefill, decode)
    f = KVFactory(CFG, KVConfig(kv_block_tokens=4, topk_blk=3), DEV, torch.float32, 64, 2)
    got = _run(f(2, 64), lens, prefill, decode)
    assert max((a - b).abs().max().item() for a, b in zip(got, ref)) > 1e-2


@pytest.mark.parametrize("kv", [dict(kv_offload="none"), dict(kv_offload="cpu", kv_gpu_blocks=1)])
def test_k_covering_every_block_is_bit_exact(tmp_path, kv):
    lens, steps = [40, 30], 8
    prefill, decode = _massive(lens, steps, {1}, seed=5, a=1.0)
    ref = _run(StaticKVCache(CFG, 2, 64, DEV, torch.float32), lens, prefill, decode)
    k = -(-(max(lens) + steps) // 4)  # blocks of the longest row at the last step
    f = KVFactory(CFG, KVConfig(kv_block_tokens=4, topk_blk=k, **kv), DEV, torch.float32, 64, 2)
    try:
        got = _run(f(2, 64), lens, prefill, decode)
    finally:
        f.close()
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


@pytest.mark.side
def test_compiled_scoring_unpacks_the_codes_inside_one_reduction():
    """Compiled (Inductor, on CPU here), scoring with 2- or 3-bit codes must not materialize the keys'
    levels (one value per key and channel) or the query's product with them: the bit planes are read
    and summed in the reduction over channels, so the scoring reads bits per channel from memory,
    not bytes, at any `topk_key_bits`. The largest buffer is one score per key and query head."""
    import re

    from torch._inductor.utils import run_and_get_code

    b, n, kv, g, bt, hd = 1, 37, 2, 3, 16, 24
    for bits in (2, 3):
        blocks = torch.randn(b, n, kv, bt, hd, generator=torch.Generator().manual_seed(bits))
        summary = block_summary(blocks, bits=bits)
        q = torch.randn(b, kv * g, 1, hd)
        fn = torch.compile(block_scores, fullgraph=True, dynamic=False)
        got, code = run_and_get_code(fn, q, *summary, torch.tensor([n - 1]))
        torch.testing.assert_close(got, block_scores(q, *summary, torch.tensor([n - 1])))
        shapes = re.findall(r"empty_strided_cpu\(\(([\d, ]*)\)", "\n".join(code))
        sizes = [math.prod(int(x) for x in s.split(",") if x.strip()) for s in shapes]
        assert sizes and max(sizes) <= n * kv * g * bt < n * kv * bt * hd, (bits, sorted(sizes))
