"""Issue 13 item 2: how fast the CPU tier fills, against what its source delivers.

For the cpu mode's tier (every layer of the pack, or `--layers`) this measures, in one command:

- the source: the same extents read through `SSDReader` (threads × chunk, like
  benchmarks/ssd_sweep.py) into a small reused buffer, O_DIRECT; and buffered when the blob is in
  the page cache (memory speed), on the reader's `--threads` (the reference of the ratios, as in
  the first H200 run) and on `--cached-threads` (what the fill's page-cache reads now run on);
  and, warm, buffered into fresh memory (a 2 MiB-paged buffer per group, as the tier allocates,
  none registered): the page cache's rate for a fill's job, first-touch page faults included,
  printed as a second ratio beside the first;
- the old fill, rebuilt from public pieces: one buffer per group registered (`cudaHostRegister`)
  when allocated, then its reads issued, all awaited (worker.stream.cpu_tier before issue 13);
- the new fill (`worker.stream.fill.fill`): pageable buffers, every read issued at once, each
  256 MiB range registered once its reads are done. Variants, `+`-joined: `pinN` registers on N
  threads of their own (`pin0`: on the reader thread that completes the range, the engine's default;
  `pin1` is the fill before that); `huge` backs the buffers with transparent huge pages (MADV_HUGEPAGE); `memT` runs the
  page-cache reads on T threads (`mem8` with `--threads 8` is the fill before the page-cache pool;
  without `mem`, the engine's default: the CPUs this process may use, at most 32); `pop` reads the
  ranges the page cache lacks buffered as well (`--warm-page-cache`: cold, is that as fast as O_DIRECT?);
  `readM` caps a page-cache request (one system call) at M MiB (default: the engine's CACHED_READ);
  `busy` runs a pure-Python thread during the fill, as the compile-ahead import does in a run (each
  reader returning from a system call must win the GIL back from it); `sw` sets the switch interval
  the engine sets while that import runs (compile_cache.AHEAD_SWITCH_S);
- `mmap` (warm only, an experiment, not the engine's path): no copy at all. Each extent is mapped
  from the page cache (MAP_SHARED, PROT_READ, MAP_POPULATE) and registered read-only
  (cudaHostRegisterReadOnly), then one group is copied to the GPU from it and checked against the
  blob; prints the map and register seconds, or the error where the driver or kernel refuses.

Both cache states run by default: `cold` (the blob dropped from the page cache with
posix_fadvise, so every read is the disk's) and `warm` (read once buffered first, so the new fill
reads it at memory speed). It prints GB/s and each fill's ratio to the source of that state. On a
CPU-only host nothing is pinned, so the old and new fills differ only in allocation and order.

    python benchmarks/cpu_fill.py --work /tmp/sb70 --layers 6 [--repeats 2] [--variants pin1 pin1+huge mmap]
    python benchmarks/cpu_fill.py --manifest PACK/bfloat16.manifest.json      # an existing pack

`--work DIR --layers N` uses (or makes, then packs) DIR/llama3.1-70b-NL, the checkpoint
benchmarks/streaming_70b.py makes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from worker.model import compile_cache
from worker.pack.blob import Pack
from worker.pack.groups import KINDS, GroupKey
from worker.stream.fill import fill
from worker.stream.hostmem import HostArena
from worker.stream.ssd import SSDReader, default_cached_threads
from worker.units import MiB


def open_pack(args) -> Pack:
    if args.manifest:
        return Pack.open(args.manifest)
    from worker.pack.cache import ensure_pack
    from worker.synth.checkpoints import make_model

    ckpt = Path(args.work) / f"{args.preset}-{args.layers}L"
    if not (ckpt / "config.json").exists():
        make_model(ckpt, preset=args.preset, layers=args.layers, dtype="bfloat16", seed=0)
    return ensure_pack(ckpt)


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(fn) -> float:
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def source(pack: Pack, keys, reader: SSDReader, buffered: bool) -> float:
    """Seconds to read the extents with at most 2 × threads requests' worth of buffer (the page-cache
    pool's threads when buffered)."""
    slots = 2 * (reader.cached_threads if buffered else reader.threads)
    arena = HostArena(pin=torch.cuda.is_available())
    buf = arena.empty(slots * reader.chunk)  # registered (and faulted) before the clock starts
    try:
        def run() -> None:
            futures, j = [], 0
            for key in keys:
                g = pack.manifest.group(key.name)
                for o in range(0, g.nbytes, reader.chunk):
                    n = min(reader.chunk, g.nbytes - o)
                    s = (j % slots) * reader.chunk
                    futures.append(reader.read(g.offset + o, n, buf[s:s + n], buffered=buffered))
                    j += 1
            for f in futures:
                f.result()
        return timed(run)
    finally:
        arena.close()


