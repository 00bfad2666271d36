"""A CPU proxy of issue 14's host overhead: what the offloaded decode path costs the host per layer-step.

Runs the real engine (`worker.run.run`, in-process) on a tiny synthetic model on the CPU device, with
the KV cache offloaded to the CPU tier, for exact attention and for top-k. With tensors this small the
CPU time of a layer-step is mostly what a GPU run pays on the host whatever the tensor sizes: Python,
dispatch, thread handoffs and locks. Per run (exact, top-k):

1. the engine's host-time spans (`worker.host.timing`: kv.decode, kv.exact / kv.topk, kv.ready on the
   compute thread, kv.fetch on the KV worker or inline), µs per call, i.e. per layer-step, the best
   of a few runs (the machine may be shared): in wall time, and in CPU time of the thread that ran
   them (robust to other load, but blind to waits);
2. on the compute thread, in the KV cache's decode work per layer-step: the calls of the cache's device
   functions (`kv.kernels` and the decode attention: one compiled call each on CUDA) and the ATen
   ops dispatched outside them (an eager kernel launch or a host-side tensor op each on CUDA);
3. the same work under cProfile, on the compute thread and on the KV worker: function calls (Python
   and C, torch's included) per layer-step, and the functions called most.

The spans' µs on a CPU are not the GPU's (the device functions run here as eager CPU kernels, on
CUDA each is one compiled call), and on a shared machine they move with its load (printed): compare
a proxy run with another proxy run of the same load (the commit before a change and after it),
never with an H200 log. The counts do not depend on the load.

    python benchmarks/kv_host_overhead.py --work /tmp/sbkvhost
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import platform
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from worker.host import timing  # noqa: E402
from worker.kv import offload, paged  # noqa: E402
from worker.run import resolve_config, run  # noqa: E402

SPANS = ("kv.decode", "kv.exact", "kv.topk", "kv.ready", "kv.fetch", "kv.candidates")


def config(ckpt: Path, args, topk: bool) -> dict:
    flat = {"checkpoints": str(ckpt), "mode": "gpu", "device": "cpu", "prompt_len": args.prompt,
            "max_new_tokens": args.new_tokens, "max_seq_len": args.prompt + args.new_tokens + 16,
            "batch_size": args.batch, "kv_offload": "cpu", "kv_block_tokens": args.block_tokens,
            "kv_gpu_blocks": args.gpu_blocks, "temperature": 0, "warmup_rounds": 1, "roofline": False}
    if topk:
        flat["topk_tokens"] = args.topk_tokens
    return flat


class WorkerProfile:
    """cProfile on the KV worker thread: every job it runs (`KVMover._run`) is profiled while on (jobs
    the compute thread runs inline are in its own profile)."""

    def __init__(self) -> None:
        self.prof = cProfile.Profile()
        self.on = False
        self._real = offload.KVMover._run

    def __enter__(self):
        real, me = self._real, self

        def _run(mover, job):
            if not me.on or threading.current_thread() is threading.main_thread():
                return real(mover, job)  # an inline job: the compute thread's profile counts it
            me.prof.enable()
            try:
                return real(mover, job)
            finally:
                me.prof.disable()

        offload.KVMover._run = _run
        return self

    def __exit__(self, *exc):
        offload.KVMover._run = self._real
        return False


class OpCount(TorchDispatchMode):
    """ATen ops dispatched on the calling thread while active, outside the device functions (on CUDA
    each one is an eager kernel launch or a host-side tensor op)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


