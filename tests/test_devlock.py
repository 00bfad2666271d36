"""One engine per device, one submit per suite run id: host-level locks held by real processes
(issue 12, item 4). A holder is a separate Python process, as another `bench` would be."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from worker.errors import UserError
from worker.host import devlock

HOLDER = """
import sys, time
from worker.host import devlock
with devlock.hold(sys.argv[1].split(","), wait_s=0):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


@pytest.fixture(autouse=True)
def lock_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMBENCH_LOCK_DIR", str(tmp_path / "locks"))
    return tmp_path / "locks"


def start_holder(keys: str, seconds: float) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, keys, str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_device_held_by_another_process_is_refused_naming_the_holder():
    holder = start_holder("gpu-abc,disk-8:1", 30)
    try:
        t0 = time.monotonic()
        with pytest.raises(UserError, match=rf"GPU abc is in use by another engine \(pid {holder.pid} on .*raise "
                                            r"--device-wait-s"):
            with devlock.hold(["gpu-abc"], wait_s=0.5):
                pass
        assert 0.5 <= time.monotonic() - t0 < 5
        with devlock.hold(["gpu-other", "disk-8:2"], wait_s=0):  # other devices are free
            pass
    finally:
        holder.kill()
        holder.wait()


def test_a_waiting_engine_gets_the_device_when_the_holder_exits():
    holder = start_holder("cpu", 1.0)
    try:
        with devlock.hold(["cpu"], wait_s=20) as held:
            assert held.waited_s > 0.6  # the holder kept it for 1 s after it said "held"
            assert held.waited_for and held.waited_for[0]["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_leaves_no_stale_lock():
    holder = start_holder("gpu-abc", 60)
    holder.kill()
    holder.wait()
    with devlock.hold(["gpu-abc"], wait_s=0) as held:  # the kernel dropped the flock with the process
        assert held.waited_s < 1


def test_lock_files_name_their_holder_and_are_open_to_every_user(lock_dir):
    with devlock.hold(["disk-8:1"], wait_s=0):
        doc = json.loads((lock_dir / "disk-8:1.lock").read_text())
        assert doc["pid"] > 0 and doc["host"] and "since" in doc
    assert (lock_dir / "disk-8:1.lock").stat().st_mode & 0o666 == 0o666
    assert lock_dir.stat().st_mode & 0o1777 == 0o1777


def test_disk_key_names_the_device_of_a_file(tmp_path):
    f = tmp_path / "x"
    f.write_bytes(b"1")
    st = f.stat()
    assert devlock.disk_key(f) == f"disk-{os.major(st.st_dev)}:{os.minor(st.st_dev)}"


CLAIMER = """
import sys, time
from orchestrator.cluster.lease import claim
with claim(sys.argv[1], sys.argv[2]):
    print("claimed", flush=True)
    time.sleep(float(sys.argv[3]))
"""


def test_a_suite_run_id_in_use_by_a_live_submit_is_refused(tmp_path):
    from benchcli import bench

    results = tmp_path / "res"
    p = subprocess.Popen([sys.executable, "-c", CLAIMER, str(results), "smoke-x", "60"], stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "claimed"
        t0 = time.monotonic()
        r = bench("submit", "--results", str(results), "--suite-run-id", "smoke-x", timeout=60)
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert "suite run smoke-x is in use by another submit" in r.stderr and f"pid {p.pid}" in r.stderr
        assert time.monotonic() - t0 < 30 and "Traceback" not in r.stderr
        assert not any(results.glob("date=*"))  # nothing ran
    finally:
        p.kill()
        p.wait()


def test_a_claim_left_by_another_host_blocks_until_it_goes_stale(tmp_path, monkeypatch):
    from orchestrator.cluster import lease

    running = tmp_path / "res" / lease.LEASE_DIR
    running.mkdir(parents=True)
    doc = {"host": "elsewhere", "pid": 1, "since": time.time() - 100}
    (running / "s-1.json").write_text(json.dumps({**doc, "heartbeat": time.time()}))
    with pytest.raises(UserError, match="suite run s-1 is being run by another submit .pid 1 on elsewhere"):
        with lease.claim(str(tmp_path / "res"), "s-1"):
            pass
    (running / "s-1.json").write_text(json.dumps({**doc, "heartbeat": time.time() - 2 * lease.STALE_S}))
    with lease.claim(str(tmp_path / "res"), "s-1"):  # a dead submit's claim is taken over
        assert json.loads((running / "s-1.json").read_text())["pid"] == os.getpid()
    assert not (running / "s-1.json").exists()  # released on exit


def test_readers_skip_a_live_claim_in_the_dataset(tmp_path):
    import fakerows

    from orchestrator.cluster import lease
    from orchestrator.results.store import read_results

    rows = fakerows.history(fakerows.suite(), ["h100-a"], nights=1)
    fakerows.write(str(tmp_path / "res"), rows)
    with lease.claim(str(tmp_path / "res"), "live-1"):
        assert (tmp_path / "res" / lease.LEASE_DIR / "live-1.json").is_file()
        assert read_results(str(tmp_path / "res")).num_rows == len(rows)


def run_args(ckpt, tmp_path, name: str, *extra: str) -> list[str]:
    return ["run", "--checkpoints", str(ckpt), "--mode", "cpu", "--prompt-len", "8", "--max-new-tokens", "48",
            "--max-seq-len", "64", "--temperature", "0", "--no-roofline", "--pack-dir", str(tmp_path / "pack"),
            "--out-json", str(tmp_path / f"{name}.json"), *extra]


def test_bench_run_waits_for_a_device_another_engine_holds(tiny_ckpt, tmp_path):
    from benchcli import bench

    holder = start_holder("cpu", 60)  # as if another engine ran on this host's CPU
    try:
        r = bench(*run_args(tiny_ckpt, tmp_path, "refused", "--device-wait-s", "1"), timeout=120)
        assert r.returncode == 2 and "the CPU is in use by another engine" in r.stderr and f"pid {holder.pid}" in r.stderr
        assert "Traceback" not in r.stderr and not (tmp_path / "refused.json").exists()
    finally:
        holder.kill()
        holder.wait()


def test_two_engines_on_one_device_never_overlap(tiny_ckpt, tmp_path):
    from benchcli import BENCH

    bench_env = {**os.environ}
    procs = [subprocess.Popen([*BENCH, *run_args(tiny_ckpt, tmp_path, f"r{i}")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=bench_env) for i in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    docs = [json.loads((tmp_path / f"r{i}.json").read_text()) for i in range(2)]
    spans = sorted((d["locks"]["acquired_at"], d["locks"]["released_at"]) for d in docs)
    assert spans[0][1] <= spans[1][0], spans  # the second engine started after the first let go
    assert all(d["locks"]["keys"][0] == "cpu" and d["locks"]["keys"][1].startswith("disk-") for d in docs)
    assert max(d["locks"]["waited_s"] for d in docs) > 0  # one of them waited
    assert docs[0]["outputs"] == docs[1]["outputs"]


@pytest.mark.parametrize("mode, frees", [("cpu", True), ("gpu", True), ("ssd", False), ("mixed", False)])
def test_an_engine_gives_its_disk_back_once_nothing_reads_it(tiny_run, tmp_path, monkeypatch, mode, frees):
    """Two GPUs, one disk: an engine whose weights are all in memory holds the disk only while it is
    built, so the other GPU's engine can fill from it meanwhile; one that streams from it keeps it."""
    import worker.run as run_mod

    cfg = run_mod.resolve_config({**tiny_run, "max_new_tokens": 4, "mode": mode, "roofline": False})
    measure, seen = run_mod._measure, []

    def measure_and_try_the_disk(engine, cfg, *a, **k):
        try:
            with devlock.hold([disk], 0.0):
                seen.append("free")
        except UserError:
            seen.append("held")
        return measure(engine, cfg, *a, **k)

    disk = devlock.disk_key(tmp_path)  # the pack lands under tmp_path: its filesystem
    monkeypatch.setattr(run_mod, "_measure", measure_and_try_the_disk)
    r = run_mod.run(cfg)
    assert seen == ["free" if frees else "held"]
    assert bool(r["locks"]["released_early"]) is frees
