"""Where a run's wall time goes: its setup phases, the measured round, and the rest.

Every phase is timed once on the host clock (`time.perf_counter`) around the step that makes it, never
inside the measured round and with no device synchronization of its own: the rounds already end in
one (`worker.generate.generate`), and nothing else here needs the device to be idle. The phases of
`RunClock.report()` (the run JSON's `setup` section; the row's `setup_<phase>_s` columns) are:

- `process_s`: before `run()` was entered. For the first run of a process, from the process's start
  (`psutil.Process().create_time()`, the kernel's record, 10 ms resolution): the interpreter, the
  module-level imports (torch among them) and, in a Ray actor, the worker process's start (Ray may
  have started it before placing the actor there), the actor's start and the spec's model being
  made. For a later run of the same process (a reused Ray actor), from the end of the run
  before it, so that the wall times of one process's runs add up to its life and never count its
  start twice. `process_since` says which.
- `imports_s`: the imports `run()` makes itself (engine, pack cache, tokenizer; the peer's
  transformers and accelerate): paid by the first run of a process only.
- `tokenizer_s`: loading the checkpoint's tokenizer and making the batch's prompts.
- `pack_s`: finding, packing and checking the pack (`ensure_pack`, checksum verification included).
- `fill_s`, `fill_bytes`, `fill_gbps`: the CPU tier's load of its pinned layers (the streamer's
  `cpu_fill`); 0 s (bytes and rate null) where no layer is pinned in RAM. `fill_page_cache_bytes`:
  how many of those bytes the page cache held (read at memory speed, not the disk's).
- `slots_s`: the rest of the engine build: resident weights onto the device, GPU slot pool, reader
  and stager threads, the model (the peer: `from_pretrained` with its accelerate placement).
  `slots_parts` splits it by the build's own spans (`Spans`, host time on the build thread, so they
  add up to `slots_s`; `other` is what no span covers; 0 for a part the build did not have, null
  when the run built no engine of its own: a reused engine, the peer): `kv` (the KV cache), `reader` (SSD reader
  threads), `upload_issue` (issuing the device-resident groups' reads, after the fill),
  `ring`, `stager`, `slot_pool` (the GPU slots' allocation), `preload` (the first groups copied
  into the slots), `model`, `upload_wait` (after the model's build: waiting for the rest of those
  reads and their device copies, worker.stream.upload); and `upload`: that load's bytes, page-cache
  bytes, seconds until its reads were done, device-copy seconds, peak host bytes, and the seconds
  page-locking and mapping the embedding table kept on the host took (`embed_map_s`, on the
  load's thread) and whether the device reads it there (`embed_mapped`) (the copies overlap
  the reads, and the reads the ring's, stager's, slot pool's and model's set-up, so these are not
  parts of `slots_s`).
- `compile_s`: the first warm-up round, where torch.compile compiles (CUDA), kernels load and the
  allocators and streaming threads fill up; it is also one short round's work (`warmup_rounds_s`
  lists each warm-up round, so a later one shows what a round costs without the first-time work).
- `warmup_s`: the later warm-up rounds, and capturing the measured round's CUDA graphs.
- `accuracy_s`: `--accuracy-ref`'s comparison with the native weights, after the measured round
  (`worker.quant.accuracy`); 0 without it.
- `probe_s`: the host probe (a cached figure costs nothing) and the SSD windows next to the run
  (`worker.host.adjacent`).
- `close_s`: closing the engine (its threads joined, pinned memory released).
- `other_s`: the rest: device selection, waiting for the device lock (also `device_wait_s`), the
  result document.
- `measure_s`: the measured round; `wall_s`: all of the above, from `process_s`'s start to the result.

`overlapped` is work done on a thread of its own while the phases above ran, so in none of them and
not in `wall_s` (null where the run did not do it): `compile_prepare_s`, importing torch._dynamo and
Inductor and setting up the compile cache (worker.model.compile_cache.prepare_ahead), beside the
tokenizer, the pack, the fill and the resident upload; what the build still waited for it is in
`slots_parts.model_s`; `cpu_fill_s`, the CPU tier's fill where it ran behind the build and the warm-up
(`fill_behind`: then `fill_s` is only what the run waited for its end after the warm-up, and
`cpu_fill_s` and `fill_gbps` count from the fill's issue, its reads queued behind the resident load's,
to its end, so they are not the default fill's rate); `cuda_context_s`, making the device's CUDA context
beside the tokenizer and the pack (worker.host.cudactx; null on a CPU device). `bytecode` says whether this process keeps torch's bytecode under the cache
directory (worker.host.bytecode), which decides much of `process_s` and of the compiler's import.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil

from worker.host import bytecode
from worker.units import GB

PHASES = ("process", "imports", "tokenizer", "pack", "fill", "slots", "compile", "warmup", "accuracy", "probe",
          "close", "other")
# the engine build's spans, in build order (`slots_parts`); every run reports all of them, null where
# the run built no engine of its own (a reused engine, the peer)
SLOTS_PARTS = ("kv", "reader", "upload_issue", "ring", "stager", "upload_wait", "slot_pool", "preload", "model",
               "other")
OVERLAPPED = ("compile_prepare", "cpu_fill", "cuda_context")  # side-thread work (`overlapped`), in no phase
# worker.stream.upload's stats, and the streamer's mapping of the host-kept embedding table (worker.stream.host_table)
UPLOAD_KEYS = ("bytes", "page_cache_bytes", "read_s", "copy_s", "peak_host_bytes",
               "embed_map_s", "embed_mapped")
_last_end: float | None = None  # epoch seconds when the last run of this process reported


class Spans:
    """Named host-time spans of one step: `with spans("name"): ...` adds the block's seconds."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def log(self, logger, what: str) -> None:
        logger.debug("%s: %s", what, ", ".join(f"{k} {v:.3f} s" for k, v in self.seconds.items()))