class DeviceFunctions:
    """The paged cache's device functions (`kv.kernels`, and the attention of `worker.attention`: the
    ones compiled on CUDA), wrapped to count calls; the ATen ops inside them are not `OpCount`'s."""

    def __init__(self) -> None:
        self.calls, self.on = 0, False
        self._real = (paged.kernels.kernels, paged.attention.kernels)

    def _wrap(self, fn):
        def counted(*args, **kw):
            if not self.on:
                return fn(*args, **kw)
            self.calls += 1
            with _disable_current_modes():  # the ops inside run in one compiled call on CUDA
                return fn(*args, **kw)
        return counted

    def __enter__(self):
        kernels, attention = self._real
        fns = kernels(False)
        ns = types.SimpleNamespace(**{n: self._wrap(f) for n, f in vars(fns).items()})
        attend, store = attention(False)
        pair = (self._wrap(attend), store)
        paged.kernels.kernels = lambda compiled: ns
        paged.attention.kernels = lambda compiled: pair
        return self

    def __exit__(self, *exc):
        paged.kernels.kernels, paged.attention.kernels = self._real
        return False


class ThreadClock:
    """The spans timed in CPU seconds of the thread that runs them (`time.thread_time`), not wall seconds:
    what a layer-step costs the host, whatever else the machine runs meanwhile (and without the waits:
    kv.ready then counts only its own work)."""

    def __enter__(self):
        self._real, timing.time = timing.time, types.SimpleNamespace(perf_counter=time.thread_time)
        return self

    def __exit__(self, *exc):
        timing.time = self._real
        return False


def spans_round(flat: dict, cpu_clock: bool = False) -> tuple[dict, dict]:
    """One run with the spans recording over its measured round → ({span: (µs per call, calls)}, result)."""
    with DeviceFunctions(), ThreadClock() if cpu_clock else contextlib.nullcontext(), timing.recording() as spans:
        def on_phase(name: str) -> None:
            if name == "measure":
                spans.reset()
        r = run(resolve_config(flat), on_phase)
    per = {s: (spans.seconds[s] / spans.calls[s] * 1e6, spans.calls[s]) for s in spans.calls}
    return per, r


def profile_round(flat: dict) -> tuple[dict, dict, dict]:
    """One run with cProfile over the KV cache's decode work of its measured round (`PagedKVCache.attend`
    of one token: what the kv.decode span times), compute thread and KV worker apart."""
    main = cProfile.Profile()
    with DeviceFunctions(), WorkerProfile() as worker:
        r = in_decode(flat, main.enable, main.disable, worker)
    return table(main), table(worker.prof), r


def ops_round(flat: dict) -> tuple[int, int, dict]:
    """One run counting, in the same decode work on the compute thread, the ATen ops outside the device
    functions and the calls of device functions → (ops, calls, result)."""
    ops = OpCount()
    with DeviceFunctions() as fns:
        def on() -> None:
            fns.on = True
            ops.__enter__()

        def off() -> None:
            ops.__exit__(None, None, None)
            fns.on = False

        r = in_decode(flat, on, off)
    return ops.n, fns.calls, r


def in_decode(flat: dict, on, off, worker: WorkerProfile | None = None) -> dict:
    """Run with on() / off() around every decode-step `PagedKVCache.attend` of the measured round."""
    measuring = [False]
    real_attend = paged.PagedKVCache.attend

    def attend(cache, layer, q, k, v, step):
        if not (measuring[0] and not step.is_prefill):
            return real_attend(cache, layer, q, k, v, step)
        if worker is not None:
            worker.on = True  # the KV worker's jobs from the first decode step on
        on()
        try:
            return real_attend(cache, layer, q, k, v, step)
        finally:
            off()

    def on_phase(name: str) -> None:
        measuring[0] = name == "measure"
        if worker is not None:
            worker.on = worker.on and measuring[0]

    paged.PagedKVCache.attend = attend
    try:
        return run(resolve_config(flat), on_phase)
    finally:
        paged.PagedKVCache.attend = real_attend


def table(prof: cProfile.Profile) -> dict:
    """A profile's {(file, line, function): (primitive calls, calls, own s, cumulative s, callers)}."""
    prof.create_stats()
    return prof.stats


def calls(stats: dict) -> int:
    return sum(nc for (_cc, nc, _tt, _ct, _callers) in stats.values())


