"""Where a streamed prefill loses time against its H2D floor: which stream is idle when.

Runs `bench run`'s own path in-process (cpu mode, 70B geometry, a long prompt, a GPU budget) once per
`--gpu-max-groups` value, with the CUDA timeline of the measured prefill recorded by torch.profiler.
From the timeline: the copy engine's busy time (the H2D memcpys), the compute stream's (every other
kernel), the time the copy engine sat idle while compute ran (a copy waiting for a slot the compute
still reads) and while both were idle (host or event latency), and the largest copy-idle gaps with
the kernels running in them. Next to it the run's own prefill attainment from its roofline.

    python benchmarks/prefill_profile.py --work /tmp/sbpf --layers 6 --groups 2 10
"""

from __future__ import annotations

import argparse
import collections
import logging
from pathlib import Path

import torch
from torch.autograd import DeviceType

from worker.run import resolve_config, run
from worker.units import GiB as GIB


def union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def length(spans) -> float:
    return sum(e - s for s, e in spans)


def intersect(a, b) -> list[tuple[float, float]]:
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if s < e:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def gaps(spans, lo: float, hi: float) -> list[tuple[float, float]]:
    out, t = [], lo
    for s, e in spans:
        if s > t:
            out.append((t, s))
        t = max(t, e)
    if hi > t:
        out.append((t, hi))
    return out


def timeline(prof) -> tuple[list, list, list]:
    """(copy spans, compute spans, compute kernels) in microseconds from a profile's CUDA events."""
    copies, kernels = [], []
    for ev in prof.events():
        if ev.device_type != DeviceType.CUDA:
            continue
        span = (ev.time_range.start, ev.time_range.end)
        (copies if "Memcpy HtoD" in ev.name else kernels).append((span, ev.name))
    return union([s for s, _ in copies]), union([s for s, n in kernels if "Memcpy" not in n]), kernels


def analyse(prof, top: int) -> dict:
    """The window is the compute's first to last kernel: the fetch thread goes on copying the next
    pass's first groups after the prefill, and those copies are not the prefill's."""
    copy, compute, kernels = timeline(prof)
    if not copy or not compute:
        return {}
    lo, hi = compute[0][0], compute[-1][1]
    copy = intersect(copy, [(lo, hi)])
    idle_copy = gaps(copy, lo, hi)
    busy_compute_in_idle = intersect(idle_copy, compute)
    both_idle = intersect(idle_copy, gaps(compute, lo, hi))
    biggest = sorted(idle_copy, key=lambda g: g[1] - g[0], reverse=True)[:top]
    described = []
    for s, e in sorted(biggest):
        inside = top_names(n for (ks, ke), n in kernels if ks < e and ke > s and "Memcpy" not in n)
        described.append((s - lo, e - s, inside))
    return {"window_ms": (hi - lo) / 1e3, "copy_busy_ms": length(copy) / 1e3, "compute_busy_ms": length(compute) / 1e3,
            "copy_idle_compute_busy_ms": length(busy_compute_in_idle) / 1e3,
            "both_idle_ms": length(both_idle) / 1e3, "gaps": described}


def top_names(names) -> str:
    c = collections.Counter(n[:48] for n in names)
    return ", ".join(f"{n} ×{k}" for n, k in c.most_common(3)) or "nothing"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/sbpf")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--preset", default="llama3.1-70b")
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--budget-gib", type=float, default=6.0)
    ap.add_argument("--groups", type=int, nargs="+", default=[2, 10], help="--gpu-max-groups values to compare")
    ap.add_argument("--top", type=int, default=6, help="largest copy-idle gaps to list")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from worker.host.probe import probe_host
    from worker.pack.cache import ensure_pack
    from worker.synth.checkpoints import make_model

    ckpt = Path(args.work) / f"{args.preset}-{args.layers}L"
    if not (ckpt / "config.json").exists():
        make_model(ckpt, preset=args.preset, layers=args.layers, dtype="bfloat16", seed=0)
    pack = ensure_pack(ckpt)
    pack.close()
    probe = probe_host(path=str(ckpt / ".streambench-pack"))
    print(f"{args.preset} geometry, {args.layers} layers, cpu mode, prompt {args.prompt_len}, "
          f"budget {args.budget_gib} GiB; "
          f"probe H2D {probe['h2d_gbps']:.2f} GB/s", flush=True)
    for groups in args.groups:
        cfg = resolve_config({"checkpoints": str(ckpt), "mode": "cpu", "temperature": 0, "batch_size": 1,
                              "max_seq_len": 4096, "warmup_rounds": 1, "prompt_len": args.prompt_len,
                              "max_new_tokens": 1, "gpu_max_groups": groups,
                              "gpu_memory_limit_gb": args.budget_gib * GIB / 1e9})
        act = torch.profiler.ProfilerActivity
        prof = torch.profiler.profile(activities=[act.CUDA if torch.cuda.is_available() else act.CPU])
        entered = []

        def phase(name: str) -> None:
            if name == "measure":  # the measured round: one prefill and the first token's sampling
                prof.__enter__()
                entered.append(True)

        try:
            result = run(cfg, phase)
        finally:
            if entered:
                prof.__exit__(None, None, None)
        roof = result["roofline"] or {}
        slots = result["metrics"]["gpu_slots"] or {}
        a = analyse(prof, args.top)
        print(f"\n--gpu-max-groups {groups}: slots attn {slots.get('attn')} + ffn {slots.get('ffn')}; "
              f"prefill {result['metrics']['prefill_ms']:.1f} ms, floor {roof.get('floor_prefill_s', 0) * 1e3:.1f} ms "
              f"({roof.get('bound_prefill')}), attainment {roof.get('attainment_prefill'):.2f}")
        if a:
            print(f"  GPU timeline {a['window_ms']:.1f} ms: H2D busy {a['copy_busy_ms']:.1f}, compute busy "
                  f"{a['compute_busy_ms']:.1f}; H2D idle while compute runs {a['copy_idle_compute_busy_ms']:.1f}, "
                  f"both idle {a['both_idle_ms']:.1f}")
            for at, dur, inside in a["gaps"]:
                print(f"  H2D idle at {at / 1e3:7.1f} ms for {dur / 1e3:5.1f} ms: {inside}")


if __name__ == "__main__":
    main()
