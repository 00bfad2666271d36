"""Issue 13 item 2: how fast the CPU tier fills, against what its source delivers.

For the cpu mode's tier (every layer of the pack, or `--layers`) this measures, in one command:

- the source: the same extents read through `SSDReader` (threads × chunk, like
  benchmarks/ssd_sweep.py) into a small reused buffer, O_DIRECT; and buffered when the blob is in
  the page cache (memory speed);
- the old fill, rebuilt from public pieces: one buffer per group registered (`cudaHostRegister`)
  when allocated, then its reads issued, all awaited (worker.stream.cpu_tier before issue 13);
- the new fill (`worker.stream.fill.fill`): pageable buffers, every read issued at once, each
  256 MiB range registered once its reads are done; variants register on several threads
  (`pin2`) or back the buffers with transparent huge pages (`pin1+huge`).

Both cache states run by default: `cold` (the blob dropped from the page cache with
posix_fadvise, so every read is the disk's) and `warm` (read once buffered first, so the new fill
reads it at memory speed). It prints GB/s and each fill's ratio to the source of that state. On a
CPU-only host nothing is pinned, so the old and new fills differ only in allocation and order.

    python benchmarks/cpu_fill.py --work /tmp/sb70 --layers 6 [--repeats 2] [--variants pin1 pin2 pin1+huge]
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
import time
from pathlib import Path

import torch

from worker.pack.blob import Pack
from worker.pack.groups import KINDS, GroupKey
from worker.stream.fill import fill
from worker.stream.hostmem import HostArena
from worker.stream.ssd import SSDReader
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
    """Seconds to read the extents with at most 2 × threads requests' worth of buffer."""
    slots = 2 * reader.threads
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


def new_fill(pack: Pack, keys, reader: SSDReader, variant: str) -> dict:
    """`variant`: "pinN" (N registering threads), "+huge" adds MADV_HUGEPAGE (e.g. "pin1+huge")."""
    threads = int(variant.split("+")[0].removeprefix("pin"))
    arena = HostArena(pin=True)
    try:
        filled = fill(pack.manifest, keys, arena, reader, pin_threads=threads, huge_pages="+huge" in variant)
        return filled.stats.to_dict()
    finally:
        arena.close()


LINE = "  {:34} {:6.2f} GB/s  {:5.2f} of the source  ({:.2f} GB in {:.2f} s){}"


def scenario(name: str, pack: Pack, keys, reader: SSDReader, nbytes: int, variants: list[str],
             repeats: int) -> dict:
    """Rounds of source, old fill, new fill(s), each ratio against the source of its own round (a
    virtual disk's rate wanders by tens of percent over minutes)."""
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
            out["source_buffered_s"] = source(pack, keys, reader, buffered=True)
        reset()
        out["source_direct_s"] = source(pack, keys, reader, buffered=False)
        ref = out.get("source_buffered_s", out["source_direct_s"])
        for label, key in (("source: buffered reads", "source_buffered_s"),
                           ("source: O_DIRECT reads", "source_direct_s")):
            if key in out:
                print(LINE.format(label, nbytes / 1e9 / out[key], ref / out[key], nbytes / 1e9, out[key], ""))
        reset()
        t, pin_s = old_fill(pack, keys, reader)
        out["old"] = {"seconds": t, "gbps": nbytes / t / 1e9, "of_source": ref / t, "pin_seconds": pin_s}
        print(LINE.format("old: register, then read", nbytes / 1e9 / t, ref / t, nbytes / 1e9, t,
                          f"; registering {pin_s:.2f} s"))
        for k in variants:
            reset()
            st = new_fill(pack, keys, reader, k)
            out[f"new_{k}"] = {**st, "of_source": ref / st["seconds"]}
            print(LINE.format(f"new: read, pin behind ({k})", st["gbps"], ref / st["seconds"], nbytes / 1e9,
                              st["seconds"], f"; registering {st['pin_seconds']:.2f} s, "
                                             f"{st['page_cache_bytes'] / 1e9:.2f} GB from the page cache"))
        rounds.append(out)
    fills = ["old"] + [f"new_{k}" for k in variants]
    print(f" {name}, median over {repeats} round(s), fill / source: "
          + ", ".join(f"{f} {statistics.median(r[f]['of_source'] for r in rounds):.2f}" for f in fills), flush=True)
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
    ap.add_argument("--variants", nargs="+", default=["pin1", "pin2", "pin1+huge"],
                    help="new-fill variants: pinN = N registering threads, +huge = MADV_HUGEPAGE buffers")
    ap.add_argument("--cache", choices=["both", "cold", "warm"], default="both")
    ap.add_argument("--repeats", type=int, default=2, help="rounds per cache state")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    pack = open_pack(args)
    n = pack.manifest.model_config.num_hidden_layers
    keys = [GroupKey(i, k) for i in range(args.tier_layers or n) for k in KINDS]
    nbytes = sum(pack.manifest.group(k.name).nbytes for k in keys)
    reader = SSDReader(pack.blob_path, args.threads, args.chunk_mb * MiB)
    pinned = "pinned with cudaHostRegister" if torch.cuda.is_available() else "not pinned (no CUDA)"
    print(f"{pack.blob_path}: {len(keys) // 2} layers, {len(keys)} groups, {nbytes / 1e9:.2f} GB; reader "
          f"{args.threads} threads x {args.chunk_mb} MiB, O_DIRECT {'yes' if reader.direct else 'REFUSED'}; "
          f"{pinned}", flush=True)
    results = {"bytes": nbytes, "threads": args.threads, "chunk_mb": args.chunk_mb, "cuda": torch.cuda.is_available()}
    try:
        for name in (["cold", "warm"] if args.cache == "both" else [args.cache]):
            results[name] = scenario(name, pack, keys, reader, nbytes, args.variants, args.repeats)
    finally:
        reader.close()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