def busiest(stats: dict, layer_steps: int, n: int) -> list[str]:
    rows = sorted(stats.items(), key=lambda kv: -kv[1][1])[:n]
    out = []
    for (file, line, name), (_cc, nc, tt, _ct, _callers) in rows:
        where = f"{Path(file).name}:{line}" if file != "~" else "~"
        out.append(f"      {nc / layer_steps:8.1f}  {tt / layer_steps * 1e6:8.1f} us  {name} ({where})")
    return out


def best(rounds) -> str:
    """The least µs per call of each span over rounds of {span: (µs per call, calls)}."""
    rounds = list(rounds)
    return ", ".join(f"{s} {min(p[s][0] for p in rounds):.0f}" for s in SPANS if s in rounds[0])


def measure(ckpt: Path, args, topk: bool) -> list[str]:
    flat = config(ckpt, args, topk)
    name = f"top-k {args.topk_tokens} tokens" if topk else "exact"
    rounds = [spans_round(flat) for _ in range(args.repeats)]
    cpu = [spans_round(flat, cpu_clock=True)[0] for _ in range(args.repeats)]
    m = rounds[0][1]["metrics"]
    assert rounds[0][0]["kv.decode"][1] == m["decode_steps"] * args.layers  # one kv.decode span per layer-step
    ms = min(x["metrics"]["decode_ms"] for _, x in rounds) / m["decode_steps"]
    head = (f"== {name}: {ms:.2f} ms/token on this CPU, {m['kv_blocks_read_per_step']:.1f} blocks read per "
            f"(row, layer) step, {m['kv_bytes_per_step'] / 1e6:.3f} MB KV per step")
    lines = [head, f"  host us per layer-step, wall (best of {args.repeats}): {best(p for p, _ in rounds)}",
             f"  host us per layer-step, CPU time of the thread (best of {args.repeats}): {best(cpu)}"]
    ops, fns, r3 = ops_round(flat)
    main, worker, r2 = profile_round(flat)
    ls2, ls3 = (x["metrics"]["decode_steps"] * args.layers for x in (r2, r3))
    lines.append(f"  per layer-step of the KV cache's decode work on the compute thread: {fns / ls3:.1f} device "
                 f"function calls (compiled on CUDA), {ops / ls3:.1f} ATen ops outside them (eager launches "
                 f"or host tensor ops on CUDA)")
    lines.append(f"  function calls per layer-step (cProfile, Python and C): {calls(main) / ls2:.0f} on the compute "
                 f"thread, {calls(worker) / ls2:.0f} on the KV worker")
    if args.top:
        lines.append("    compute thread, most called (calls and own time per layer-step, under cProfile):")
        lines += busiest(main, ls2, args.top)
        lines.append("    KV worker, most called:")
        lines += busiest(worker, ls2, args.top) or ["      (none: no job ran there)"]
    return lines


def commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/sbkvhost")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=33)
    ap.add_argument("--block-tokens", type=int, default=16)
    ap.add_argument("--gpu-blocks", type=int, default=8, help="KV blocks per (row, layer) kept on the device")
    ap.add_argument("--topk-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="float32", help="of the synthetic model (bf16 kernels are slow on a CPU)")
    ap.add_argument("--top", type=int, default=10, help="most called functions listed per thread")
    ap.add_argument("--repeats", type=int, default=3, help="span rounds per run; the best per span is shown")
    args = ap.parse_args()
    from worker.synth.checkpoints import make_model

    torch.set_num_threads(1)  # the host overhead, not how well tiny kernels spread over cores
    ckpt = Path(args.work) / f"tiny-{args.layers}L-{args.dtype}"
    if not (ckpt / "config.json").exists():
        make_model(ckpt, preset="tiny", layers=args.layers, dtype=args.dtype)
    print(f"commit {commit()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"1 thread; tiny {args.dtype} model, {args.layers} layers, batch {args.batch}, prompt {args.prompt}, "
          f"{args.new_tokens} new tokens, KV offloaded to the CPU tier, blocks of {args.block_tokens}, "
          f"{args.gpu_blocks} on the device; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
          flush=True)
    for topk in (False, True):
        print("\n".join(measure(ckpt, args, topk)), flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
