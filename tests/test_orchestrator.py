"""The orchestrator on a simulated multi-host Ray cluster (ray.cluster_utils.Cluster, one machine).

Hosts (one cluster for the whole module):
  head  1 CPU, nothing else (the driver's node)
  A     2 "GPUs" (accelerator_type H100), NVMe resources nvme:a0, nvme:a1 -> two (GPU, NVMe) slots
  B     CPU host, NVMe resource nvme:b0
  C     CPU host, NVMe device only as a label (nvme=c0), label rack=r7 (a label-only selector match)
  G     2 "GPUs", no NVMe device, label host=gpubox: a two-GPU box as the embedded local Ray sees it
  U     1 "GPU", NVMe resources nvme:u0, nvme:u1: more devices than GPUs (u1 cannot be used)
Most tests inject a fake engine (sleeps, reports phases) to test placement and faults quickly; the
end-to-end test runs the real engine on the tiny checkpoint.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from orchestrator.cluster.connect import prefer_token_auth  # noqa: E402
from orchestrator.cluster.submit import submit  # noqa: E402
from orchestrator.results.store import read_results  # noqa: E402
from orchestrator.suite.load import parse_suite  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray.cluster_utils import Cluster

    env = pytest.MonkeyPatch()
    for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
                       "STREAMBENCH_CACHE": str(tmp_path_factory.mktemp("cache"))}.items():
        env.setenv(key, value)
    env.delenv("RAY_AUTH_MODE", raising=False)  # restored at teardown
    # Token auth on whenever a token exists, as `ray start` does (and as `bench` connects: see the trap test)
    auth = prefer_token_auth()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = {
        "A": c.add_node(num_cpus=2, num_gpus=2, resources={"nvme:a0": 1, "nvme:a1": 1, "accelerator_type:H100": 1}),
        "B": c.add_node(num_cpus=2, resources={"nvme:b0": 1}),
        "C": c.add_node(num_cpus=2, labels={"rack": "r7", "nvme": "c0"}),
        "G": c.add_node(num_cpus=2, num_gpus=2, labels={"host": "gpubox"}),
        "U": c.add_node(num_cpus=1, num_gpus=1, resources={"nvme:u0": 1, "nvme:u1": 1}),
    }
    ray.init(address=c.address)
    c.names = {k: n.node_id for k, n in nodes.items()}
    c.token_auth = auth
    yield c
    ray.shutdown()
    c.shutdown()
    env.undo()


def fake_engine(sleep_s: float):
    """A stand-in for worker.run.run: reports phases, sleeps, returns a minimal result document."""

    def run(cfg, on_phase=None):
        import time as _time

        on_phase("load")
        _time.sleep(sleep_s)
        on_phase("decode")
        return {"config": cfg.to_dict(), "system": {"device": "cpu"},
                "metrics": {"ttft_ms": 1.0, "decode_tok_s": 100.0, "itl_ms": [1.0, 2.0], "batch_size": cfg.batch_size}}

    return run


def suite_doc(ckpt: Path, name: str, blocks: str, extra: str = "") -> str:
    return f"name: {name}\nmodels: [{{name: tiny, path: {ckpt}}}]\n{extra}\nmatrix:\n{blocks}"


def intervals_overlap(rows) -> bool:
    return any(a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"]
               for i, a in enumerate(rows) for b in rows[i + 1:])


PLACEMENT = """\
  - host: [{gpu: H100}]
    batch_size: [1, 2, 3, 4]
  - host: [{nvme: [b0]}]
    batch_size: [1, 2]
  - host: [{labels: {rack: r7}}]
    batch_size: [1, 2]
  - host: [{hosts: [nowhere]}]
