"""Which stream idles when a streamed decode step misses its floor: compute against the weight copies.

Issue 17 asks, where a format's target is missed (int4 at batch 16 in `cpu` mode: 3.41x native
against 3.5x in `benchmarks/results/quant_h200/quant_fused.txt`), to say which stream is idle when.
`bench run` reports the step's time and its floor; this splits the step on the GPU. One engine per
weight format (the mode's placement under `--budget-gib`, as `benchmarks/quant_h200.py` runs it), a
prefill of `--prompt` random tokens per row outside the measurement, then `--steps` decode steps
through the engine's own streamed forward timed with CUDA events, and `--profile-steps` more under
torch.profiler. Printed per format: ms per step, then per CUDA stream the kernel and copy time per
step and the share of the step it was busy; the H2D bytes per step and their rate while the copy
stream was busy; the top kernels. A stream busy for ~1.0 of the step is the bound; the other's
share is how much of the step it waits. Then `--timeline-steps` more without the profiler, with
`host_timeline.py`'s record of both streamer threads (what each did while the copy stream idled), and
`--mark FILE` written at the 20th step, for a sampling profiler to attach to steady steps:

    python benchmarks/stream_profile.py --batch 16 --formats int4 --steps 500 --mark /tmp/mark &
    while [ ! -f /tmp/mark ]; do sleep 0.1; done; py-spy record --pid $! --duration 5 --rate 250 --threads \
        --idle --nonblocking --format raw -o spy.txt; python benchmarks/spy_frames.py spy.txt

    python benchmarks/stream_profile.py --work /tmp/sbsp --layers 2 --batch 16 --formats native int8 int4
    python benchmarks/stream_profile.py --work /tmp/sbsp-tiny --preset tiny --layers 2 --batch 2 --prompt 32 \\
        --formats native int4 --group-size 16   # CPU dry run (no streams: a CPU op table)
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import host_timeline  # noqa: E402
from settings import add_set_option  # noqa: E402  (beside this script)
from step_timing import time_and_profile  # noqa: E402

from worker.engine import build_engine  # noqa: E402
from worker.generate import kv_span  # noqa: E402
from worker.host.interp import quiet_interpreter  # noqa: E402
from worker.model.step import Step  # noqa: E402
from worker.pack.cache import ensure_pack  # noqa: E402
from worker.run import resolve_config  # noqa: E402
from worker.stream.streamer import WeightStreamer  # noqa: E402
from worker.synth.checkpoints import make_model  # noqa: E402


def chrome_trace(prof) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        return json.loads(Path(f.name).read_text())


def stream_split(trace: dict) -> tuple[dict[int, dict[str, float]], collections.Counter]:
    """Per CUDA stream: kernel and copy microseconds and H2D bytes (from the trace's events); per kernel name."""
    per: dict[int, dict[str, float]] = collections.defaultdict(lambda: {"kernel_us": 0.0, "copy_us": 0.0,
                                                                        "h2d_bytes": 0.0})
    names: collections.Counter = collections.Counter()
    for e in trace.get("traceEvents", []):
        cat, args = e.get("cat"), e.get("args", {})
        if cat not in ("kernel", "gpu_memcpy"):
            continue
        s = per[int(args.get("stream", -1))]
        dur = float(e.get("dur", 0))
        if cat == "kernel":
            s["kernel_us"] += dur
            names[e["name"][:90]] += dur
        else:
            s["copy_us"] += dur
            if "HtoD" in e.get("name", ""):
                s["h2d_bytes"] += float(args.get("bytes", 0) or 0)
    return per, names


GAP_US = 20.0  # idle spans of the copy stream shorter than this are launch jitter, not a stall


def _overlap(e: dict, a: float, b: float) -> float:
    return max(0.0, min(b, e["ts"] + e.get("dur", 0)) - max(a, e["ts"]))


def copy_gaps(trace: dict, top: int = 6) -> dict:
    """When the weight-copy stream idles between two H2D copies, why: the next copy's API call started
    after the previous copy had ended (`host_late`: the fetch thread issued it late), or before it (the
    copy waited on the device, for a slot's free event: `device_wait`). For each kind, the longest host
    calls on the issuing thread and the kernels on other streams during the idle spans say what held it.

    Why: a step's time minus its copy time says how much the copy stream idles, not when or why, and
    issue 17 asks which stream is idle when a format misses its target."""
    ev = trace.get("traceEvents", [])
    copies = sorted((e for e in ev if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "")),
                    key=lambda e: e["ts"])
    if not copies:
        return {}
    sid = collections.Counter(int(e["args"].get("stream", -1)) for e in copies).most_common(1)[0][0]
    copies = [e for e in copies if int(e["args"].get("stream", -1)) == sid]
    launch = {e["args"].get("correlation"): e for e in ev
              if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    host = [e for e in ev if e.get("cat") in ("cpu_op", "user_annotation", "cuda_runtime", "cuda_driver")
            and e.get("ph") == "X"]
    kernels = [e for e in ev if e.get("cat") == "kernel"]
    out = {"stream": sid, "copies": len(copies), "host_late_us": 0.0, "device_wait_us": 0.0, "spans": []}
    why: dict[str, dict[str, collections.Counter]] = {
        k: {"issuing_thread": collections.Counter(), "other_threads": collections.Counter(),
            "other_threads_runtime": collections.Counter(), "kernels": collections.Counter()}
        for k in ("host_late", "device_wait")}
    for prev, nxt in itertools.pairwise(copies):
        a, b = prev["ts"] + prev.get("dur", 0), nxt["ts"]
        if b - a < GAP_US:
            continue
        call = launch.get(nxt["args"].get("correlation"))
        kind = "host_late" if call is not None and call["ts"] > a else "device_wait"
        out[kind + "_us"] += b - a
        tid = call.get("tid") if call else None
        for e in host:
            us = _overlap(e, a, b)
            if us > 0:
                why[kind]["issuing_thread" if e.get("tid") == tid else "other_threads"][e["name"][:70]] += us
                if e.get("tid") != tid and e.get("cat") in ("cuda_runtime", "cuda_driver"):
                    why[kind]["other_threads_runtime"][e["name"][:70]] += us
        for e in kernels:
            us = _overlap(e, a, b)
            if us > 0:
                why[kind]["kernels"][e["name"][:70]] += us
        out["spans"].append({"start_us": a, "idle_us": b - a, "kind": kind,
                             "issued_after_us": (call["ts"] - a) if call else None})
    out["spans"] = sorted(out["spans"], key=lambda s: -s["idle_us"])[:top]
    out["why"] = {k: {part: c.most_common(top) for part, c in parts.items()} for k, parts in why.items()}
    return out


def profile_format(fmt: str, ckpt: Path, a, dev: torch.device) -> dict:
    cuda = dev.type == "cuda"
    flat = {"checkpoints": str(ckpt), "mode": a.mode, "batch_size": a.batch, "roofline": False,
            "max_seq_len": a.prompt + 2 + a.steps + a.profile_steps + a.timeline_steps + 1}
    if a.mode != "gpu" and cuda:
        flat["gpu_memory_limit_gb"] = round(a.budget_gib * 2**30 / 1e9, 3)
    if fmt != "native":
        flat.update(weight_format=fmt, quant_group_size=a.group_size)
    flat.update(a.set)  # run settings under test (the config validates them)
    cfg = resolve_config(flat)
    pack = ensure_pack(ckpt, weights=cfg.weights)
    engine = build_engine(cfg, pack, dev, prompt_tokens=a.prompt)
    try:
        b, n, cap = a.batch, a.prompt, cfg.max_seq_len
        cache = engine.new_cache(b, cap)
        ids = torch.randint(0, engine.cfg.vocab_size, (b, n), device=dev)
        engine.model.forward(ids, Step(torch.arange(n, device=dev).expand(b, n), n, (n,) * b), cache,
                             logits_at=torch.full((b,), n - 1, device=dev))
        tok = torch.full((b, 1), 5, device=dev)
        pos = torch.full((b,), n, device=dev)
        t = [0]

        def step() -> None:
            t[0] += 1
            if a.mark and t[0] == 20:  # a sampling profiler outside (py-spy) waits for this: compiles are done
                Path(a.mark).write_text(fmt)
            logits = engine.model.forward(tok, Step(pos[:, None], kv_span(n, t[0], cap)), cache)[:, 0]
            tok.copy_(logits.argmax(-1, keepdim=True))
            pos.add_(1)

        with quiet_interpreter(a.gc_freeze, a.switch_interval_us):
            ms, prof = time_and_profile(step, a.steps, a.profile_steps, cuda)
        out = {"format": fmt, "ms_per_step": ms, "profile_steps": a.profile_steps}
        if not cuda:
            out["table"] = prof.key_averages().table(sort_by="cpu_time_total", row_limit=10, max_name_column_width=60)
            return out
        if a.timeline_steps and isinstance(engine.weights, WeightStreamer):
            engine.reset_counters()
            keys = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")
            m0 = torch.cuda.memory_stats(dev)
            out["timeline"] = host_timeline.record(engine.weights, step, a.timeline_steps)
            m1 = torch.cuda.memory_stats(dev)
            out["allocator_events"] = {k: m1.get(k, 0) - m0.get(k, 0) for k in keys if k in m1}
            waits = (engine.io().get("weight_h2d") or {}).get("fetch_waits_s") or {}
            out["fetch_waits_ms_per_step"] = {k: v * 1e3 / a.timeline_steps for k, v in waits.items()}
        trace = chrome_trace(prof)
        per, names = stream_split(trace)
        k = a.profile_steps
        out["copy_gaps"] = copy_gaps(trace)
        out["streams"] = {sid: {"kernel_ms": s["kernel_us"] / k / 1e3, "copy_ms": s["copy_us"] / k / 1e3,
                                "h2d_gb": s["h2d_bytes"] / k / 1e9,
                                "busy": (s["kernel_us"] + s["copy_us"]) / k / 1e3 / ms}
                          for sid, s in per.items()}
        out["top_kernels_ms"] = [(name, us / k / 1e3) for name, us in names.most_common(10)]
        return out
    finally:
        engine.close()
        if cuda:
            torch.cuda.empty_cache()


def show(r: dict) -> None:
    head = f"{r['ms_per_step']:.3f} ms/step (CUDA events)" if r["ms_per_step"] else "CPU: untimed"
    print(f"\n== {r['format']}: {head}", flush=True)
    if "table" in r:
        print(r["table"])
        return
    for sid, s in sorted(r["streams"].items(), key=lambda kv: -kv[1]["busy"]):
        rate = f", H2D {s['h2d_gb']:.3f} GB/step at {s['h2d_gb'] / (s['copy_ms'] / 1e3):.1f} GB/s while copying" \
            if s["h2d_gb"] and s["copy_ms"] else ""
        print(f"  stream {sid:>3}: kernels {s['kernel_ms']:8.3f} ms, copies {s['copy_ms']:8.3f} ms per step: "
              f"busy {s['busy']:.2f} of the step{rate}")
    print("  top kernels (ms per step):")
    for name, ms in r["top_kernels_ms"]:
        print(f"    {ms:8.3f}  {name}")
    g, k = r.get("copy_gaps") or {}, r["profile_steps"]
    if g:
        print(f"  copy stream {g['stream']} idle between copies, per step: issued late by the host "
              f"{g['host_late_us'] / k / 1e3:.3f} ms, waiting on the device {g['device_wait_us'] / k / 1e3:.3f} ms")
        for kind, parts in g["why"].items():
            for part, rows in parts.items():
                if rows:
                    print(f"    {kind}, {part}: " + "; ".join(f"{n} {us / k / 1e3:.3f}" for n, us in rows))
        for sp in g["spans"]:
            after = "" if sp["issued_after_us"] is None else f", issued {sp['issued_after_us']:.0f} us after idle"
            print(f"    idle {sp['idle_us']:7.0f} us ({sp['kind']}{after})")
    if "timeline" in r:
        host_timeline.show(r["timeline"])
        w = r["fetch_waits_ms_per_step"]
        print("  fetch thread waits over those steps (ms per step): " + "; ".join(f"{k} {v:.3f}" for k, v in w.items()))
        print(f"  caching allocator over those steps: {r.get('allocator_events')}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/sbsp")
    ap.add_argument("--preset", default="llama3.1-70b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--mode", default="cpu", choices=["gpu", "cpu", "ssd", "mixed"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--budget-gib", type=float, default=14.0, help="GPU memory of a streaming mode (batch 16: 14)")
    ap.add_argument("--formats", nargs="+", default=["native", "int8", "int4"], choices=["native", "int8", "int4",
                                                                                           "fp8"])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8, help="decode steps timed with CUDA events")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--timeline-steps", type=int, default=4,
                    help="decode steps after the profiled ones with the host timeline (host_timeline.py); 0: none")
    ap.add_argument("--json", default=None)
    ap.add_argument("--mark", default=None, help="file written when a format's decode steps start (for py-spy)")
    ap.add_argument("--gc-freeze", action="store_true", help="as bench run --gc-freeze, around the timed steps")
    ap.add_argument("--switch-interval-us", type=int, default=None, help="as bench run --switch-interval-us")
    add_set_option(ap, "run settings for every format, e.g. h2d_group_backlog_max=3")
    a = ap.parse_args(argv)
    for name in ("batch", "prompt", "steps", "profile_steps", "layers"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    ckpt = Path(a.work) / f"{a.preset}-{a.layers}L"
    if not (ckpt / "config.json").exists():
        make_model(ckpt, preset=a.preset, layers=a.layers, dtype="bfloat16" if cuda else "float32")
    print(f"{a.preset}, {a.layers} layers, {a.mode} mode, batch {a.batch}, prompt {a.prompt}, budget "
          f"{a.budget_gib} GiB, on {dev}" + "".join(f", {k}={v}" for k, v in a.set)
          + (", gc frozen" if a.gc_freeze else "")
          + (f", switch interval {a.switch_interval_us} us" if a.switch_interval_us else ""), flush=True)
    rows = []
    for fmt in a.formats:
        rows.append(profile_format(fmt, ckpt, a, dev))
        show(rows[-1])
    base = next((r for r in rows if r["format"] == "native" and r["ms_per_step"]), None)
    if base:
        print("\n" + "  ".join(f"{r['format']} {base['ms_per_step'] / r['ms_per_step']:.2f}x native"
                               for r in rows if r["ms_per_step"]))
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
