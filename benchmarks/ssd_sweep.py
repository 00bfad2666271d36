"""Sustained O_DIRECT read bandwidth of the SSD tier's reader per (threads, request size).

`bench probe` reports the best of short reads; the ssd mode reads the whole pack pass after pass.
This reads `--gb` of the file per configuration through `worker.stream.ssd.SSDReader` (the tier's
own reader) in `--extent-mb` extents split into chunk requests, each configuration from its own
region of the file, and prints GB/s of wall time.

    python benchmarks/ssd_sweep.py --path BLOB --gb 6
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from worker.stream.hostmem import HostArena
from worker.stream.ssd import SSDReader
from worker.units import MiB as MIB


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--path", required=True)
    ap.add_argument("--gb", type=float, default=6.0)
    ap.add_argument("--extent-mb", type=int, default=1408)  # about one 70B ffn group
    ap.add_argument("--configs", nargs="+", default=["1x1", "1x8", "2x8", "4x4", "4x16", "8x8", "8x64", "16x16"])
    args = ap.parse_args()
    size = os.path.getsize(args.path)
    ext = args.extent_mb * MIB
    arena = HostArena(pin=torch.cuda.is_available())  # the tier's own aligned (pinned on CUDA) buffers
    buf = arena.empty(2 * ext)
    offset = 0
    print(f"{args.path}: {size / 1e9:.1f} GB; {args.gb} GB per configuration in {args.extent_mb} MiB extents")
    for c in args.configs:
        threads, chunk_mb = (int(x) for x in c.split("x"))
        reader = SSDReader(args.path, threads, chunk_mb * MIB)
        n = int(args.gb * 1e9 // ext)
        t0 = time.perf_counter()
        pending = []
        for i in range(n):
            if offset + ext > size:
                offset = 0
            half = buf[(i % 2) * ext:(i % 2 + 1) * ext]
            pending.append(reader.read_split(offset, ext, half))
            offset += ext
            if len(pending) > 1:  # two extents in flight, like a staging double buffer
                for f in pending.pop(0):
                    f.result()
        for fs in pending:
            for f in fs:
                f.result()
        dt = time.perf_counter() - t0
        reader.close()
        gb = n * ext / 1e9
        print(f"  {threads:2d} threads x {chunk_mb:3d} MiB: {gb / dt:5.2f} GB/s  ({gb:.1f} GB in {dt:.1f} s)",
              flush=True)
    arena.close()


if __name__ == "__main__":
    main()