"""


def test_runs_land_where_selectors_say_one_run_per_device_in_parallel(cluster, tiny_ckpt, tmp_path):
    suite = parse_suite(suite_doc(tiny_ckpt, "place", PLACEMENT))
    seen_phases = set()
    t0 = time.monotonic()
    out = submit(suite, str(tmp_path), "place-1", run_fn=fake_engine(1.0), poll_s=0.2,
                 on_update=lambda p: seen_phases.update(p.phases[r] for r in p.running if r in p.phases))
    wall = time.monotonic() - t0
    assert {"load", "decode"} & seen_phases  # engine phases reach the live display while runs are going
    rows = read_results(str(tmp_path)).to_pylist()
    assert len(rows) == len(suite.specs) == 9 and not out.interrupted

    by_sel = defaultdict(list)
    for r in rows:
        by_sel[r["host_selector"]].append(r)
    gpu = by_sel[json.dumps({"gpu": "H100"})]
    assert {r["node_id"] for r in gpu} == {cluster.names["A"]} and {r["nvme_device"] for r in gpu} == {"a0", "a1"}
    assert {(r["node_id"], r["nvme_device"]) for r in by_sel[json.dumps({"nvme": ["b0"]})]} == {(cluster.names["B"], "b0")}
    assert {(r["node_id"], r["nvme_device"]) for r in by_sel[json.dumps({"labels": {"rack": "r7"}})]} == {
        (cluster.names["C"], "c0")}
    (nowhere,) = by_sel[json.dumps({"hosts": ["nowhere"]})]
    assert nowhere["status"] == "failed" and "no live host matches selector (hosts=['nowhere'])" in nowhere["error"]
    assert nowhere["node_id"] is None and nowhere["ttft_ms"] is None and nowhere["attempts"] == 0

    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 8 and all(r["attempts"] == 1 and r["ttft_ms"] == 1.0 for r in ok)
    per_device = defaultdict(list)
    for r in ok:
        per_device[(r["node_id"], r["nvme_device"])].append(r)
    assert len(per_device) == 4
    for runs in per_device.values():  # never two runs at once on one device
        assert not intervals_overlap(runs)
    assert intervals_overlap(ok)  # but in parallel across devices and hosts
    assert wall < 8 * 1.0 + 15  # 8 one-second runs over 4 slots, plus actor start-up

    # resubmitting the same suite run id runs only what is not recorded ok: the failed run, replaced
    again = submit(suite, str(tmp_path), "place-1", run_fn=fake_engine(1.0), poll_s=0.2)
    assert sorted(again.already_recorded) == sorted(r["run_id"] for r in ok)
    assert [r["run_id"] for r in again.rows] == [nowhere["run_id"]]
    rows2 = read_results(str(tmp_path)).to_pylist()
    assert len(rows2) == 9 and len({r["run_id"] for r in rows2}) == 9


def gpu_reporting_engine(sleep_s: float, out_dir: Path):
    """A fake engine that writes down, from inside the actor, the GPU Ray gave it: `ray.get_gpu_ids()`
    and the process's CUDA_VISIBLE_DEVICES, with its pid and the times it ran."""

    def run(cfg, on_phase=None):
        import json as _json
        import os as _os
        import time as _time

        import ray as _ray

        t0 = _time.time()
        _time.sleep(sleep_s)
        seen = {"batch_size": cfg.batch_size, "ray_gpu_ids": [str(i) for i in _ray.get_gpu_ids()],
                "cuda_visible_devices": _os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": _os.getpid(),
                "start": t0, "end": _time.time()}
        (out_dir / f"run-{cfg.batch_size}.json").write_text(_json.dumps(seen))
        return {"config": cfg.to_dict(), "system": {"device": "cpu"}, "metrics": {"ttft_ms": 1.0, "batch_size": cfg.batch_size}}

    return run


def test_a_two_gpu_host_runs_two_pinned_actors_at_once_on_distinct_gpus(cluster, tiny_ckpt, tmp_path):
    """Issue 15 on simulated GPUs: host G (2 GPUs, no device) is two slots; 4 runs go two at a time;
    concurrent runs never share a GPU; each row names the GPU Ray gave its actor."""
    seen_dir = tmp_path / "seen"
    seen_dir.mkdir()
    suite = parse_suite(suite_doc(tiny_ckpt, "two-gpu", "  host: [{hosts: [gpubox]}]\n  batch_size: [1, 2, 3, 4]\n"))
    out = submit(suite, str(tmp_path / "rows"), "g-1", run_fn=gpu_reporting_engine(1.5, seen_dir), poll_s=0.1)
    rows = read_results(str(tmp_path / "rows")).to_pylist()
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    assert {r["node_id"] for r in rows} == {cluster.names["G"]} and not out.interrupted
    seen = {s["batch_size"]: s for s in (json.loads(p.read_text()) for p in seen_dir.glob("*.json"))}
    for r in rows:  # the row's device is the one Ray assigned, as the engine's process saw it
        inside = seen[r["batch_size"]]
        assert r["cuda_visible_devices"] == inside["cuda_visible_devices"] == ",".join(inside["ray_gpu_ids"])
        assert len(inside["ray_gpu_ids"]) == 1 and r["device"] == "cpu" and r["gpu_uuid"] is None  # fake GPUs
    assert {r["cuda_visible_devices"] for r in rows} == {"0", "1"}
    assert len({s["pid"] for s in seen.values()}) == 2  # one actor per GPU, each kept for its runs
    assert intervals_overlap(rows)  # two in flight at once
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            if a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"]:
                assert a["cuda_visible_devices"] != b["cuda_visible_devices"], (a["run_id"], b["run_id"])
    inside = sorted(seen.values(), key=lambda s: s["start"])  # the engine calls themselves overlapped too
    assert any(x["start"] < y["end"] and y["start"] < x["end"] for i, x in enumerate(inside) for y in inside[i + 1:])


