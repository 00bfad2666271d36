"""Top-k on the device (issue 14): the decode step traces as one graph per span bucket and never
synchronizes the host; only the chosen blocks cross to the device, and the budget, the blocks read
and the bytes moved are recorded. (Selection against brute force: tests/test_kv_topk_select.py.)"""

from __future__ import annotations

import math
import threading
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from worker.config import KVConfig
from worker.kv import kernels as kernels_mod
from worker.kv import paged as paged_mod
from worker.kv import zerocopy
from worker.kv.factory import KVFactory
from worker.kv.tracker import BlockTracker
from worker.model.step import Step
from worker.stream import devsync

DEV = torch.device("cpu")
CFG = types.SimpleNamespace(num_hidden_layers=3, num_key_value_heads=2, head_dim=8, num_attention_heads=4)
LENS = [40, 12]  # row 1 has fewer offloaded blocks than k for the first steps


# ---- the decode step: one graph, no host sync ------------------------------------------------------

def _drive(cache, lens, steps, seed=0, kv_len=None, guard=None):
    """Prefill rows of `lens` (host lens given), then `steps` decode steps; attention outputs."""
    g = torch.Generator().manual_seed(seed)
    b, t = len(lens), max(lens)
    h, kv, hd = CFG.num_attention_heads, CFG.num_key_value_heads, CFG.head_dim
    outs = []
    step = Step(torch.arange(t).expand(b, t), t, tuple(lens))
    for layer in range(CFG.num_hidden_layers):
        cache.attend(layer, torch.randn(b, h, t, hd, generator=g), torch.randn(b, kv, t, hd, generator=g),
                     torch.randn(b, kv, t, hd, generator=g), step)
    pos = torch.tensor(lens)
    for i in range(steps):
        step = Step(pos[:, None].clone(), kv_len or t + i + 1)
        for layer in range(CFG.num_hidden_layers):
            q, k, v = (torch.randn(b, h, 1, hd, generator=g), torch.randn(b, kv, 1, hd, generator=g),
                       torch.randn(b, kv, 1, hd, generator=g))
            if guard is not None:
                with guard.step(i + 1):
                    outs.append(cache.attend(layer, q, k, v, step))
            else:
                outs.append(cache.attend(layer, q, k, v, step))
        pos = pos + 1
    return outs


def _factory(tmp_path, tier="cpu", topk=5, **kv):
    tiers = {"cpu": {"kv_offload": "cpu", "kv_gpu_blocks": 2}, "ssd": {"kv_offload": "ssd", "kv_gpu_blocks": 2},
             "none": {}}
    tracker = BlockTracker(2, CFG.num_hidden_layers, 32)
    cfg = KVConfig(kv_block_tokens=4, **({"topk_blk": topk} if topk else {}), **tiers[tier], **kv)
    return KVFactory(CFG, cfg, DEV, torch.float32, 128, 2, tracker, tmp_path), tracker


def _traced_kernels() -> types.SimpleNamespace:
    """The device functions as Dynamo graphs (aot_eager: traced whole, fullgraph), for the one-graph tests."""
    def trace(fn):
        return torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=False)

    return types.SimpleNamespace(score=trace(kernels_mod.score_step), exact=trace(kernels_mod.exact_step),
                                 topk=trace(kernels_mod.topk_step))


def _eager_then_traced(tmp_path, monkeypatch, tier: str, topk: int = 5):
    """The same decode driven eagerly, then through the traced device functions with Dynamo's counters
    cleared: (eager outputs, eager hits, traced outputs, traced cache, traced tracker)."""
    import torch._dynamo

    f, tr = _factory(tmp_path, tier, topk=topk)
    try:
        ref = _drive(f(2, 128), LENS, 10, kv_len=64)
        hits = tr.snapshot()["hits"]
    finally:
        f.close()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    traced = _traced_kernels()
    monkeypatch.setattr(paged_mod.kernels, "kernels", lambda compiled: traced)
    f, tr = _factory(tmp_path, tier, topk=topk)
    try:
        cache = f(2, 128)
        got = _drive(cache, LENS, 10, kv_len=64)
    finally:
        f.close()
    return ref, hits, got, cache, tr


@pytest.mark.parametrize("tier", ["cpu", "ssd", "none"])
def test_decode_step_traces_as_one_graph_per_bucket(tmp_path, monkeypatch, tier):
    """fullgraph tracing refuses anything that reads the device from the host (`.item()`, `nonzero`, a
    data-dependent shape); the same graph serves every layer and step of a span bucket."""
    import torch._dynamo

    ref, hits, got, _, tr = _eager_then_traced(tmp_path, monkeypatch, tier)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert torch.equal(tr.snapshot()["hits"], hits)
    assert not torch._dynamo.utils.counters["graph_break"]
    # one graph for the top-k step, one for the first step's scoring (host tiers only): not one per layer
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == (1 if tier == "none" else 2)


