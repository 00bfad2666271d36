"""Where a CPU-tier fill's wall time goes, thread by thread, in a `bench run` process or in cpu_fill.py.

Why: alone (benchmarks/cpu_fill.py) the fill reads the page cache into fresh memory at the source's
rate, inside a fresh `bench run` process at about half of it, and neither the compiler's import
beside it nor the pinning thread explains all of the gap (setup_h200/v5). This says which of three
things it is: the reads themselves cost more CPU per byte there (page faults, the kernel's page
allocation: `/proc/vmstat`'s huge-page fallbacks and compaction say why), the readers wait while
they do not run (the GIL, a kernel lock: wall time over CPU time, voluntary context switches), or
the cores are busy with other work (the process's other threads, other processes, the hypervisor's
steal time in `/proc/stat`).

Every `read_extent` and `HostArena.pin` call is timed on its own thread (`perf_counter` and
`getrusage(RUSAGE_THREAD)` around it: a few microseconds on calls of milliseconds); every `fill()`
call is a window, from its entry to its `done`, with per-thread CPU (psutil), `/proc/stat` and
`/proc/vmstat` read at both ends. Python's bytecode cache is set up first, as `cli.py` does, so a
traced `bench run` imports torch and its compiler as a plain one does.

    python benchmarks/fill_trace.py --json $OUT/t.json cli -v WARNING run --checkpoints ... --mode cpu ...
    python benchmarks/fill_trace.py --json $OUT/t.json script benchmarks/cpu_fill.py --work /tmp/sbg ...

`--source-after` reads the last fill's extents from the page cache into fresh memory once the run is
over, in the same process (cpu_fill.py's `source_fresh`): what the source delivered to this process,
for the fill's ratio. Each TRACE line also gives the reads in flight per tenth of the fill and what
it did after its last read (registrations still queued: setup_h200/v7, U). `--json` keeps each
window's summary and its calls (kind, thread, start and end from the window's start, bytes).
`--set MODULE:NAME=JSON` changes a module constant for an A/B in one command
(`worker.model.compile_cache:AHEAD_HOLD_S=0`: the compiler's import beside the fill, as before v7);
`--late-context` leaves the CUDA context to the fill's first registration, `--context-first` makes it
before the run starts.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import itertools
import json
import os
import resource
import runpy
import sys
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from worker.host.bytecode import use_bytecode_cache  # before torch, as cli.py does

VMSTAT = ("pgfault", "thp_fault_alloc", "thp_fault_fallback", "compact_stall", "compact_fail", "pgmajfault",
          "numa_miss", "numa_foreign", "pgalloc_normal", "pgfree")
CALLS: list[tuple] = []  # (kind, thread, t0, t1, nbytes, utime, stime, minflt, nvcsw, nivcsw)
WINDOWS: list[dict] = []


def _ru() -> tuple[float, float, int, int, int]:
    r = resource.getrusage(resource.RUSAGE_THREAD)
    return r.ru_utime, r.ru_stime, r.ru_minflt, r.ru_nvcsw, r.ru_nivcsw


def _timed(kind: str, fn, nbytes_of):
    def traced(*args, **kwargs):
        a, t0 = _ru(), time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            t1, b = time.perf_counter(), _ru()
            CALLS.append((kind, threading.current_thread().name, t0, t1, nbytes_of(*args),
                          *(y - x for x, y in zip(a, b))))
    return traced


def _proc_stat() -> list[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]  # user nice system idle iowait irq softirq steal ...


def _vmstat() -> dict[str, int]:
    try:
        with open("/proc/vmstat") as f:
            pairs = (line.split() for line in f)
            return {k: int(v) for k, v in pairs if k in VMSTAT}
    except OSError:
        return {}


def _threads() -> dict[str, float]:
    """CPU seconds so far per thread name (native ids mapped through `threading`; unnamed ones by id)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    return {names.get(t.id, f"tid{t.id}"): t.user_time + t.system_time for t in psutil.Process().threads()}


def _snapshot(first: bool) -> dict:
    """The clock read next to the window's edge: last at its start, first at its end."""
    t = time.perf_counter()
    out = {"stat": _proc_stat(), "vm": _vmstat(), "threads": _threads()}
    return {**out, "t": t if not first else time.perf_counter()}


