"""Which KV cache a run gets (from RunConfig.kv), and the KV side of its accounting.

- kv_offload none, no top-k budget (the default): `StaticKVCache`, the exact all-resident reference.
- kv_offload none, a top-k budget of k blocks (topk_blk k, or topk_tokens mapped to blocks): a paged
  cache with every block on the GPU (top-k needs block key summaries).
- kv_offload cpu|ssd and a kv_gpu_blocks budget below the blocks max_seq needs: a paged cache with a
  GPU ring of kv_gpu_blocks blocks per (row, layer) over a pinned-CPU or SSD tier. Without a budget
  (or one that covers max_seq) nothing is offloaded and the cache is the resident one.

Buffers are made once per (batch, max_seq) and reused by the next cache: a benchmark makes a cache per
generate round, and pinning gigabytes each round would cost more than the round. So one paged cache is
live at a time per engine; an older one refuses to attend.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import psutil
import torch

from worker.config import KVConfig
from worker.errors import UserError
from worker.kv.fetch import FetchCount
from worker.kv.layout import Geometry
from worker.kv.offload import CpuStore, KVMover, Throttle
from worker.kv.paged import PagedBuffers, PagedKVCache
from worker.kv.spill import SLOT_BYTES, SLOTS, SpillStore, check_spill_dir
from worker.kv.static import StaticKVCache
from worker.kv.topk import code_bytes, summary_bytes
from worker.kv.tracker import BlockTracker
from worker.model.geometry import ModelConfig
from worker.stream.devsync import Sync
from worker.stream.hostmem import HostArena
from worker.stream.iostats import Channel
from worker.units import GB

log = logging.getLogger(__name__)



def validate(kv: KVConfig, cfg: ModelConfig, batch: int, max_seq: int, item: int, spill_dir: Path | None) -> None:
    """Budgets that cannot work, as one-line UserErrors naming the field."""
    if kv.topk_blocks == 1:
        raise UserError("topk_blk=1 is too small: the first (sink) block and the block being written are always "
                        "kept; use 0 (exact) or >= 2")
    if kv.kv_offload == "none" and kv.kv_gpu_blocks is not None:
        raise UserError(f"kv_gpu_blocks={kv.kv_gpu_blocks} needs --kv-offload cpu or ssd: with kv_offload=none "
                        "every KV block stays on the GPU (unset kv_gpu_blocks or choose a tier)")
    if not offloads(kv, max_seq):
        return
    full = tier_bytes(kv, cfg, batch, max_seq, item)
    if kv.kv_offload == "cpu":
        avail = psutil.virtual_memory().available
        if full["cpu"] > avail:
            raise UserError(f"kv_offload=cpu needs {full['cpu'] / GB:.2f} GB of pinned host memory for batch_size="
                            f"{batch} x max_seq_len={max_seq}, only {avail / GB:.2f} GB are available; lower them "
                            "or use --kv-offload ssd")
    else:
        why = check_spill_dir(spill_dir, full["ssd"])
        if why:
            raise UserError(f"kv_offload=ssd has no usable spill location: {why}")


def offloads(kv: KVConfig, max_seq: int) -> bool:
    n_blocks = math.ceil(max_seq / kv.kv_block_tokens)
    return kv.kv_offload != "none" and kv.kv_gpu_blocks is not None and kv.kv_gpu_blocks < n_blocks


def tier_bytes(kv: KVConfig, cfg: ModelConfig, batch: int, max_seq: int, item: int) -> dict[str, int]:
    """Bytes each tier holds for a cache of (batch, max_seq): GPU (ring, key summaries, working buffers), pinned
    CPU and the SSD spill file."""
    geo = Geometry(batch, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, kv.kv_block_tokens, max_seq,
                   {2: torch.bfloat16, 4: torch.float32}.get(item, torch.bfloat16))
    j, bb, layers = geo.n_blocks, geo.block_bytes, geo.layers
    full = layers * batch * j * bb
    k = kv.topk_blocks
    if kv.kv_offload == "none" and not k:
        return {"gpu": layers * batch * max_seq * geo.token_bytes, "cpu": 0, "ssd": 0}
    off = offloads(kv, max_seq)
    ring = kv.kv_gpu_blocks if off else j
    js = min(k, j) if k else j
    ext = geo.padded_block_bytes() if kv.kv_offload == "ssd" else bb
    gpu = layers * batch * ring * bb + batch * j * bb  # ring + the exact path's working buffers
    gpu += layers * batch * j * summary_bytes(geo.kv_heads, geo.block_tokens, geo.head_dim, item, kv.topk_key_bits) if k else 0
    gpu += 2 * batch * js * ext if off else 0
    if not off:
        return {"gpu": gpu, "cpu": 0, "ssd": 0}
    if kv.kv_offload == "cpu":  # top-k reads the store in place (kv.zerocopy), else it stages on the host
        return {"gpu": gpu, "cpu": full + (0 if kv.kv_zero_copy else 2 * batch * k * bb), "ssd": 0}
    outbox = SLOTS * min(j, max(1, SLOT_BYTES // ext)) * ext
    return {"gpu": gpu, "cpu": 2 * batch * js * ext + batch * ring * ext + outbox, "ssd": layers * batch * j * ext}


class KVFactory:
    """`factory(batch, max_seq)` → a KV cache for the run's KVConfig; also its channels and byte counts."""

    def __init__(self, cfg: ModelConfig, kv: KVConfig, device: torch.device, dtype: torch.dtype, max_seq: int,
                 batch: int = 1, tracker: BlockTracker | None = None, spill_dir: str | os.PathLike | None = None,
                 compiled: bool = False):
        self.cfg, self.kv, self.device, self.dtype = cfg, kv, device, dtype
        self.compiled = compiled  # decode attention through torch.compile (worker.attention)
        self.item = torch.empty((), dtype=dtype).element_size()
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        validate(kv, cfg, batch, max_seq, self.item, self.spill_dir)
        self.max_seq, self.tracker = max_seq, tracker
        self.h2d, self.d2h, self.ssd = Channel("kv_h2d"), Channel("kv_d2h"), Channel("kv_ssd")
        self.throttle = Throttle(kv.kv_throttle_threshold, kv.kv_throttle_ms)
        self.fetched = FetchCount()  # blocks the decode steps fetched from the host tier
        self._key: tuple[int, int] | None = None
        self._bufs: PagedBuffers | None = None
        self._arena: HostArena | None = None
        self._store: Any = None
        self._live: PagedKVCache | None = None
        self._last: dict[str, int] = {"gpu": 0, "cpu": 0, "ssd": 0}  # tier bytes of the latest cache
        self._pinned = 0  # pinned bytes of the latest buffers (kept after close, for the run's record)

    def n_blocks(self, max_seq: int) -> int:
        return math.ceil(max_seq / self.kv.kv_block_tokens)

    def __call__(self, batch: int, max_seq: int):
        kv = self.kv
        if kv.kv_offload != "none" or kv.kv_gpu_blocks is not None or kv.topk_blocks:
            validate(kv, self.cfg, batch, max_seq, self.item, self.spill_dir)
        if not kv.topk_blocks and not offloads(kv, max_seq):
            cache = StaticKVCache(self.cfg, batch, max_seq, self.device, self.dtype, self.compiled)
            self._last = {"gpu": cache.nbytes(), "cpu": 0, "ssd": 0}
            return cache
        if self._live is not None:
            self._live.retired = True
        if self._key != (batch, max_seq):
            self._release()
            self._bufs = self._allocate(Geometry.of(self.cfg, batch, max_seq, kv.kv_block_tokens, self.dtype))
            self._key = (batch, max_seq)
        self._live = PagedKVCache(self._bufs, kv.topk_blocks, Sync(self.device), self.tracker, self.compiled,
                                  self.fetched)
        self._last = tier_bytes(kv, self.cfg, batch, max_seq, self.item)
        return self._live

    def _allocate(self, geo: Geometry) -> PagedBuffers:
        kv, dev, j, b = self.kv, self.device, geo.n_blocks, geo.batch
        off = offloads(kv, geo.max_seq)
        ring = kv.kv_gpu_blocks if off else j
        zeros = lambda *shape, dtype=geo.dtype: torch.zeros(shape, dtype=dtype, device=dev)  # noqa: E731
        try:
            bufs = PagedBuffers(
                geo, ring, [zeros(b, ring, *geo.block_shape) for _ in range(geo.layers)],
                zeros(b, geo.kv_heads, j * geo.block_tokens, geo.head_dim),
                zeros(b, geo.kv_heads, j * geo.block_tokens, geo.head_dim))
            if kv.topk_blocks:
                bufs.smin = [zeros(b, j, geo.kv_heads, geo.head_dim) for _ in range(geo.layers)]
                bufs.smax = [zeros(b, j, geo.kv_heads, geo.head_dim) for _ in range(geo.layers)]
                code = code_bytes(geo.head_dim, kv.topk_key_bits)
                bufs.scode = [zeros(b, j, geo.kv_heads, geo.block_tokens, code, dtype=torch.uint8)
                              for _ in range(geo.layers)]
            if off:
                self._tier(geo, bufs)
        except torch.cuda.OutOfMemoryError:
            need = tier_bytes(kv, self.cfg, b, geo.max_seq, self.item)["gpu"]
            raise UserError(f"the paged KV cache for batch {b} x max_seq {geo.max_seq} needs {need / GB:.2f} GB of GPU "
                            "memory and does not fit; lower kv_gpu_blocks, batch_size or max_seq_len") from None
        log.info("kv: paged cache, batch %d, %d blocks of %d tokens per row, %d on the GPU, offload %s, top-k %d",
                 b, j, geo.block_tokens, ring, kv.kv_offload if off else "none", kv.topk_blocks)
        return bufs

    def _tier(self, geo: Geometry, bufs: PagedBuffers) -> None:
        kv, dev, b, cuda, k = self.kv, self.device, geo.batch, self.device.type == "cuda", self.kv.topk_blocks
        js = min(k, geo.n_blocks) if k else geo.n_blocks
        self._arena = HostArena(pin=cuda)
        if kv.kv_offload == "cpu":
            self._store = CpuStore(geo, self._arena, k, dev, zero_copy=kv.kv_zero_copy)
        else:
            path = self.spill_dir / f".kv_spill.{os.getpid()}.{id(self)}.bin"
            self._store = SpillStore(geo, path, self._arena, js, bufs.ring_blocks, self.ssd)
        bufs.stage = [torch.zeros(b, js, self._store.ext, dtype=torch.uint8, device=dev) for _ in range(2)]
        if k:
            bufs.cand = [torch.full((b, k), -1, dtype=torch.long, device=dev) for _ in range(geo.layers)]
            if self._store.device_view is None:  # the ids go to the host, which gathers the blocks
                host = torch.full((geo.layers, b, k), -1, dtype=torch.long)
                bufs.cand_host = list(host.pin_memory() if cuda else host)
        bufs.mover = KVMover(self._store, geo, Sync(dev), self.throttle, self.h2d, self.d2h)
        self._pinned = self._arena.nbytes

    def _release(self) -> None:
        if self._bufs is not None and self._bufs.mover is not None:
            self._bufs.mover.close()
        if self._store is not None:
            self._store.close()
        if self._arena is not None:
            self._arena.close()
        self._bufs = self._store = self._arena = self._key = None

    # ---- accounting --------------------------------------------------------------------------------

    def drain(self) -> None:
        if self._bufs is not None and self._bufs.mover is not None:
            self._bufs.mover.drain()

    def reset_counters(self) -> None:
        self.drain()
        for ch in (self.h2d, self.d2h, self.ssd):
            ch.reset()
        self.fetched.reset()
        self.throttle.backoffs, self.throttle.waited_s = 0, 0.0

    def io_stats(self) -> dict[str, Any]:
        self.drain()
        return {
            "kv_h2d": self.h2d.stats(), "kv_d2h": self.d2h.stats(), "kv_ssd": self.ssd.stats(),
            "kv_bytes": dict(self._last),
            "kv_throttle": {"backoffs": self.throttle.backoffs, "waited_s": self.throttle.waited_s},
            "kv_pinned_bytes": self._pinned if self._last["cpu"] else 0,
            "kv_step": self.step_record(),
            "warnings": list(getattr(self._store, "warnings", [])),
        }

    def step_record(self) -> dict[str, Any]:
        """The top-k budget and what the decode steps fetched: the run JSON's `topk_*` / `kv_*_per_step`."""
        kv = self.kv
        geo = Geometry.of(self.cfg, 1, self.max_seq, kv.kv_block_tokens, self.dtype)
        return {"topk_budget_tokens": kv.topk_budget_tokens, "topk_blocks": kv.topk_blocks,
                **self.fetched.per_step(geo.layers, geo.block_bytes)}

    def step_bytes(self, batch: int, context: int) -> dict[str, int]:
        """Least bytes one decode step moves for the KV at `context` positions: read from HBM by the
        attention (and by top-k's scoring: every block's key summary), fetched H2D from the host tier
        (top-k: only its candidates, min(k, offloaded) blocks per row and layer, what
        `kv_bytes_per_step` counts), and read from / written to the SSD (spill)."""
        kv, k = self.kv, self.kv.topk_blocks
        geo = Geometry.of(self.cfg, batch, self.max_seq, kv.kv_block_tokens, self.dtype)
        blocks = math.ceil(context / kv.kv_block_tokens)
        exact = k == 0 or k >= blocks
        rows = batch * geo.layers
        out = {"hbm": rows * (context if exact else min(context, k * kv.kv_block_tokens)) * geo.token_bytes,
               "h2d": 0, "ssd": 0}
        if k:
            out["hbm"] += rows * blocks * summary_bytes(geo.kv_heads, geo.block_tokens, geo.head_dim, geo.item,
                                                      kv.topk_key_bits)
        if offloads(kv, self.max_seq):
            off = max(0, blocks - kv.kv_gpu_blocks)
            out["h2d"] = rows * (off if exact else min(k, off)) * geo.block_bytes
            if kv.kv_offload == "ssd":
                ext = geo.padded_block_bytes()
                out["ssd"] = out["h2d"] // geo.block_bytes * ext + rows * ext // kv.kv_block_tokens
        return out

    def close(self) -> None:
        self._release()


def merge_io(weights: dict[str, Any], kv: dict[str, Any]) -> dict[str, Any]:
    """The engine's io(): the weight streamer's channels plus the KV cache's."""
    out = dict(weights)
    out.update({k: v for k, v in kv.items() if k not in ("warnings", "kv_pinned_bytes")})
    if kv.get("kv_pinned_bytes"):
        out["pinned_host_bytes"] = (out.get("pinned_host_bytes") or 0) + kv["kv_pinned_bytes"]
    out["warnings"] = list(weights.get("warnings", [])) + list(kv.get("warnings", []))
    return out