class RunClock:
    """The host times of one run's phases, from `run()`'s entry to its result; `close()` when the run
    is over, whether it succeeded or raised (the next run's `process_s` starts there)."""

    def __init__(self) -> None:
        now_wall, self.t0 = time.time(), time.perf_counter()
        since = _last_end if _last_end is not None else psutil.Process().create_time()
        self.process_s = max(0.0, now_wall - since)
        self.process_since = "previous run" if _last_end is not None else "process start"
        self.seconds: dict[str, float] = {}
        self.rounds: list[float] = []  # host seconds of each generate round, warm-ups first
        self.warmups = 0
        self.fill: dict[str, Any] = {}
        self.slots_parts: dict[str, Any] = {**{f"{k}_s": None for k in SLOTS_PARTS}, "upload": dict.fromkeys(UPLOAD_KEYS)}
        self.overlapped_s: dict[str, float | None] = {f"{k}_s": None for k in OVERLAPPED}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the block's host time to phase `name`."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def rounds_of(self, one_round: Callable[[int], Any], warmups: int) -> Callable[[int], Any]:
        """`one_round` (worker.generate.measure's) timed: the first of `warmups` warm-up rounds is
        `compile`, the later ones `warmup`, the round after them `measure`."""
        self.warmups = warmups

        def timed(new_tokens: int) -> Any:
            i = len(self.rounds)
            name = "measure" if i >= warmups else "compile" if i == 0 else "warmup"
            t = time.perf_counter()
            try:
                return one_round(new_tokens)
            finally:
                self.rounds.append(time.perf_counter() - t)
                self.add(name, self.rounds[-1])
        return timed

    def cpu_fill(self, fill: dict[str, Any] | None) -> None:
        """The CPU tier's load {bytes, seconds}, timed inside the engine build: moved out of `slots`."""
        if fill and fill.get("seconds"):
            self.fill = fill
            self.add("fill", fill["seconds"])
            self.add("slots", -fill["seconds"])

    def fill_behind(self, fill: dict[str, Any] | None) -> None:
        """A CPU tier filled behind the build and the warm-up (`fill_behind`): its stats, and its own
        seconds as `overlapped.cpu_fill_s`; what the run still waited for it is the `fill` phase."""
        if fill:
            self.fill = fill
            self.overlapped("cpu_fill", fill.get("seconds"))

    def build_parts(self, spans: dict[str, float], upload: dict[str, Any] | None) -> None:
        """The engine build's spans (`Engine.build`): `slots_parts` of the report, the fill left out
        (it is a phase of its own) and `other` the part of `slots_s` no span covers."""
        assert set(spans) <= {*SLOTS_PARTS[:-1], "fill"}, f"a build span without a slots_parts name: {set(spans)}"
        parts = {f"{k}_s": spans.get(k, 0.0) for k in SLOTS_PARTS[:-1]}
        parts["other_s"] = max(0.0, self.seconds.get("slots", 0.0) - sum(parts.values()))
        self.slots_parts = {**parts, "upload": {k: (upload or {}).get(k) for k in UPLOAD_KEYS}}

    def overlapped(self, name: str, seconds: float | None) -> None:
        """Host seconds of side-thread work beside the phases (`overlapped`); None: not done by this run."""
        assert name in OVERLAPPED, f"not an overlapped part: {name}"
        self.overlapped_s[f"{name}_s"] = seconds

    def report(self) -> dict[str, Any]:
        """The run JSON's `setup` section, up to now."""
        inside = time.perf_counter() - self.t0
        measured = self.seconds.get("measure", 0.0)
        out = {f"{p}_s": max(0.0, self.seconds.get(p, 0.0)) for p in PHASES[1:-1]}
        out["other_s"] = max(0.0, inside - measured - sum(out.values()))
        fill_b, fill_s = self.fill.get("bytes"), self.fill.get("seconds")
        return {"process_s": self.process_s, **out, "measure_s": measured, "wall_s": self.process_s + inside,
                "fill_bytes": fill_b, "fill_gbps": fill_b / fill_s / GB if fill_b and fill_s else None,
                "fill_page_cache_bytes": self.fill.get("page_cache_bytes"),
                "process_since": self.process_since, "warmup_rounds_s": self.rounds[:self.warmups],
                "slots_parts": self.slots_parts, "overlapped": dict(self.overlapped_s),
                "bytecode": bytecode.state()}

    def close(self) -> None:
        global _last_end
        _last_end = time.time()