@pytest.mark.parametrize("tier", ["cpu", "ssd"])
@pytest.mark.parametrize("topk", [0, 32])
def test_exact_decode_step_traces_as_one_graph_per_bucket(tmp_path, monkeypatch, tier, topk):
    """The exact path over a host tier (no top-k, or a budget covering every block: scored for the
    tracker) is one traced device function per layer-step too, beside the resident cache's attention."""
    import torch._dynamo

    ref, hits, got, cache, tr = _eager_then_traced(tmp_path, monkeypatch, tier, topk)
    assert cache.topk == 0 or cache.topk >= 64 // 4  # every step exact
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert hits is None if not topk else torch.equal(tr.snapshot()["hits"], hits)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


SYNCING_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
               "aten.unique_dim.default", "aten._unique2.default", "aten.unique_consecutive.default",
               "aten.repeat_interleave.Tensor", "aten.masked_scatter.default"}


class HostSyncGuard(TorchDispatchMode):
    """Counts what would make the host wait for the device, per decode step and thread, while active.

    On the compute thread: device values read by the host (`item`, `tolist`, `numpy`, `cpu`, `bool()` of
    a tensor ...: aten's `_local_scalar_dense`), ops whose output shape depends on device data (a sync
    on CUDA: `nonzero`, boolean-mask indexing, ...), and waits on device events (the CPU stand-in's
    `synchronize`, which is where `wait_for` ends); on any thread: event waits."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.compute = threading.get_ident()
        self.hits: list[tuple[int, str, str]] = []
        self._step = 0
        self._active = False
        for name in ("item", "tolist", "numpy", "cpu"):
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name), f"Tensor.{name}"))
        real_to = torch.Tensor.to

        def to(t, *args, **kw):
            if any(str(a) == "cpu" for a in (*args, kw.get("device"))):
                self._hit("Tensor.to(cpu)")
            return real_to(t, *args, **kw)

        monkeypatch.setattr(torch.Tensor, "to", to)
        monkeypatch.setattr(devsync._DoneEvent, "synchronize", self._wrap(devsync._DoneEvent.synchronize,
                                                                          "event.synchronize", any_thread=True))
        monkeypatch.setattr(torch.cuda, "synchronize", self._wrap(torch.cuda.synchronize, "cuda.synchronize",
                                                                  any_thread=True))

    def _hit(self, what: str, any_thread: bool = False) -> None:
        me = threading.get_ident()
        if self._active and (any_thread or me == self.compute):
            self.hits.append((self._step, "compute" if me == self.compute else "worker", what))

    def _wrap(self, fn, what, any_thread=False):
        def wrapped(*args, **kw):
            self._hit(what, any_thread)
            return fn(*args, **kw)
        return wrapped

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        bool_index = name.startswith("aten.index") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for a in args if isinstance(a, (list, tuple))
            for i in a)
        if name in SYNCING_OPS or bool_index:
            self._hit(name)
        return func(*args, **(kwargs or {}))

    def step(self, i: int):
        guard = self

        class _On:
            def __enter__(self):
                guard._step, guard._active = i, True
                guard.__enter__()

            def __exit__(self, *exc):
                guard.__exit__(*exc)
                guard._active = False

        return _On()

    def at(self, who: str, after: int = 0) -> list:
        return [h for h in self.hits if h[1] == who and h[0] > after]


def test_the_guard_sees_host_syncs(monkeypatch):
    guard = HostSyncGuard(monkeypatch)
    x = torch.arange(6.0)
    with guard.step(1):
        x.sum().item(), x.tolist(), x[x > 2], bool(x.any()), torch.nonzero(x), devsync._DoneEvent().synchronize()
    assert {h[2] for h in guard.hits} >= {"Tensor.item", "Tensor.tolist", "aten._local_scalar_dense.default",
                                          "aten.nonzero.default", "event.synchronize"}
    assert any(h[2].startswith("aten.index") for h in guard.hits)


@pytest.mark.parametrize("tier", ["cpu", "ssd", "none"])
def test_topk_decode_never_syncs_the_host(tmp_path, monkeypatch, tier):
    """Not a single host sync on the compute thread in any decode step of any layer (the host knows the
    positions from the prefill's lens); with the CPU tier the KV worker never waits for the device
    either after the first step (the device gathers its own candidates). The SSD tier's worker waits
    for the ids' copy to the host, a layer-step after it was issued (the host must read the file)."""
    f, _ = _factory(tmp_path, tier)
    guard = HostSyncGuard(monkeypatch)
    try:
        cache = f(2, 128)
        _drive(cache, LENS, 12, guard=guard)
        f.drain()
    finally:
        f.close()
    assert cache.topk < math.ceil(41 / 4)  # top-k from the first decode step on
    assert guard.at("compute") == []
    if tier == "cpu":
        assert guard.at("worker", after=1) == []
    if tier == "ssd":
        assert guard.at("worker", after=1)  # the host gather's waits are visible to the guard


@pytest.mark.parametrize("topk", [0, 5])
@pytest.mark.parametrize("tier", ["cpu", "cpu-no-zero-copy", "ssd"])
def test_device_only_fetches_run_inline_on_the_compute_thread(tmp_path, monkeypatch, tier, topk):
    """The CPU tier's jobs are device work only (copies, the device gather) unless top-k gathers on the
    host: the compute thread issues them itself, with no handoff to the KV worker per layer-step. The
    SSD tier and a host gather keep the worker (their jobs wait for the disk or the device)."""
    from worker.kv import offload

    threads = []
    real = offload.KVMover._run
    monkeypatch.setattr(offload.KVMover, "_run", lambda m, job: threads.append(threading.get_ident()) or real(m, job))
    f, _ = _factory(tmp_path, tier.split("-")[0], topk=topk, **({"kv_zero_copy": False} if "no-zero" in tier else {}))
    try:
        cache = f(2, 128)
        _drive(cache, LENS, 6)
        f.drain()
    finally:
        f.close()
    inline = tier == "cpu" or (tier == "cpu-no-zero-copy" and not topk)
    assert cache.mover.inline == inline
    assert threads and all((t == threading.get_ident()) == inline for t in threads)


# ---- what crosses to the device, and what is recorded ---------------------------------------------

def _counted_fetches(monkeypatch):
    plans = []
    real = paged_mod.run_fetch

    def spy(m, cache, plan, free, cand):
        plans.append(plan)
        return real(m, cache, plan, free, cand)

    monkeypatch.setattr(paged_mod, "run_fetch", spy)
    return plans


@pytest.mark.parametrize("tier", ["cpu", "cpu-unmapped", "cpu-no-zero-copy", "ssd"])
def test_only_the_chosen_blocks_cross_and_every_path_agrees(tmp_path, monkeypatch, tier):
    """The device gather (CPU tier), the host gather of a CPU tier the device cannot map (a warning in
    the run's record) or was told not to (--no-kv-zero-copy) and the SSD tier's host gather attend
    over the same blocks bit for bit; the H2D bytes are exactly the ring fill plus min(k, offloaded)
    candidates per row and layer-step, which the cache counts."""
    f, tr = _factory(tmp_path, "cpu")
    try:
        ref = _drive(f(2, 128), LENS, 12)
        hits = tr.snapshot()["hits"]
    finally:
        f.close()
    if tier == "cpu-unmapped":
        monkeypatch.setattr(zerocopy, "device_view", lambda host, device: None)
    plans = _counted_fetches(monkeypatch)
    f, tr = _factory(tmp_path, tier.split("-")[0], **({"kv_zero_copy": False} if tier == "cpu-no-zero-copy" else {}))
    try:
        cache = f(2, 128)
        assert cache.host_ids == (tier != "cpu")
        got = _drive(cache, LENS, 12)
        io = f.io_stats()
    finally:
        f.close()
    assert bool(io["warnings"]) == (tier == "cpu-unmapped")
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert torch.equal(tr.snapshot()["hits"], hits)
    assert all(not p.exact for p in plans) and any(min(p.lo) < p.topk for p in plans)  # some rows had < k
    ext, bb = cache.mover.store.ext, cache.geo.block_bytes  # the SSD tier's blocks are padded to 4 KiB
    assert io["kv_h2d"]["bytes"] == sum(sum(p.counts) * ext + len(p.fill) * bb for p in plans)
    consumed = plans[:-1]  # the last one is the next step's layer 0, fetched ahead
    assert f.fetched.blocks == sum(sum(p.counts) for p in consumed)
    assert f.fetched.row_layer_steps == 2 * 3 * 12


def test_budget_in_tokens_maps_to_blocks(tmp_path):
    from worker.config import RunConfig, flat_fields
    from worker.errors import UserError

    assert "topk_tokens" in {fl.name for fl in flat_fields()}  # so `bench run --topk-tokens` exists
    kv = KVConfig(kv_block_tokens=16, topk_tokens=1024)
    assert (kv.topk_blocks, kv.topk_budget_tokens, kv.topk_blk) == (64, 1024, 0)
    assert (KVConfig(kv_block_tokens=16, topk_tokens=1000).topk_blocks, KVConfig(topk_blk=8).topk_budget_tokens) == (
        63, 128)
    with pytest.raises(UserError, match="topk_tokens and topk_blk are exclusive"):
        RunConfig.from_flat({"topk_tokens": 1024, "topk_blk": 8})
    with pytest.raises(UserError, match=r"topk_tokens must be more than kv_block_tokens \(16\)"):
        RunConfig.from_flat({"topk_tokens": 16})
    again = RunConfig.from_flat(RunConfig.from_flat({"topk_tokens": 100, "kv_block_tokens": 8}).to_flat())
    assert again.kv.topk_blocks == 13  # a resolved config round-trips
    # the same budget in tokens and in blocks is the same cache
    outs = []
    for kv in ({"topk_tokens": 17}, {"topk_blk": 5}):
        fac = KVFactory(CFG, KVConfig(kv_block_tokens=4, kv_offload="cpu", kv_gpu_blocks=2, **kv), DEV,
                        torch.float32, 128, 2, None, tmp_path)
        try:
            outs.append(_drive(fac(2, 128), LENS, 6))
        finally:
            fac.close()
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_run_json_row_and_floor_record_what_topk_fetched(make_ckpt, tmp_path):
    """`bench run --topk-tokens`: the JSON and the row carry the budget, the blocks read and the bytes
    per step; with every row past the ring by more than k blocks, that is k blocks per row and layer,
    and the floor's H2D term is exactly those bytes (not the offloaded context)."""
    from test_results import SUITE, ok_outcome

    from orchestrator.results.schema import build_row
    from worker.engine import build_engine
    from worker.pack.cache import ensure_pack
    from worker.run import resolve_config, run

    ckpt = make_ckpt(layers=3)
    flat = {"checkpoints": str(ckpt), "temperature": 0, "max_new_tokens": 6, "prompt_len": 30, "batch_size": 2,
            "max_seq_len": 48, "kv_offload": "cpu", "kv_block_tokens": 4, "kv_gpu_blocks": 1, "topk_tokens": 10,
            "roofline": False, "out_json": str(tmp_path / "r.json")}
    r = run(resolve_config(flat))
    m = r["metrics"]
    bb = 2 * 2 * 4 * 32 * 4  # K and V x kv heads x tokens x head_dim x float32
    assert (m["topk_budget_tokens"], m["topk_blocks"], m["kv_blocks_read_per_step"]) == (10, 3, 3.0)
    assert m["kv_bytes_per_step"] == 3 * 2 * 3 * bb  # 3 blocks x 2 rows x 3 layers
    assert r["config"]["kv"]["topk_tokens"] == 10
    engine = build_engine(resolve_config(flat), ensure_pack(ckpt), DEV)
    try:
        step = engine.kv_step_bytes(2, 33)
        exact = KVFactory(engine.cfg, KVConfig(kv_offload="cpu", kv_block_tokens=4, kv_gpu_blocks=1), DEV,
                          torch.float32, 48, 2).step_bytes(2, 33)
    finally:
        engine.close()
    assert step["h2d"] == m["kv_bytes_per_step"] < exact["h2d"]
    # the k blocks' tokens, every block's summary: key ranges (2 x hd floats) and codes (bt x hd x 2 bits, the
    # default) per KV head
    assert r["config"]["kv"]["topk_key_bits"] == 2
    assert step["hbm"] == 6 * 12 * bb // 4 + 6 * 9 * 2 * (2 * 32 * 4 + 4 * 32 * 2 // 8)
    spec = SUITE.specs[0]
    outcome = ok_outcome(spec)
    outcome.result["metrics"].update({k: m[k] for k in ("topk_budget_tokens", "topk_blocks",
                                                         "kv_blocks_read_per_step", "kv_bytes_per_step")})
    row = build_row(spec, "sr-1", outcome)
    assert (row["topk_budget_tokens"], row["topk_blocks"], row["kv_blocks_read_per_step"]) == (10, 3, 3.0)
    assert row["kv_bytes_per_step"] == m["kv_bytes_per_step"]
    exact_row = build_row(spec, "sr-1", ok_outcome(spec))  # an older result without the keys: null columns
    assert exact_row["topk_blocks"] is None and exact_row["kv_bytes_per_step"] is None