def test_a_run_on_a_device_its_host_cannot_pair_is_refused_before_anything_runs(cluster, tiny_ckpt, tmp_path):
    """U advertises u0 and u1 for one GPU: u1 gets no slot. A run selecting it is one line, exit 2, before any
    run (it used to be a failed row saying "no live host matches", while `bench hosts` listed u1)."""
    from benchcli import bench

    path = tmp_path / "u.yaml"
    path.write_text(suite_doc(tiny_ckpt, "unpaired", "  host: [{nvme: [u1]}]\n"))
    done = bench("submit", str(path), "--results", str(tmp_path / "rows"), "--address", cluster.address,
                 cwd=tmp_path, timeout=90)
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: run ") and "selects NVMe device u1, which host" in line, line
    assert "1 GPU(s) for 2 devices (u0, u1)" in line and "select u0" in line
    assert not list((tmp_path / "rows").rglob("*.parquet"))


def test_engine_errors_become_failed_rows_and_timeouts_are_bounded(cluster, tiny_ckpt, tmp_path):
    def broken(cfg, on_phase=None):
        raise RuntimeError("CUDA out of memory (simulated)")

    suite = parse_suite(suite_doc(tiny_ckpt, "broken", "  host: [{nvme: [b0]}]\n"))
    submit(suite, str(tmp_path), "b-1", run_fn=broken)
    (row,) = read_results(str(tmp_path)).to_pylist()
    assert row["status"] == "failed" and row["error"] == "RuntimeError: CUDA out of memory (simulated)"
    assert row["attempts"] == 1 and row["node_id"] == cluster.names["B"] and row["hardware_key"]

    slow = parse_suite(suite_doc(tiny_ckpt, "slow", "  host: [{nvme: [b0]}]\n", extra="timeout_s: 3"))
    t0 = time.monotonic()
    submit(slow, str(tmp_path), "s-1", run_fn=fake_engine(60.0), poll_s=0.2)
    assert time.monotonic() - t0 < 30
    (row,) = read_results(str(tmp_path), suite="slow").to_pylist()
    assert row["status"] == "failed" and "timed out after 3 s" in row["error"]


def test_ctrl_c_keeps_finished_rows_and_resubmission_completes_without_duplicates(cluster, tiny_ckpt, tmp_path):
    suite = parse_suite(suite_doc(tiny_ckpt, "intr", "  host: [{nvme: [b0]}]\n  batch_size: [1, 2, 3, 4]\n"))

    def interrupt_after_first(progress):
        if progress.finished >= 1:
            raise KeyboardInterrupt

    out = submit(suite, str(tmp_path), "i-1", run_fn=fake_engine(0.5), on_update=interrupt_after_first, poll_s=0.1)
    assert out.interrupted and len(out.rows) == 1 and out.progress.cancelled >= 1
    time.sleep(1.5)  # a cancelled run must not write late
    assert read_results(str(tmp_path)).num_rows == 1

    rest = submit(suite, str(tmp_path), "i-1", run_fn=fake_engine(0.5), poll_s=0.1)
    assert len(rest.already_recorded) == 1 and len(rest.rows) == 3
    rows = read_results(str(tmp_path)).to_pylist()
    assert sorted(r["run_id"] for r in rows) == sorted(s.run_id for s in suite.specs)