def source_fresh(pack: Pack, keys, reader: SSDReader) -> float:
    """Seconds to read the extents buffered into memory touched for the first time, as the tier's fill
    must (one 2 MiB-paged buffer per group, as the engine allocates them, none registered): the page
    cache's rate for this job, its page faults included, where `source` reuses a faulted buffer. The
    reader's threads are started before the clock, as the fill starts them (started beside faulting
    readers they come up slowly: SSDReader.start_cached_threads)."""
    arena = HostArena(pin=False)
    bufs = {k: arena.empty(pack.manifest.group(k.name).nbytes, pin=False, huge_pages=True) for k in keys}
    reader.start_cached_threads()
    try:
        def run() -> None:
            futures = []
            for key in keys:
                g = pack.manifest.group(key.name)
                for o in range(0, g.nbytes, reader.chunk):
                    n = min(reader.chunk, g.nbytes - o)
                    futures.append(reader.read(g.offset + o, n, bufs[key][o:o + n], buffered=True))
            for f in futures:
                f.result()
        return timed(run)
    finally:
        arena.close()


def old_fill(pack: Pack, keys, reader: SSDReader) -> tuple[float, float]:
    """The fill before issue 13: register each group's buffer, then issue its reads; (seconds,
    seconds spent registering on the issuing thread)."""
    arena = HostArena(pin=True)
    pin_s = [0.0]
    try:
        def run() -> None:
            futures = []
            for key in keys:
                g = pack.manifest.group(key.name)
                t = time.perf_counter()
                buf = arena.empty(g.nbytes)
                pin_s[0] += time.perf_counter() - t
                futures += reader.read_split(g.offset, g.nbytes, buf)
            for f in futures:
                f.result()
        return timed(run), pin_s[0]
    finally:
        arena.close()


def parse_variant(variant: str) -> dict:
    """"pin2+huge+mem16+pop+read64+busy+sw" → {"pin_threads": 2, "huge_pages": True, "cached_threads": 16,
    "populate": True, "cached_read": 64 MiB, "busy": True, "switch": True}."""
    out = {"pin_threads": None, "huge_pages": False, "cached_threads": None, "populate": False, "cached_read": None,
           "busy": False, "switch": False}
    for part in variant.split("+"):
        if part.startswith("pin"):
            out["pin_threads"] = int(part.removeprefix("pin"))
        elif part == "huge":
            out["huge_pages"] = True
        elif part.startswith("mem"):
            out["cached_threads"] = int(part.removeprefix("mem") or default_cached_threads())
        elif part == "pop":
            out["populate"] = True
        elif part.startswith("read"):
            out["cached_read"] = int(part.removeprefix("read")) * MiB
        elif part == "busy":
            out["busy"] = True
        elif part == "sw":
            out["switch"] = True
        else:
            raise SystemExit(f"variant {variant!r}: unknown part {part!r} (pinN, huge, memT, pop, readM, busy, sw; "
                             "or mmap)")
    return out


