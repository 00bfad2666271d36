"""Where one thread of a `py-spy record --threads --idle --format raw` profile spends its samples.

Why: py-spy samples without the interpreter lock and without pausing the process (`--nonblocking`),
so it sees the compute thread's time in calls the profiler's trace does not split (a host gather, a
blocking copy); `stream_profile.py --mark` says when its steady steps start, for py-spy to attach.
Printed: the share of the thread's samples per deepest frame under `--under` (the project's own code
by default), and per deepest Python frame of any file.

    python benchmarks/spy_frames.py spy16.txt --thread MainThread
"""

from __future__ import annotations

import argparse
import collections
import re


def shares(lines, thread: str, under: tuple[str, ...]) -> tuple[int, collections.Counter, collections.Counter]:
    ours: collections.Counter = collections.Counter()
    deepest: collections.Counter = collections.Counter()
    total = 0
    for line in lines:
        stack, _, n = line.rstrip("\n").rpartition(" ")
        frames = stack.split(";")
        if not frames or thread not in frames[0] or not n.isdigit():
            continue
        total += int(n)
        py = [f for f in frames[1:] if ".py:" in f]
        mine = [f for f in py if any(u in f for u in under)]
        ours[mine[-1] if mine else "(none of --under)"] += int(n)
        deepest[re.sub(r":\d+\)$", ")", py[-1]) if py else "(native only)"] += int(n)
    return total, ours, deepest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("raw")
    ap.add_argument("--thread", default="MainThread")
    ap.add_argument("--under", nargs="+", default=["worker/", "benchmarks/"])
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args(argv)
    with open(a.raw) as f:
        total, ours, deepest = shares(f, a.thread, tuple(a.under))
    print(f"{a.thread}: {total} samples")
    for title, c in (("deepest frame under " + " ".join(a.under), ours), ("deepest Python frame", deepest)):
        print(f"  {title}:")
        for k, v in c.most_common(a.top):
            print(f"    {v / max(total, 1):6.3f}  {k}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