def test_real_engine_end_to_end_on_the_tiny_model(cluster, tiny_ckpt, tmp_path):
    doc = f"""
name: e2e
models:
  - {{name: tiny, path: {tiny_ckpt}}}
  - {{name: made, preset: tiny, layers: 2, dtype: float32, overrides: {{vocab_size: 1000}}}}
defaults: {{max_new_tokens: 4, prompt_len: 8, max_seq_len: 64, warmup_rounds: 0, temperature: 0}}
matrix:
  - {{model: tiny, mode: [gpu, cpu], host: [{{nvme: [a0, a1]}}]}}
  - {{model: made, host: [{{nvme: [c0]}}]}}
"""
    suite = parse_suite(doc)
    out = submit(suite, str(tmp_path), "e2e-1")
    rows = read_results(str(tmp_path)).to_pylist()
    assert len(rows) == 3, [r["error"] for r in rows]
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    for r in rows:
        assert r["decode_tok_s"] > 0 and r["ttft_ms"] > 0 and r["e2e_ms"] >= r["ttft_ms"]
        assert len(r["itl_ms"]) == 3 and r["generated_tokens"] == 4 and r["batch_size"] == 1
        assert r["device"] == "cpu" and r["gpu_alloc_gb"] is None  # not measurable on CPU: null, not 0
        assert json.loads(r["config_json"])["max_new_tokens"] == 4
        assert r["hardware_key"] and r["torch_version"] and r["n_layers"] == 2
        assert len(r["output_token_ids"]) == 1 and len(r["output_token_ids"][0]) == 4
    gpu, cpu = sorted((r for r in rows if r["model"] == "tiny"), key=lambda r: r["mode"], reverse=True)
    assert gpu["output_token_ids"] == cpu["output_token_ids"]  # same function in every mode, greedy
    assert {r["nvme_device"] for r in rows if r["model"] == "tiny"} <= {"a0", "a1"}
    (made,) = [r for r in rows if r["model"] == "made"]
    assert made["nvme_device"] == "c0" and json.loads(made["model_source"])["preset"] == "tiny"
    assert not out.interrupted


def test_unplaceable_runs_can_be_skipped(cluster, tiny_ckpt, tmp_path):
    suite = parse_suite(suite_doc(tiny_ckpt, "skip", "  host: [{gpu: H200}, {nvme: [b0]}]\n", extra="on_no_host: skip"))
    out = submit(suite, str(tmp_path), "k-1", run_fn=fake_engine(0.1))
    (row,) = read_results(str(tmp_path)).to_pylist()
    assert row["nvme_device"] == "b0" and out.progress.skipped == 1


def test_bench_hosts_lists_gpus_nvme_devices_and_slots(cluster):
    from click.testing import CliRunner

    import cli

    result = CliRunner().invoke(cli.bench, ["hosts", "--json"])
    assert result.exit_code == 0, result.output
    hosts = {h["node_id"]: h for h in json.loads(result.output)}
    a, b, c = (hosts[cluster.names[k]] for k in "ABC")
    assert (a["gpus"], a["accelerator"], a["nvme"], a["slots"]) == (2, "H100", ["a0", "a1"], 2)
    assert (b["gpus"], b["nvme"], b["slots"]) == (0, ["b0"], 1)
    assert (c["nvme"], c["labels"]) == (["c0"], {"rack": "r7", "nvme": "c0"})
    g, u = (hosts[cluster.names[k]] for k in "GU")
    assert (g["gpus"], g["nvme"], g["slots"], g["idle_gpus"]) == (2, [], 2, 0)  # a two-GPU box: two slots
    assert (u["gpus"], u["nvme"], u["slots"], u["unused_nvme"]) == (1, ["u0", "u1"], 1, ["u1"])
    # one machine, one cache dir: every simulated host reports the same probe figures, or None when not probed
    probes = [h["probe"] for h in hosts.values()]
    assert all(p == probes[0] for p in probes) and (probes[0] is None or "ssd_gbps" in probes[0])
    assert all(h["fingerprint"]["hostname"] and h["fingerprint"]["ram_gb"] > 0 for h in hosts.values())
    table = CliRunner().invoke(cli.bench, ["hosts"])
    assert table.exit_code == 0 and f"{len(hosts)} hosts" in table.output


# `bench` with each `ray.init` timed (on stderr): the trap is inside it, so the bound is on it alone, not
# on the interpreter's start, the imports and the hosts' reports, which take what a loaded box gives them
TIMED_INIT = """
import sys, time
import ray
real = ray.init
def timed(*args, **kwargs):
    t0 = time.monotonic()
    try:
        return real(*args, **kwargs)
    finally:
        print(f"ray.init: {time.monotonic() - t0:.3f} s", file=sys.stderr)
ray.init = timed
import cli
cli.main()
"""