def new_fill(pack: Pack, keys, reader: SSDReader, variant: str) -> dict:
    """`variant` (see parse_variant): the engine's fill with those settings, on a reader of its own
    when the variant sets the page-cache threads."""
    v = parse_variant(variant)
    own = SSDReader(pack.blob_path, reader.threads, reader.chunk, v["cached_threads"]) if v["cached_threads"] else None
    arena = HostArena(pin=True)
    stop = threading.Event()
    spinner = threading.Thread(target=busy, args=(stop,), daemon=True) if v["busy"] else None
    previous = sys.getswitchinterval()
    try:
        if v["switch"]:
            sys.setswitchinterval(min(previous, compile_cache.AHEAD_SWITCH_S))
        if spinner:
            spinner.start()
        filled = fill(pack.manifest, keys, arena, own or reader, pin_threads=v["pin_threads"],
                      huge_pages=v["huge_pages"], populate=v["populate"], cached_read=v["cached_read"])
        return filled.stats.to_dict()
    finally:
        stop.set()
        if spinner:
            spinner.join()
        sys.setswitchinterval(previous)
        arena.close()
        if own:
            own.close()


def busy(stop: threading.Event) -> None:
    """Pure Python that never blocks, holding the GIL as the compile-ahead import thread does during a
    run's fill: every reader thread returning from a system call then waits for the switch interval."""
    n = 0
    while not stop.is_set():
        n = (n * 31 + 7) % 1000003