def _install() -> None:
    from worker.pack import blob

    blob.read_extent = _timed("read", blob.read_extent, lambda fd, off, n, *a, **k: n)
    import worker.stream.fill as fillmod
    from worker.stream.hostmem import HostArena

    HostArena.pin = _timed("pin", HostArena.pin, lambda self, view: view.numel())
    inner = fillmod.fill

    def fill(*args, **kwargs):
        manifest, keys, _, reader = args[:4]
        w = {"start": _snapshot(True), "source": (manifest, list(keys), reader.path, reader.threads, reader.chunk,
                                                  reader.cached_threads)}
        WINDOWS.append(w)
        out = inner(*args, **kwargs)
        w["returned"] = time.perf_counter()
        out.done.add_done_callback(lambda f: w.update(end=_snapshot(False), fill_s=out.stats.seconds))
        return out

    fillmod.fill = fill


def summarize(w: dict, calls: list[tuple]) -> dict:
    a, b = w["start"], w["end"]
    span = b["t"] - a["t"]
    inside = [c for c in calls if c[2] >= a["t"] and c[3] <= b["t"] + 1e-3]
    out: dict = {"span_s": span, "fill_s": w.get("fill_s")}
    for kind in ("read", "pin"):
        cs = [c for c in inside if c[0] == kind]
        wall = sum(c[3] - c[2] for c in cs)
        cpu = sum(c[5] + c[6] for c in cs)
        nbytes = sum(c[4] for c in cs)
        out[kind] = {"calls": len(cs), "bytes": nbytes, "wall_s": wall, "cpu_s": cpu,
                     "stime_s": sum(c[6] for c in cs), "minflt": sum(c[7] for c in cs),
                     "nvcsw": sum(c[8] for c in cs), "nivcsw": sum(c[9] for c in cs),
                     "threads": len({c[1] for c in cs}),
                     "first_start_s": min((c[2] for c in cs), default=a["t"]) - a["t"],
                     "last_end_s": max((c[3] for c in cs), default=a["t"]) - a["t"],
                     "gb_per_cpu_s": nbytes / cpu / 1e9 if cpu else None,
                     "concurrency": wall / span if span else None}
    out["read"]["in_flight_by_tenth"] = _profile([c for c in inside if c[0] == "read"], a["t"], span)
    last_read = a["t"] + out["read"]["last_end_s"]  # what the fill still did once its reads were over
    late = [c for c in inside if c[0] == "pin" and c[3] > last_read]
    out["pin"]["after_last_read"] = {"calls": len(late), "bytes": sum(c[4] for c in late),
                                     "seconds": max(0.0, span - out["read"]["last_end_s"]) if inside else 0.0}
    out["calls"] = [(c[0], c[1], round(c[2] - a["t"], 6), round(c[3] - a["t"], 6), c[4]) for c in inside]
    ds = [y - x for x, y in zip(a["stat"], b["stat"])]
    total = sum(ds[:8]) or 1
    ncpu = os.cpu_count() or 1
    out["system"] = {"busy_cores": (total - ds[3] - ds[4]) / total * ncpu, "iowait_cores": ds[4] / total * ncpu,
                     "steal_cores": ds[7] / total * ncpu if len(ds) > 7 else None, "cpus": ncpu}
    out["vmstat"] = {k: b["vm"].get(k, 0) - a["vm"].get(k, 0) for k in b["vm"]}
    cpu = {k: v - a["threads"].get(k, 0.0) for k, v in b["threads"].items()}
    groups: dict[str, float] = {}
    for name, s in cpu.items():
        g = name.rstrip("0123456789_")
        groups[g] = groups.get(g, 0.0) + s
    out["thread_cpu_s"] = {k: round(v, 3) for k, v in sorted(groups.items(), key=lambda kv: -kv[1]) if v >= 0.005}
    out["process_cores"] = sum(cpu.values()) / span if span else None
    return out


def _profile(calls: list[tuple], t0: float, span: float, parts: int = 10) -> list[float]:
    """Calls in flight on average in each tenth of the window: where the fill runs short of work
    (its start, its last wave) shows as a low tenth."""
    if span <= 0:
        return [0.0] * parts
    edges = [t0 + span * i / parts for i in range(parts + 1)]
    return [round(sum(max(0.0, min(c[3], hi) - max(c[2], lo)) for c in calls) / (hi - lo), 1)
            for lo, hi in itertools.pairwise(edges)]