def test_a_fresh_client_gets_past_the_auth_token_trap(cluster, tmp_path):
    """RAY_NOTES: a client without RAY_AUTH_MODE=token fails after ~20 s against a token-auth cluster."""
    if not cluster.token_auth:
        pytest.skip("no Ray auth token on this machine, so the cluster runs without auth: no trap to test")
    import os
    import re
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    done = subprocess.run([sys.executable, "-c", TIMED_INIT, "hosts", "--json", "--address", cluster.address],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    connects = [float(s) for s in re.findall(r"^ray\.init: ([0-9.]+) s$", done.stderr, re.M)]
    assert len(connects) == 1 and connects[0] < 10, done.stderr[-2000:]  # one try, far from the trap's ~20 s
    assert {h["node_id"] for h in json.loads(done.stdout)} >= set(cluster.names.values())


def test_node_removed_mid_suite_retries_elsewhere_and_keeps_finished_rows(cluster, tiny_ckpt, tmp_path):
    """Runs last: it removes a node. D and E share a pool; some runs may only use D's device."""
    d = cluster.add_node(num_cpus=2, resources={"nvme:d0": 1, "pool:x": 2})
    e = cluster.add_node(num_cpus=2, resources={"nvme:e0": 1, "pool:x": 2})
    cluster.wait_for_nodes()
    blocks = "  - {host: [{resources: ['pool:x']}], batch_size: [1, 2, 3, 4]}\n  - {host: [{nvme: [d0]}], batch_size: [5]}\n"
    suite = parse_suite(suite_doc(tiny_ckpt, "fault", blocks, extra="retries: 2"))
    removed = []

    def remove_d_once_it_finished_a_run(progress):
        d_name = progress.names.get(d.node_id)
        if not removed and progress.done[d_name] >= 1 and any(h == d_name for h, _ in progress.running.values()):
            cluster.remove_node(d)
            removed.append(time.time())

    out = submit(suite, str(tmp_path), "f-1", run_fn=fake_engine(1.5), on_update=remove_d_once_it_finished_a_run,
                 poll_s=0.2)
    assert removed, "the test never saw D finish a run while busy"
    rows = read_results(str(tmp_path)).to_pylist()
    assert sorted(r["run_id"] for r in rows) == sorted(s.run_id for s in suite.specs)  # one row per run
    pool = [r for r in rows if "pool:x" in r["host_selector"]]
    assert all(r["status"] == "ok" for r in pool), [r["error"] for r in pool]
    finished_on_d = [r for r in pool if r["node_id"] == d.node_id]
    assert len(finished_on_d) == 1 and finished_on_d[0]["finished_at"].timestamp() < removed[0]  # not lost
    (retried,) = [r for r in pool if r["attempts"] > 1]  # the run D held when it died, redone on E
    assert retried["attempts"] == 2 and retried["node_id"] == e.node_id and out.progress.retries == 1
    (only_d,) = [r for r in rows if "d0" in r["host_selector"]]
    assert only_d["status"] == "failed" and "no live host matches selector (nvme=['d0'])" in only_d["error"]


def test_a_full_results_disk_mid_suite_is_one_line_with_the_rows_kept(cluster, tiny_ckpt, tmp_path, monkeypatch):
    import errno

    from orchestrator.cluster import submit as submit_mod
    from worker.errors import UserError

    suite = parse_suite(suite_doc(tiny_ckpt, "full", "  host: [{nvme: [b0]}]\n  batch_size: [1, 2, 3]\n"))
    real, written = submit_mod.write_row, []

    def fills_up(uri, row, *a, **kw):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(real(uri, row, *a, **kw))
        return written[-1]

    monkeypatch.setattr(submit_mod, "write_row", fills_up)
    with pytest.raises(UserError) as e:
        submit(suite, str(tmp_path), "full-1", run_fn=fake_engine(0.2), poll_s=0.1)
    msg = str(e.value)
    assert "No space left on device" in msg and "the 1 row(s) written so far are kept" in msg
    assert "--suite-run-id full-1" in msg and "\n" not in msg
    assert read_results(str(tmp_path)).num_rows == 1
    monkeypatch.undo()
    rest = submit(suite, str(tmp_path), "full-1", run_fn=fake_engine(0.2), poll_s=0.1)  # the resume it names
    assert len(rest.already_recorded) == 1 and len(rest.rows) == 2