def mmap_fill(pack: Pack, keys) -> dict:
    """The zero-copy experiment (module doc): seconds to map (populating from the page cache) and
    to register every extent, an H2D rate from one registered group and whether it equals the blob."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    cuda = torch.cuda.is_available()
    fd = os.open(pack.blob_path, os.O_RDONLY)
    maps, registered, out = [], [], {"error": None, "map_s": 0.0, "pin_s": 0.0, "h2d_gbps": None, "equal": None}
    try:
        t0 = time.perf_counter()
        for key in keys:
            g = pack.manifest.group(key.name)
            addr = libc.mmap(None, g.nbytes, mmap.PROT_READ, mmap.MAP_SHARED | mmap.MAP_POPULATE, fd, g.offset)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap of {key.name} failed")
            maps.append((addr, g.nbytes))
        out["map_s"] = time.perf_counter() - t0
        if cuda:
            t0 = time.perf_counter()
            for addr, n in maps:
                rc = int(torch.cuda.cudart().cudaHostRegister(addr, n, 8))  # 8: cudaHostRegisterReadOnly
                if rc != 0:
                    raise RuntimeError(f"cudaHostRegister(ReadOnly) of a file mapping: CUDA error {rc}")
                registered.append(addr)
            out["pin_s"] = time.perf_counter() - t0
        addr, n = maps[-1]
        host = torch.frombuffer((ctypes.c_ubyte * n).from_address(addr), dtype=torch.uint8)  # (n,) the mapping
        if cuda:
            dev = torch.empty(n, dtype=torch.uint8, device="cuda")
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dev.copy_(host, non_blocking=True)
            torch.cuda.synchronize()
            out["h2d_gbps"] = n / (time.perf_counter() - t0) / 1e9
            host = dev.cpu()
        out["equal"] = bool(torch.equal(host, pack.read_raw(keys[-1])))
    except (OSError, RuntimeError) as e:
        out["error"] = str(e)
    finally:
        for addr in registered:
            torch.cuda.cudart().cudaHostUnregister(addr)
        for addr, n in maps:
            libc.munmap(addr, n)
        os.close(fd)
    out["seconds"] = out["map_s"] + out["pin_s"]
    return out


LINE = "  {:40} {:6.2f} GB/s  {:5.2f} of the source  ({:.2f} GB in {:.2f} s){}"


def mmap_line(st: dict, nbytes: int, ref: float) -> str:
    if st["error"]:
        return f"  {'mmap: map + register read-only':40} failed: {st['error']}"
    h2d = f", H2D from it {st['h2d_gbps']:.1f} GB/s" if st["h2d_gbps"] else ""
    return (LINE.format("mmap: map + register read-only", nbytes / 1e9 / st["seconds"], ref / st["seconds"],
                        nbytes / 1e9, st["seconds"], f"; map {st['map_s']:.2f} s, register {st['pin_s']:.2f} s"
                        f"{h2d}, bytes equal the blob: {st['equal']}"))


def scenario(name: str, pack: Pack, keys, reader: SSDReader, narrow: SSDReader, nbytes: int, variants: list[str],
             repeats: int, old: bool = True) -> dict:
    """Rounds of source, old fill, new fill(s), each ratio against the source of its own round (a
    virtual disk's rate wanders by tens of percent over minutes): O_DIRECT when cold, buffered on
    `narrow` (the reader's own thread count) when warm."""
    blob = pack.blob_path
    if name == "cold":
        print("cold: the blob dropped from the page cache before each measurement")
    else:
        t = source(pack, keys, reader, buffered=True)  # the first buffered pass fills the cache
        cached = sum(reader.cached_bytes(pack.manifest.group(k.name).offset, pack.manifest.group(k.name).nbytes)
                     for k in keys)
        print(f"warm: the blob read once buffered first ({nbytes / 1e9 / t:.2f} GB/s); "
              f"{cached / 1e9:.2f} GB of the tier's extents now cached")
    reset = (lambda: drop_cache(blob)) if name == "cold" else (lambda: None)
    rounds = []
    for r in range(repeats):
        print(f" round {r + 1}")
        out: dict = {}
        if name == "warm":
            out["source_buffered_s"] = source(pack, keys, narrow, buffered=True)
            out["source_buffered_wide_s"] = source(pack, keys, reader, buffered=True)
            out["source_fresh_s"] = source_fresh(pack, keys, reader)
        reset()
        out["source_direct_s"] = source(pack, keys, reader, buffered=False)
        ref = out.get("source_buffered_s", out["source_direct_s"])
        for label, key in ((f"source: buffered, {narrow.cached_threads} thr", "source_buffered_s"),
                           (f"source: buffered, {reader.cached_threads} thr", "source_buffered_wide_s"),
                           (f"source: into fresh memory, {reader.cached_threads} thr", "source_fresh_s"),
                           ("source: O_DIRECT reads", "source_direct_s")):
            if key in out:
                print(LINE.format(label, nbytes / 1e9 / out[key], ref / out[key], nbytes / 1e9, out[key], ""))
        if old:
            reset()
            t, pin_s = old_fill(pack, keys, reader)
            out["old"] = {"seconds": t, "gbps": nbytes / t / 1e9, "of_source": ref / t, "pin_seconds": pin_s}
            print(LINE.format("old: register, then read", nbytes / 1e9 / t, ref / t, nbytes / 1e9, t,
                              f"; registering {pin_s:.2f} s"))
        for k in variants:
            reset()
            if k == "mmap":
                if name == "warm":
                    out["mmap"] = st = mmap_fill(pack, keys)
                    st["of_source"] = ref / st["seconds"] if st["seconds"] and not st["error"] else None
                    print(mmap_line(st, nbytes, ref))
                continue
            st = new_fill(pack, keys, reader, k)
            out[f"new_{k}"] = {**st, "of_source": ref / st["seconds"]}
            print(LINE.format(f"new: read, pin behind ({k})", st["gbps"], ref / st["seconds"], nbytes / 1e9,
                              st["seconds"], f"; registering {st['pin_seconds']:.2f} s, "
                                             f"{st['page_cache_bytes'] / 1e9:.2f} GB from the page cache"))
        rounds.append(out)
    fills = ["old"] * old + [f"new_{k}" for k in variants if k != "mmap"] + (["mmap"] if "mmap" in variants and name == "warm" else [])
    medians = {f: [r[f]["of_source"] for r in rounds if r[f].get("of_source") is not None] for f in fills}
    print(f" {name}, median over {repeats} round(s), fill / source: "
          + ", ".join(f"{f} {statistics.median(v):.2f}" if v else f"{f} -" for f, v in medians.items()), flush=True)
    if name == "warm":  # against the page cache read into fresh memory, as a fill must
        fresh = {f: [r["source_fresh_s"] / r[f]["seconds"] for r in rounds if r[f].get("seconds")] for f in fills}
        print(f" {name}, median over {repeats} round(s), fill / source into fresh memory: "
              + ", ".join(f"{f} {statistics.median(v):.2f}" if v else f"{f} -" for f, v in fresh.items()), flush=True)
    return {"rounds": rounds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", help="an existing pack's manifest; else one is made in --work")
    ap.add_argument("--work", default="/tmp/sb70")
    ap.add_argument("--preset", default="llama3.1-70b")
    ap.add_argument("--layers", type=int, default=6, help="layers of the checkpoint made in --work")
    ap.add_argument("--tier-layers", type=int, default=None, help="layers in the tier (default: all)")
    ap.add_argument("--threads", type=int, default=8, help="reader threads (the tier's ssd_readers)")
    ap.add_argument("--chunk-mb", type=int, default=64, help="request size (the tier's staging_mb)")
    ap.add_argument("--cached-threads", type=int, default=None,
                    help="page-cache reader threads of the default fill (default: the engine's, CPUs up to 32)")
    ap.add_argument("--variants", nargs="+", default=None,
                    help="new-fill variants, +-joined: pinN = N registering threads (pin0: the readers), "
                         "huge = MADV_HUGEPAGE "
                         "buffers, memT = T page-cache reader threads, pop = uncached ranges read buffered "
                         "(--warm-page-cache), readM = page-cache requests of up to M MiB, busy = a GIL-holding "
                         "thread during the fill, sw = the engine's switch interval under it; "
                         "mmap = the zero-copy experiment (default: pin1+memTHREADS "
                         "pin1+huge+memTHREADS, i.e. before the page-cache pool, then pin1+huge pin0+huge "
                         "pin0+huge+pop pin2+huge pin4+huge mmap)")
    ap.add_argument("--cache", choices=["both", "cold", "warm"], default="both")
    ap.add_argument("--repeats", type=int, default=2, help="rounds per cache state")
    ap.add_argument("--no-old", action="store_true", help="leave out the old fill (10-20x slower than the others)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    pack = open_pack(args)
    n = pack.manifest.model_config.num_hidden_layers
    keys = [GroupKey(i, k) for i in range(args.tier_layers or n) for k in KINDS]
    nbytes = sum(pack.manifest.group(k.name).nbytes for k in keys)
    reader = SSDReader(pack.blob_path, args.threads, args.chunk_mb * MiB, args.cached_threads)
    narrow = SSDReader(pack.blob_path, args.threads, args.chunk_mb * MiB, args.threads)  # the source's reference
    t = args.threads
    variants = args.variants or [f"pin1+mem{t}", f"pin1+huge+mem{t}", "pin1+huge", "pin0+huge", "pin0+huge+pop",
                                 "pin2+huge", "pin4+huge", "mmap"]
    pinned = "pinned with cudaHostRegister" if torch.cuda.is_available() else "not pinned (no CUDA)"
    print(f"{pack.blob_path}: {len(keys) // 2} layers, {len(keys)} groups, {nbytes / 1e9:.2f} GB; reader "
          f"{args.threads} threads x {args.chunk_mb} MiB, O_DIRECT {'yes' if reader.direct else 'REFUSED'}, "
          f"page-cache reads on {reader.cached_threads} threads; {pinned}", flush=True)
    results = {"bytes": nbytes, "threads": args.threads, "chunk_mb": args.chunk_mb, "cuda": torch.cuda.is_available(),
               "cached_threads": reader.cached_threads, "variants": variants}
    try:
        for name in (["cold", "warm"] if args.cache == "both" else [args.cache]):
            results[name] = scenario(name, pack, keys, reader, narrow, nbytes, variants, args.repeats,
                                     old=not args.no_old)
    finally:
        reader.close()
        narrow.close()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
