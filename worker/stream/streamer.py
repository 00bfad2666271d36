"""The weight streamer: the model's `WeightSource` for the cpu, ssd and mixed modes.

The compute thread reads `wait(layer, kind) → compute → release(layer, kind)`. A fetch thread walks
the streamed groups in the same order, cyclically across passes, at most `lookahead` groups ahead:
acquire a GPU slot → make the copy stream wait for the slot's free event → copy the group's host
pieces (RAM, ring or staging) → record the ready event. `wait` makes the compute stream wait for
that event, so neither the compute nor the copies ever block on the device from the host; the host
only waits where data is genuinely not there yet (an SSD read in progress).
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

from worker.config import StreamConfig
from worker.host.walltime import Spans
from worker.pack.blob import group_views
from worker.pack.groups import KINDS, RESIDENT, GroupKey, fused
from worker.stream.cpu_tier import FixedTier, RingTier
from worker.stream.devsync import Sync
from worker.stream.gpu_tier import Slot, SlotPool, fillable, slot_counts, slots_text
from worker.stream.host_table import map_host_table
from worker.stream.hostmem import HostArena
from worker.stream.iostats import Channel, Waits
from worker.stream.plan import Placement, lookahead
from worker.stream.ssd import SSDReader
from worker.stream.staging import DirectStager
from worker.stream.upload import Upload, device_keys

log = logging.getLogger(__name__)


def device_bytes(groups, device: torch.device) -> int:
    """GPU memory the groups' tensors occupy on `device`: storages counted once, since a resident
    layer's tensors are views of one extent and the fused qkv / gate_up views overlap their parts.
    A `device` without an index ("cuda") matches every tensor of its type."""
    on = (lambda d: d == device) if device.index is not None else (lambda d: d.type == device.type)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for g in groups for t in g.values() if on(t.device)}
    return sum(storages.values())


def _with(stats: dict | None, **more) -> dict | None:
    return None if stats is None else {**stats, **{k: v for k, v in more.items() if v is not None}}


class WeightStreamer:
    def __init__(self, pack, placement: Placement, cfg: StreamConfig, device: torch.device, reserve_bytes: int = 0,
                 on_host_free: Callable[[], None] | None = None):
        self._on_host_free = on_host_free
        self.reader, self.providers, self.pool, self._thread = None, {}, None, None
        self._upload, self._upload_reader = None, None
        self.upload: dict | None = None  # the resident load's stats (worker.stream.upload), once finished
        try:
            self._build(pack, placement, cfg, device, reserve_bytes)
        except BaseException:
            self.close()  # unpin what was pinned, stop what was started
            raise

    def _build(self, pack, placement: Placement, cfg: StreamConfig, device: torch.device, reserve_bytes: int):
        self.pack, self.placement, self.cfg, self.device = pack, placement, cfg, device
        m = pack.manifest
        self.sync = Sync(device)
        self.order = placement.streamed()
        self.ahead = lookahead(cfg)
        self.arena = HostArena(pin=device.type == "cuda")
        self.h2d = Channel("weight_h2d")
        span = self.build_spans = Spans()  # the build's parts, for the run's setup (`slots_parts`)
        needs_ssd = any(h in ("ssd", "ring", "cpu") for h in placement.home)
        with span("reader"):
            self.reader = SSDReader(pack.blob_path, cfg.ssd_readers, cfg.staging_mb << 20) if needs_ssd else None
            reader = self.reader or SSDReader(pack.blob_path, cfg.ssd_readers, cfg.staging_mb << 20)
        self._upload_reader = reader if reader is not self.reader else None  # closed once the load is done
        if not cfg.fill_behind:
            self._fill_cpu_tier(m, placement, span)
        with span("upload_issue"):  # after the fill, which keeps the disk to itself; before the other buffers
            self._upload = Upload(pack, device_keys(placement.layers("gpu")), reader, device,
                                  populate=cfg.warm_page_cache, map_table=self._table_mapper(cfg, device))
        if cfg.fill_behind:  # its reads queue behind the resident load's, which the build waits for
            self._fill_cpu_tier(m, placement, span)
        self._add_ring_and_stager(m, placement, cfg, span)
        if self._upload.copies:  # placed behind the rest of the build (`finish`); its size is known now
            on_device = self._upload.device_bytes()
        else:  # on a CPU device the groups are views of the host buffers read: nothing to overlap
            self.finish()
            on_device = device_bytes(self._resident.values(), device)
        capacity = {k: max([m.group(g.name).nbytes for g in self.order if g.kind == k], default=0) for k in KINDS}
        counts = slot_counts(capacity, cfg, on_device + reserve_bytes)
        self.slots = counts  # GPU slots per group kind, as reported in io_stats()["gpu_slots"]
        with span("slot_pool"):
            self.pool = SlotPool(capacity, counts, device, cfg.evict_finished)
        self.ahead = min(self.ahead, sum(counts.values()) - 1)
        self._cond = threading.Condition()
        self._fetched: collections.deque[tuple[GroupKey, Slot]] = collections.deque()
        self._consumed = 0  # groups the compute has released
        self._issued = 0  # groups the fetch thread has published
        self._current: dict[GroupKey, Slot] = {}
        self._stop = False
        self._error: BaseException | None = None
        self._copy_stream = self.sync.stream()
        self._backlog: collections.deque = collections.deque()  # ready events of queued copies (fetch thread)
        self._waits = Waits("fetch", ("room", "slot", "backlog"))  # the fetch thread's (io_stats)
        self._preload = max(self.ahead, min(2 * cfg.warmup_layers, sum(counts.values()) - 1))
        self._fillable = fillable(self.order, counts)
        self._thread = threading.Thread(target=self._fetch_loop, name="h2d-fetch", daemon=True)
        with span("preload"):
            if self.order:
                self._thread.start()
                if not cfg.skip_preload_wait:
                    self._wait_preload()
        log.info("streamer: %d streamed groups, GPU slots %s (%.2f GB), lookahead %d, pinned %.2f GB",
                 len(self.order), slots_text(counts), self.pool.nbytes / 1e9, self.ahead, self.arena.nbytes / 1e9)

    def finish(self) -> None:
        """Wait for the device-resident groups (embeddings, norm, lm_head, GPU-cached layers), whose load
        the build started: the engine calls this after building the model, so the load overlaps that."""
        up, self._upload = self._upload, None
        if up is None:
            return
        try:
            self._resident = up.result()
        finally:
            self.upload = up.stats.to_dict()
            self._close_upload_reader()

    def _table_mapper(self, cfg: StreamConfig, device: torch.device):
        """What the load does to the embedding table it leaves on the host: map it into the device
        (`embed_zero_copy`, worker.stream.host_table), page-locked in this streamer's arena."""
        if not cfg.embed_zero_copy:
            return None
        return lambda table: map_host_table(table, self.arena, device)

    def _close_upload_reader(self) -> None:
        if self._upload_reader is not None:
            self._upload_reader.close()
            self._upload_reader = None

    def _fill_cpu_tier(self, m, placement: Placement, span: Spans) -> None:
        """The layers kept in RAM (a fixed subset), loaded now or, with `fill_behind`, being loaded behind
        the build and the warm-up (`settle_fill`): the run's `fill`."""
        self.cpu_fill: dict[str, Any] | None = None  # the CPU tier's load (FixedTier.fill_stats), for the run's setup
        if placement.layers("cpu"):
            with span("fill"):
                self.providers["cpu"] = FixedTier(m, placement.layers("cpu"), self.arena, self.reader,
                                                  populate=self.cfg.warm_page_cache, behind=self.cfg.fill_behind,
                                                  release=self._on_host_free)
            self.cpu_fill = None if self.cfg.fill_behind else self.providers["cpu"].fill_stats  # behind: settle_fill

    def settle_fill(self) -> dict[str, Any] | None:
        """Wait for a fill still running behind (`fill_behind`) and return its stats; None when there was
        none or it was settled before (a reused engine)."""
        tier = self.providers.get("cpu")
        if tier is None or not tier.behind or self.cpu_fill is not None:
            return None
        self.cpu_fill = tier.settle()
        return self.cpu_fill

    def _add_ring_and_stager(self, m, placement: Placement, cfg: StreamConfig, span: Spans) -> None:
        """The host side of the other streamed layers: the rolling ring, the SSD stager."""
        if placement.layers("ring"):
            with span("ring"):
                self.providers["ring"] = RingTier(m, placement.layers("ring"), placement.ring_slots, self.arena,
                                                  self.reader, cfg.cpu_ring_offset, cfg.cpu_wrap_around,
                                                  cfg.cpu_roll_stride, cfg.cpu_roll_sync)
        ssd_groups = [k for k in self.order if placement.home[k.layer] == "ssd"]
        if ssd_groups:
            with span("stager"):
                biggest = max(m.group(k.name).nbytes for k in ssd_groups)
                n_buf = max(2 * cfg.ssd_readers, -(-biggest // self.reader.chunk) + cfg.ssd_readers)
                self.providers["ssd"] = DirectStager(m, ssd_groups, self.reader, self.arena, n_buf)

    # ---- the compute side (model.forward) -------------------------------------------------------

    def resident(self) -> dict[str, torch.Tensor]:
        return self._resident[GroupKey(None, RESIDENT)]

    def wait(self, layer: int, kind: str) -> dict[str, torch.Tensor]:
        key = GroupKey(layer, kind)
        if key in self._resident:
            return self._resident[key]
        with self._cond:
            while not self._fetched:
                if self._error:
                    raise self._error
                self._cond.wait(timeout=0.5)
            got, slot = self._fetched.popleft()
        assert got == key, f"streamer out of order: compute wants {key}, next fetched is {got}"
        self.sync.wait(slot.ready_event)  # compute stream waits on the device, the host does not
        self._current[key] = slot
        return slot.views

    def release(self, layer: int, kind: str) -> None:
        key = GroupKey(layer, kind)
        if key in self._resident:
            return
        slot = self._current.pop(key)
        self.pool.release(slot, self.sync.record())
        ring = self.providers.get("ring")
        with self._cond:
            if ring is not None and kind == KINDS[-1]:
                ring.computed(layer, self._consumed // len(self.order))
            self._consumed += 1
            self._cond.notify_all()

    # ---- the fetch thread -----------------------------------------------------------------------

    def _fetch_loop(self) -> None:
        """The fetch thread: each streamed group in consumption order, cyclically across passes, waits
        for room ahead of the compute, takes a slot, is copied in unless the slot still holds it, and is
        handed to the compute side. An error is kept for `wait` to raise on the compute thread. Its waits
        are named profiler ranges (fetch.room / fetch.slot / fetch.backlog), so a trace shows which one
        held a copy back (benchmarks/stream_profile.py)."""
        try:
            if self.sync.cuda:
                torch.cuda.set_device(self.device)
            for n, key in enumerate(itertools.cycle(self.order)):
                with self._waits("room"):
                    if not self._wait_for_room(n):
                        return
                with self._waits("slot"):
                    slot, hit = self.pool.acquire(key)
                if not hit:
                    self._copy(key, slot)
                self._publish(key, slot)
        except BaseException as e:
            if self._stop:
                return  # a provider refused because the engine is closing
            log.exception("fetch thread failed")
            with self._cond:
                self._error = e
                self._cond.notify_all()

    def _ahead_limit(self) -> int:
        """Before the compute consumed its first group the fetch may run as far as the preload, so the
        warm-up layers land while the first forward is being set up; from then on `ahead` groups."""
        return self._preload if self._consumed == 0 else self.ahead

    def _wait_for_room(self, n: int) -> bool:
        """Block until the n-th fetched group is within the limit ahead of the compute; False once the
        streamer is closing."""
        with self._cond:
            while n - self._consumed > self._ahead_limit() and not self._stop:
                self._cond.wait(timeout=0.5)
            return not self._stop

    def _copy(self, key: GroupKey, slot: Slot) -> None:
        """Copy the group into its slot, then keep at most h2d_group_backlog_max group copies queued on
        the device: the host waits for the oldest, so it never runs far ahead of the copy engine."""
        self._copy_in(key, slot)
        self._backlog.append(slot.ready_event)
        with self._waits("backlog"):
            while len(self._backlog) > self.cfg.h2d_group_backlog_max:
                self._backlog.popleft().synchronize()

    def _publish(self, key: GroupKey, slot: Slot) -> None:
        """Hand the slot to the compute side; `wait` pops it in the same order."""
        with self._cond:
            self._fetched.append((key, slot))
            self._issued += 1
            self._cond.notify_all()

    def _copy_in(self, key: GroupKey, slot: Slot) -> None:
        home = self.placement.home[key.layer]
        with self.sync.use(self._copy_stream):
            self.sync.wait(slot.free_event, self._copy_stream)
            for piece in self.providers[home].pieces(key):
                piece.wait_ready()
                n = piece.host.numel()
                dst = slot.buf[piece.offset:piece.offset + n]
                if self.sync.cuda:
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    start.record(self._copy_stream)
                    dst.copy_(piece.host, non_blocking=True)
                    end.record(self._copy_stream)
                    self.h2d.add_device(n, start, end)
                    done = end
                else:
                    self.h2d.begin()
                    dst.copy_(piece.host)
                    self.h2d.end(n)
                    done = self.sync.event()
                if piece.on_copied:
                    piece.on_copied(done)
            slot.ready_event = done
        slot.views = self._views(key, slot.buf)

    def _views(self, key: GroupKey, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        return fused(group_views(self.pack.manifest, key.name, buf))

    def _wait_preload(self) -> None:
        target = min(2 * self.cfg.warmup_layers, self._preload + 1, self._fillable)
        if self.placement.ring_slots:
            target = min(target, 2 * self.placement.ring_slots)  # the ring refills only as the compute moves
        with self._cond:
            while self._issued < target and not self._error:
                self._cond.wait(timeout=0.5)
        for _, slot in list(self._fetched):
            slot.ready_event.synchronize()

    # ---- accounting and shutdown ----------------------------------------------------------------

    def reset_counters(self) -> None:
        self.h2d.reset()
        self._waits.reset()
        if self.reader:
            self.reader.channel.reset()

    def prefetched(self) -> dict[str, int]:
        """Bytes already fetched ahead of the compute (GPU slots, staged SSD reads, loaded ring slots):
        work a round starting now does not have to do, credited in its prefill floor."""
        m = self.pack.manifest
        with self._cond:
            keys = [k for k, _ in self._fetched]
        h2d = sum(m.group(k.name).nbytes for k in keys)
        ssd = sum(m.group(k.name).nbytes for k in keys if self.placement.home[k.layer] in ("ssd", "ring"))
        ssd += sum(getattr(p, "staged_bytes", lambda: 0)() for p in self.providers.values())
        return {"h2d": h2d, "ssd": ssd}

    def io_stats(self) -> dict[str, Any]:
        return {
            "ssd_read": self.reader.channel.stats() if self.reader else None,
            "weight_h2d": _with(self.h2d.stats(), fetch_waits_s=self._waits.stats() if self.order else None),
            "pinned_host_bytes": self.arena.nbytes,
            "gpu_slot_bytes": self.pool.nbytes,
            "gpu_slots": dict(self.slots),
            "cpu_fill": self.cpu_fill,  # the CPU tier's one-time fill
            "warnings": list(self.reader.warnings) if self.reader else [],
        }

    def close(self) -> None:
        if self._upload is not None:  # a build that failed, or a close before finish(): no read left in flight
            self._upload.close()
            self._upload = None
        self._close_upload_reader()
        if hasattr(self, "_cond"):
            with self._cond:
                self._stop = True
                self._cond.notify_all()
        if self.pool:
            self.pool.close()
        for p in self.providers.values():
            if hasattr(p, "close"):
                p.close()
        if self._thread and self._thread.is_alive():
            self._thread.join(timeout=5)
        if hasattr(self, "sync") and self.sync.cuda:
            torch.cuda.synchronize(self.device)
        if self.reader:
            self.reader.close()
            self.reader = None
        if hasattr(self, "arena"):
            self.arena.close()
