"""What the GPU benchmark scripts promise about their own output, checked without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]


def _quant_h200():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quant_h200

    return quant_h200


def _run_json(ms_per_step: float, tokens: list[int]) -> dict:
    return {"metrics": {"decode_ms": ms_per_step * 4, "decode_steps": 4}, "outputs": [{"token_ids": tokens}],
            "roofline": {"attainment_decode": 0.95, "bound_decode": "h2d"}, "model": {"weight_bytes": 10**9}}


def test_quant_h200_saves_a_whole_table_and_tarball_after_each_run(tmp_path):
    """A call cut by its time limit keeps every finished run: `save` (called after each run) writes the
    table of the runs so far and replaces the tarball whole (never a half-written one under its name)."""
    q = _quant_h200()
    runs = tmp_path / "runs"
    runs.mkdir()
    a = SimpleNamespace(preset="tiny", layers=2, prompt_len=8, new_tokens=4, budget_gib=6.0, group_size=16,
                        out=str(tmp_path / "q.tar.gz"), run_flags="", runs="runs")
    (runs / "native-gpu-b1.json").write_text(json.dumps(_run_json(2.0, [1, 2])))
    (runs / "native-cpu-b1.json").write_text(json.dumps(_run_json(8.0, [1, 2])))
    q.save(runs, a, 0.0)
    rows = lambda text: [ln.split() for ln in text.splitlines() if ln.startswith(("native ", "int4 "))]  # noqa: E731
    first = (runs / "table.txt").read_text()
    assert [r[:4] for r in rows(first)] == [["native", "gpu", "1", "2.00"], ["native", "cpu", "1", "8.00"]]
    (runs / "int4-cpu-b1.json").write_text(json.dumps(_run_json(2.0, [1, 3])))  # the next run lands
    q.save(runs, a, 0.0)
    table = (runs / "table.txt").read_text()
    int4 = rows(table)[-1]
    assert int4[:5] == ["int4", "cpu", "1", "2.00", "4.00x"] and int4[-1] == "—"  # no int4 gpu run to compare yet
    with tarfile.open(a.out) as tar:
        names = set(tar.getnames())
    assert {"runs/native-gpu-b1.json", "runs/native-cpu-b1.json", "runs/int4-cpu-b1.json", "runs/table.txt"} <= names
    assert not Path(f"{a.out}.part").exists()


def test_quant_h200_repeats_disk_points_in_alternating_rounds():
    """--repeats: every point once, then the ssd/mixed points again, each round in the opposite order,
    the gpu references and the peer not repeated."""
    q = _quant_h200()
    a = SimpleNamespace(only=["native", "int8", "peer"], batches=[1], modes=["gpu", "ssd"], repeats=3,
                        repeat_modes=["ssd", "mixed"])
    got = [q.run_name(*r) for r in q.plan(a)]
    assert got == ["native-gpu-b1", "native-ssd-b1", "int8-gpu-b1", "int8-ssd-b1", "peer-cpu-b1",
                   "int8-ssd-b1-r1", "native-ssd-b1-r1", "native-ssd-b1-r2", "int8-ssd-b1-r2"]
    a.repeats = 1
    assert [q.run_name(*r) for r in q.plan(a)] == got[:5]


def test_quant_h200_compares_repeats_within_a_round(tmp_path):
    """A repeated point shows its median and its range, and `vs native` is the median of the rounds'
    own ratios: a round on a slow disk slows both formats and must not count as the format's."""
    q = _quant_h200()
    runs = tmp_path / "runs"
    runs.mkdir()
    # round 0 on a fast disk, rounds 1 and 2 slower: int8 is 2x native within every round
    for rep, native_ms, int8_ms in ((0, 100.0, 50.0), (1, 200.0, 100.0), (2, 160.0, 80.0)):
        tail = f"-r{rep}" if rep else ""
        (runs / f"native-ssd-b1{tail}.json").write_text(json.dumps(_run_json(native_ms, [1, 2])))
        (runs / f"int8-ssd-b1{tail}.json").write_text(json.dumps(_run_json(int8_ms, [1, 2])))
    (runs / "int8-gpu-b1.json").write_text(json.dumps(_run_json(1.0, [1, 2])))
    table = q.report(runs)
    int8 = next(ln.split() for ln in table.splitlines() if ln.startswith("int8    ssd"))
    assert int8[3] == "80.00" and int8[4] == "2.00x"  # median ms; the median of the medians' ratio would be 2.0 too
    assert int8[-2:] == ["3", "50.0-100.0"] and int8[-3:-5:-1] == ["—", "—"] and int8[-5] == "True"  # no io: no disk
    (runs / "int8-ssd-b1-r2.json").write_text(json.dumps(_run_json(40.0, [1, 2])))  # round 2: 4x on one disk
    int8 = next(ln.split() for ln in q.report(runs).splitlines() if ln.startswith("int8    ssd"))
    assert int8[4] == "2.00x"  # rounds' ratios 2, 2, 4: median 2 (the medians' ratio would be 160/50 = 3.2)
    doc = _run_json(50.0, [1, 2])
    doc["io"] = {"ssd_read": {"bytes": 10, "busy_s": 1.0, "gbps": 1.5, "mean_inflight": 7.6}}
    (runs / "int8-ssd-b1.json").write_text(json.dumps(doc))  # round 0 read 1.5 GB/s, 7.6 reads in flight
    int8 = next(ln.split() for ln in q.report(runs).splitlines() if ln.startswith("int8    ssd"))
    assert int8[-4:-2] == ["1.500", "7.6"]  # the rounds without io do not count


