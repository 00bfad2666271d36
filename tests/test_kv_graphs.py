"""A paged top-k cache over a mapped CPU tier, run so that its steady decode steps replay as CUDA graphs.

On CPU (CI): a graphed cache's eager steps (token written to the tier as it is stored, fetches only
of the step's own layers, events of the step only) attend bit for bit as the plain cache's, leave
the same bytes in the CPU tier, and a replayed step's host side equals an executed one's. On CUDA
(the GPU machine): a run with the graphs replays steps and generates the same tokens as without.
"""

from __future__ import annotations

import pytest
import torch
from test_kv_topk_device import CFG, LENS, _counted_fetches, _drive, _factory

from worker.model.step import Step


def _host_state(cache) -> tuple:
    c = cache.counter
    return (cache.pos, cache.pos_next, cache.steps, c.layer_steps, c.row_layer_steps, c.blocks,
            cache._fetches, cache.mover.h2d.stats()["bytes"])


def test_graphed_steps_attend_and_store_as_the_plain_ones(tmp_path, monkeypatch):
    """Same outputs, same tracker hits, same completed blocks in the CPU tier; no fetch crosses a step;
    the steady steps are the ones the host calls ready."""
    f, tr = _factory(tmp_path, "cpu")
    try:
        plain = f(2, 128)
        ref = _drive(plain, LENS, 20)
        hits, ref_store = tr.snapshot()["hits"], plain.mover.store.buf.clone()
    finally:
        f.close()
    plans = _counted_fetches(monkeypatch)
    f, tr = _factory(tmp_path, "cpu")
    try:
        cache = f(2, 128)
        cache.use_graphs()
        ready = []
        real = cache._begin_decode

        def spy(step):
            ready.append(cache.graph_ready())
            real(step)

        monkeypatch.setattr(cache, "_begin_decode", spy)
        got = _drive(cache, LENS, 20)
        store = cache.mover.store.buf
    finally:
        f.close()
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert torch.equal(tr.snapshot()["hits"], hits)
    bt = 4
    for b, n in enumerate(LENS):  # the blocks all of whose tokens were stored in 20 decode steps
        done = (n + 20) // bt
        assert torch.equal(store[:, b, :done], ref_store[:, b, :done])
    assert len(plans) == 20 * CFG.num_hidden_layers  # the plain cache also fetched step 21's layer 0
    # row 1 (12 tokens, a ring of 2 blocks of 4) has k = 5 offloaded blocks from position 24 (step 13) on
    assert ready == [False] * 12 + [True] * 8


def test_a_replayed_steps_host_side_equals_an_executed_one(tmp_path):
    """Two graphed caches driven alike to a steady step; one executes it, the other only takes its host
    side (`replayed`): positions, step count, fetch counts and H2D bytes agree."""
    lens, steps = [40, 36], 4
    caches, fs = [], []
    try:
        for _ in range(2):
            f, _tr = _factory(tmp_path, "cpu")
            fs.append(f)
            c = f(2, 128)
            c.use_graphs()
            _drive(c, lens, steps)
            caches.append(c)
        assert all(c.graph_ready() for c in caches)
        pos = torch.tensor(lens)[:, None] + steps
        g = torch.Generator().manual_seed(1)
        h, kv, hd = CFG.num_attention_heads, CFG.num_key_value_heads, CFG.head_dim
        for layer in range(CFG.num_hidden_layers):
            caches[0].attend(layer, torch.randn(2, h, 1, hd, generator=g), torch.randn(2, kv, 1, hd, generator=g),
                             torch.randn(2, kv, 1, hd, generator=g), Step(pos, max(lens) + steps + 1))
        caches[1].replayed(Step(pos, max(lens) + steps + 1))
        assert _host_state(caches[0]) == _host_state(caches[1])
    finally:
        for f in fs:
            f.close()