def line(i: int, s: dict) -> str:
    r, p, sy = s["read"], s["pin"], s["system"]
    gb = r["bytes"] / 1e9
    return (f"fill {i}: {gb:.2f} GB in {s['span_s']:.3f} s ({gb / s['span_s']:.2f} GB/s; the fill's own clock "
            f"{s['fill_s'] or 0:.3f} s); reads {r['calls']} on "
            f"{r['threads']} thr: wall {r['wall_s']:.2f} s, cpu {r['cpu_s']:.2f} s (sys {r['stime_s']:.2f}), "
            f"{r['gb_per_cpu_s'] or 0:.2f} GB per cpu-s, in flight {r['concurrency'] or 0:.1f}, minflt {r['minflt']}, "
            f"vcsw {r['nvcsw']} ivcsw {r['nivcsw']}, last read {r['last_end_s']:.3f} s, in flight by tenth "
            f"{r.get('in_flight_by_tenth')}; pins {p['calls']}: wall "
            f"{p['wall_s']:.2f} s cpu {p['cpu_s']:.2f} s, last {p['last_end_s']:.3f} s, after the last read "
            f"{p['after_last_read']['calls']} ({p['after_last_read']['bytes'] / 2**20:.0f} MiB, the fill "
            f"{p['after_last_read']['seconds'] * 1e3:.1f} ms longer); system busy "
            f"{sy['busy_cores']:.1f}/{sy['cpus']} cores (steal {sy['steal_cores'] or 0:.2f}); process "
            f"{s['process_cores'] or 0:.1f} cores: {s['thread_cpu_s']}; vmstat {s['vmstat']}")


def source_after(w: dict) -> float:
    """GB/s of the fill's extents read from the page cache into fresh memory in this process after the run, as
    cpu_fill.py's `source_fresh` measures the source (nothing else running beside it by then)."""
    sys.path.insert(0, str(HERE))
    from types import SimpleNamespace

    from cpu_fill import source_fresh

    from worker.stream.ssd import SSDReader

    manifest, keys, blob, threads, chunk, cached_threads = w["source"]
    reader = SSDReader(blob, threads=threads, chunk=chunk, cached_threads=cached_threads)
    try:
        seconds = source_fresh(SimpleNamespace(manifest=manifest), keys, reader)
    finally:
        reader.close()
    return sum(manifest.group(k.name).nbytes for k in keys) / seconds / 1e9


def report(path: str | None) -> None:
    done = [w for w in WINDOWS if "end" in w]
    sums = [summarize(w, CALLS) for w in done]
    if done and "source_after_gbps" in done[-1]:
        gbps = sums[-1]["source_after_gbps"] = done[-1]["source_after_gbps"]
        fill = sums[-1]["read"]["bytes"] / sums[-1]["span_s"] / 1e9
        print(f"TRACE source after the run: {gbps:.2f} GB/s into fresh memory; the fill {fill:.2f} GB/s, "
              f"{fill / gbps:.2f} of it", file=sys.stderr, flush=True)
    for i, s in enumerate(sums):
        print("TRACE " + line(i, s), file=sys.stderr, flush=True)
    if path:
        Path(path).write_text(json.dumps(sums, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--context-first", action="store_true",
                    help="create the CUDA primary context before the run starts (is the first registration making it?)")
    ap.add_argument("--late-context", action="store_true",
                    help="the run makes no CUDA context early (worker.host.cudactx): its fill's first registration does")
    ap.add_argument("--source-after", action="store_true",
                    help="after the run, read the last fill's extents from the page cache into fresh memory (the source)")
    ap.add_argument("--set", action="append", default=[], metavar="MODULE:NAME=JSON",
                    help="set a module constant before the run, e.g. worker.stream.fill:SWITCH_INTERVAL_US=null")
    ap.add_argument("what", choices=["cli", "script"], help="cli: cli.py with the rest as its arguments; script: a file")
    ap.add_argument("rest", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    use_bytecode_cache()
    _install()
    atexit.register(report, args.json)
    for item in args.set:
        target, value = item.split("=", 1)
        module, name = target.split(":")
        mod = importlib.import_module(module)
        assert hasattr(mod, name), f"{module} has no {name}"
        setattr(mod, name, json.loads(value))
    if args.late_context:
        import torch

        import worker.run
        from worker.host.cudactx import EarlyContext

        worker.run.EarlyContext = lambda device: EarlyContext(torch.device("cpu"))  # makes nothing
    if args.context_first:
        import torch

        t0 = time.perf_counter()
        torch.cuda.init()
        torch.zeros(1, device="cuda")  # the primary context of the current device, as a registration would make it
        print(f"TRACE context created first: {time.perf_counter() - t0:.3f} s", file=sys.stderr, flush=True)
    try:
        if args.what == "script":
            sys.argv = args.rest
            runpy.run_path(args.rest[0], run_name="__main__")
        else:
            import cli

            sys.argv = ["cli.py", *args.rest]
            cli.main()
    finally:  # before the interpreter's shutdown, which takes no new reader threads
        done = [w for w in WINDOWS if "end" in w]
        if args.source_after and done:
            done[-1]["source_after_gbps"] = source_after(done[-1])


if __name__ == "__main__":
    main()