def test_setup_ab_lists_the_slowest_imports_from_importtime():
    """`-X importtime` lines (`self | cumulative | name`, nesting by indent): the slowest shallow ones,
    slowest first, in seconds; deep imports and other stderr lines are left out."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import setup_ab

    err = "\n".join([
        "import time: self [us] | cumulative | imported package",
        "import time:       100 |        100 |     torch._C._deep.inner",
        "import time:      2000 |    1800000 |   torch",
        "import time:       500 |     250000 | worker.run",
        "import time:        10 |     900000 |         torch._very.deep",
        "WARNING something else on stderr",
        "import time:        30 |      60000 | click",
    ])
    got = setup_ab.slowest_imports(err, top=2)
    assert got == [("torch", 1.8), ("worker.run", 0.25)]


def _stream_profile():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import stream_profile

    return stream_profile


def test_copy_gaps_tells_a_late_issue_from_a_device_wait():
    """Three copies on stream 7: the second was issued 300 us after the first ended while the fetch
    thread sat in an event sync (host late); the third was issued early and started 500 us after the
    second ended, while a kernel ran (device wait)."""
    def x(cat, name, ts, dur, **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": args.pop("tid", 1), "args": args}

    trace = {"traceEvents": [
        x("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 0, 1000, stream=7, correlation=1),
        x("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 1400, 1000, stream=7, correlation=2),
        x("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 2900, 1000, stream=7, correlation=3),
        x("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 2905, 10, stream=9, correlation=4),  # another stream
        x("cuda_runtime", "cudaMemcpyAsync", -5, 4, correlation=1, tid=2),
        x("cuda_runtime", "cudaEventSynchronize", 900, 400, tid=2),
        x("cuda_runtime", "cudaMemcpyAsync", 1300, 5, correlation=2, tid=2),
        x("cuda_runtime", "cudaMemcpyAsync", 1350, 5, correlation=3, tid=2),
        x("cpu_op", "aten::mm", 1000, 200, tid=1),
        x("kernel", "int4_tile_kernel", 2400, 500, stream=3, correlation=9),
    ]}
    g = _stream_profile().copy_gaps(trace)
    assert g["stream"] == 7 and g["copies"] == 3
    assert g["host_late_us"] == 400 and g["device_wait_us"] == 500
    assert g["why"]["host_late"]["issuing_thread"][0] == ("cudaEventSynchronize", 300)
    assert ("aten::mm", 200) in g["why"]["host_late"]["other_threads"]
    assert g["why"]["device_wait"]["kernels"] == [("int4_tile_kernel", 500)]
    assert [s["kind"] for s in g["spans"]] == ["device_wait", "host_late"]
    assert g["spans"][1]["issued_after_us"] == 300


def test_set_wants_key_equals_value_and_reads_the_value_as_yaml():
    """stream_profile.py and reuse_h200.py share this parser."""
    import argparse

    import pytest

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import settings

    assert settings.setting("h2d_group_backlog_max=3") == ("h2d_group_backlog_max", 3)
    assert settings.setting("warm_page_cache=true") == ("warm_page_cache", True)
    for bad in ("h2d_group_backlog_max", "=3"):
        with pytest.raises(argparse.ArgumentTypeError):
            settings.setting(bad)
    p = argparse.ArgumentParser()
    settings.add_set_option(p, "x")
    assert p.parse_args(["--set", "a=1", "b=x"]).set == [("a", 1), ("b", "x")]


def test_profiled_steps_record_a_second_threads_ranges():
    """The fetch thread's named waits must reach the trace (by default only the profiling thread's do)."""
    import threading
    import time

    from torch.profiler import record_function

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import step_timing

    stop = threading.Event()

    def fetch():
        while not stop.is_set():
            with record_function("fetch.room"):
                time.sleep(0.002)

    t = threading.Thread(target=fetch)
    t.start()
    try:
        _, prof = step_timing.time_and_profile(lambda: time.sleep(0.01), steps=1, profile_steps=2, cuda=False,
                                               untimed=0)
    finally:
        stop.set()
        t.join()
    assert any(e.name == "fetch.room" for e in prof.events())


def _bench_module(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    return __import__(name)


def test_host_timeline_splits_a_copy_gap_by_what_each_thread_was_in():
    """A 2 ms gap between two copies: the fetch thread spent 1 ms of it waiting for room and 1 ms issuing
    (inside `_copy`, so not counted as its backlog wait); the compute thread was in `wait` for 1.5 ms."""
    h = _bench_module("host_timeline")
    ms = 1_000_000
    tl = SimpleNamespace(calls=[(2 * ms, 3 * ms, "_wait_for_room", "F"), (3 * ms, 6 * ms, "_copy", "F"),
                                (3 * ms, 4 * ms, "_copy_in", "F"), (2 * ms, 3_500_000, "wait", "M")],
                         args=["9", "0.attn", "0.attn", "0,attn"],
                         gpu_copies_ns=lambda: [(0, 2 * ms), (4 * ms, 7 * ms)])
    t = h.summarize(tl, steps=1)
    assert t["idle_ms_per_step"] == 2.0 and t["copy_busy_ms_per_step"] == 5.0
    gap = t["longest"][0]
    assert gap["fetch_us"] == {"_wait_for_room": 1000.0, "copy_issue": 1000.0, "backlog": 0.0, "other": 0.0}
    assert gap["compute_us"] == {"wait": 1500.0, "other": 500.0}
    assert any("_wait_for_room  9" in line for line in t["sequence"])


def test_spy_frames_shares_one_threads_samples_by_deepest_own_frame():
    s = _bench_module("spy_frames")
    lines = ["thread (1): MainThread;<module> (run.py:1);_embed (worker/model/llama.py:41);embedding (torch/f.py:9) 6\n",
             "thread (1): MainThread;<module> (run.py:1);matmul (worker/quant/fused.py:175) 2\n",
             "thread (2): h2d-fetch;_copy_in (worker/stream/streamer.py:300) 5\n"]
    total, ours, deepest = s.shares(lines, "MainThread", ("worker/",))
    assert total == 8
    assert ours == {"_embed (worker/model/llama.py:41)": 6, "matmul (worker/quant/fused.py:175)": 2}
    assert deepest == {"embedding (torch/f.py)": 6, "matmul (worker/quant/fused.py)": 2}


def test_fill_trace_splits_a_fills_window_into_its_threads_reads_and_waits():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import fill_trace

    def snap(t, busy, idle, steal):  # /proc/stat's counters: user nice system idle iowait irq softirq steal
        return {"t": t, "stat": [busy, 0, 0, idle, 0, 0, 0, steal], "vm": {"thp_fault_fallback": t * 10},
                "threads": {"cache-read_0": t, "cache-read_1": t, "MainThread": 0.0}}

    window = {"start": snap(1.0, 0, 100, 0), "end": snap(2.0, 40, 150, 10), "fill_s": 1.0}  # half the ticks idle
    calls = [("read", "cache-read_0", 1.0, 1.5, 4 << 30, 0.0, 0.25, 10, 3, 0),  # half of its wall spent waiting
             ("read", "cache-read_1", 1.1, 1.9, 4 << 30, 0.0, 0.75, 10, 1, 0),
             ("pin", "cache-read_1", 1.9, 2.0, 8 << 30, 0.0, 0.05, 2, 0, 0),
             ("read", "cache-read_0", 0.5, 0.9, 1 << 30, 0.0, 0.4, 0, 0, 0)]  # before the window: not counted
    s = fill_trace.summarize(window, calls)
    assert s["read"]["calls"] == 2 and s["read"]["bytes"] == 8 << 30
    assert abs(s["read"]["wall_s"] - 1.3) < 1e-9 and abs(s["read"]["cpu_s"] - 1.0) < 1e-9
    assert abs(s["read"]["concurrency"] - 1.3) < 1e-9 and s["read"]["threads"] == 2
    assert abs(s["read"]["last_end_s"] - 0.9) < 1e-9 and s["pin"]["calls"] == 1
    assert abs(s["system"]["busy_cores"] - 0.5 * s["system"]["cpus"]) < 1e-9
    assert abs(s["system"]["steal_cores"] - 0.1 * s["system"]["cpus"]) < 1e-9
    assert s["vmstat"] == {"thp_fault_fallback": 10}
    assert s["thread_cpu_s"] == {"cache-read": 2.0}  # the pool's threads summed, an idle one left out
    assert s["read"]["in_flight_by_tenth"] == [1.0] + [2.0] * 4 + [1.0] * 4 + [0.0]  # one read from 1.5, none from 1.9
    assert [c[:2] for c in s["calls"]] == [("read", "cache-read_0"), ("read", "cache-read_1"), ("pin", "cache-read_1")]
    assert "2 on 2 thr" in fill_trace.line(0, s) and "in flight by tenth [1.0, 2.0" in fill_trace.line(0, s)
    late = s["pin"]["after_last_read"]  # the registration from 1.9 to 2.0, after the last read's end at 1.9
    assert late["calls"] == 1 and late["bytes"] == 8 << 30 and abs(late["seconds"] - 0.1) < 1e-9
    assert "after the last read 1 (8192 MiB, the fill 100.0 ms longer)" in fill_trace.line(0, s)


def test_fill_trace_runs_a_bench_run_and_reads_the_source_in_the_same_process(tiny_ckpt, tmp_path):
    """End to end on the tiny model: the fill's window, a module constant set for the A/B, and the source read
    after the run (before the interpreter's shutdown, which would refuse the reader's threads)."""
    out = tmp_path / "t.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fill_trace.py"), "--json", str(out), "--source-after",
                        "--set", "worker.stream.fill:CACHED_READ=65536", "cli", "-v", "WARNING", "run",
                        "--checkpoints", str(tiny_ckpt), "--mode", "cpu", "--prompt-len", "8", "--max-new-tokens", "2",
                        "--no-roofline", "--pack-dir", str(tmp_path / "pack"), "--out-json", str(tmp_path / "r.json")],
                       capture_output=True, text=True, timeout=300, check=False,
                       env={**os.environ, "STREAMBENCH_CACHE": str(tmp_path / "cache")})
    assert p.returncode == 0, p.stderr[-3000:]
    [s] = json.loads(out.read_text())
    assert s["read"]["calls"] > 0 and s["source_after_gbps"] > 0, s
    assert "TRACE source after the run" in p.stderr and "TRACE fill 0" in p.stderr