@pytest.mark.parametrize("tier,kv", [("ssd", {}), ("cpu", {"kv_zero_copy": False})])
def test_only_a_mapped_cpu_tier_can_be_graphed(tmp_path, tier, kv):
    f, _ = _factory(tmp_path, tier, **kv)
    try:
        cache = f(2, 128)
        assert not cache.can_graph()
        with pytest.raises(ValueError, match="cannot be graphed"):
            cache.use_graphs()
    finally:
        f.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_topk_run_replays_and_generates_the_same_tokens(make_ckpt, tmp_path, monkeypatch):
    """gpu weights, KV offloaded to the CPU tier, top-k: with CUDA graphs the steady steps replay, and
    the tokens equal the eager run's."""
    from worker.model import graphs
    from worker.run import resolve_config, run

    replays = []
    real = graphs.GraphedDecode._paged

    def count(self, tokens, step):
        before = self.replays
        out = real(self, tokens, step)
        replays.append(self.replays - before)
        return out

    monkeypatch.setattr(graphs.GraphedDecode, "_paged", count)
    at_measure, made = [], []  # graphs captured by the end of the warm-up round, and by the end
    real_prepare = graphs.GraphedDecode.prepare

    def prepare(self, spans):
        at_measure.append(len(self.graphs))
        made.append(self)
        return real_prepare(self, spans)

    monkeypatch.setattr(graphs.GraphedDecode, "prepare", prepare)
    ckpt = make_ckpt(layers=3, dtype="bfloat16")
    flat = {"checkpoints": str(ckpt), "temperature": 0, "max_new_tokens": 24, "prompt_len": 200, "batch_size": 2,
            "max_seq_len": 256, "kv_offload": "cpu", "kv_block_tokens": 16, "kv_gpu_blocks": 2, "topk_tokens": 64,
            "roofline": False, "device": "cuda"}
    out = {}
    for graphed in (False, True):
        replays.clear()
        r = run(resolve_config({**flat, "cuda_graphs": graphed, "out_json": str(tmp_path / f"{graphed}.json")}))
        out[graphed] = [o["token_ids"] for o in r["outputs"]]
        if graphed:
            # every step of the measured round but its first (the warm-up round captured the graph)
            assert sum(replays) >= r["metrics"]["decode_steps"] - 1 >= 20, replays
            assert at_measure == [1] and len(made[0].graphs) == 1  # captured in the warm-up, none measured
            assert r["io"]["kv_h2d"]["untimed_bytes"] > 0
    assert out[True] == out[False]


@pytest.mark.side
def test_the_token_write_compiles_to_a_scatter_not_a_copy_of_the_tier():
    """Compiled (Inductor, on CPU here), storing a token into a mapped tier of J blocks must not loop
    over the tier: indexing a view of it (ring[:, :, 0][rows, slot, :, off] = k) compiled into a copy
    of the whole buffer, which for a CPU tier over PCIe cost more than the attention saved. J is prime,
    so any loop over the tier's blocks has a bound that J divides."""
    import re

    from torch._inductor.utils import run_and_get_code

    from worker.kv import kernels

    b, r, kv, bt, hd, h, n, k, j = 1, 4, 2, 16, 8, 4, 37, 8, 10007
    ring, store = torch.randn(b, r, 2, kv, bt, hd), torch.zeros(b, j, 2, kv, bt, hd)
    kmin = torch.randn(b, n, kv, hd)
    signs = torch.randint(0, 255, (b, n, kv, bt, 1), dtype=torch.uint8)
    q, kk, vv = torch.randn(b, h, 1, hd), torch.randn(b, kv, 1, hd), torch.randn(b, kv, 1, hd)
    pos = torch.tensor([n * bt - 3])
    fn = torch.compile(kernels.topk_step, fullgraph=True, dynamic=False)
    args = (q, kk, vv, pos, ring, kmin, kmin + 1, signs, torch.randn(b, k, 2, kv, bt, hd), torch.arange(k)[None].clone(),
            None, bt, k, 2, store)
    _, codes = run_and_get_code(fn, *args)
    bounds = {int(x) for x in re.findall(r"<static_cast<int64_t>\((\d+)L\)", "\n".join(codes))}
    assert bounds and not [x for x in bounds if x % j == 0], sorted(bounds)
    f = (n * bt - 3) // bt
    assert torch.equal(store[0, f, 0, :, (n * bt - 3) % bt], kk[0, :, 0])  # and the token is there
    assert torch.count_nonzero(store) == torch.count_nonzero(kk) + torch.count_nonzero(vv)
