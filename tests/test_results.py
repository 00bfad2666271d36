"""The results dataset: schema rows, atomic writes, hive layout, tolerant reads, other readers."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.cluster.actor import RunOutcome
from orchestrator.results import store as results
from orchestrator.results.schema import COLUMN_NAMES, FILE_SCHEMA, SCHEMA, SCHEMA_VERSION, build_row
from orchestrator.results.store import read_results, recorded, write_row
from orchestrator.suite.load import parse_suite
from worker.errors import UserError
from worker.host.hostinfo import hardware_key

SUITE = parse_suite("name: s\nmodels: [{name: tiny, preset: tiny}]\nmatrix: {mode: [gpu, mixed], batch_size: 2}\n")
FP = {"hostname": "gpu-7", "gpu_name": "NVIDIA H100 80GB HBM3", "gpu_count": 1, "gpu_mem_gb": 79.1, "gpu_pcie": None,
      "cuda_version": "12.8", "torch_version": "2.13.0", "cpu_model": "AMD EPYC 9654", "ram_gb": 503.2,
      "nvme_device": "nvme0n1p4", "nvme_model": "SAMSUNG MZQL23T8HCLS", "nvme_pcie": None}


def engine_result(spec, itl=(10.0, 11.0, 30.0)) -> dict:
    """A result document as worker.run.run returns it (the contract's keys)."""
    cfg = spec.config("/models/tiny")
    return {
        "schema": "streambench.run/1", "status": "ok", "config": cfg.to_dict(),
        "model": {"name": "tiny", "n_layers": 4, "dtype": "bfloat16", "hidden_size": 256, "n_params": 70_000_000,
                  "weight_bytes": 140_000_000},
        "system": {"hostname": "gpu-7", "device": "cuda", "gpu_name": "NVIDIA H100 80GB HBM3", "gpu_count": 1,
                   "gpu_mem_gb": 79.1, "cuda_version": "12.8", "torch_version": "2.13.0", "cpu_model": "AMD EPYC 9654",
                   "ram_gb": 503.2, "engine_version": "0.1.0", "nvme_device": None},
        "metrics": {"ttft_ms": 50.0, "prefill_ms": 49.0, "decode_ms": 51.0, "decode_tok_s": 117.6, "e2e_ms": 101.0,
                    "itl_ms": list(itl), "itl_p50_ms": 11.0, "itl_p90_ms": 26.2, "itl_p99_ms": 29.8, "batch_size": 2,
                    "prompt_len": 128, "generated_tokens": 8, "gpu_max_allocated_gb": 1.5, "gpu_max_reserved_gb": 2.0,
                    "host_rss_gb": 3.0, "pinned_host_gb": None, "kv_gpu_gb": 0.5, "kv_cpu_gb": 2.0, "kv_ssd_gb": 0.0,
                    "kv_write_backoffs": 3},
        "io": {"ssd_read": {"bytes": 10**9, "busy_s": 0.2, "gbps": 5.0}, "weight_h2d": None, "kv_h2d": None,
               "kv_d2h": {"bytes": 10, "busy_s": 1.0, "gbps": 1e-8}},  # no kv_ssd: the KV cache did not spill
        "roofline": None,
        "warnings": ["page cache was warm"],
        "outputs": [{"prompt_token_ids": [1, 2], "token_ids": [5, 6, 7, 8], "text": "x"},
                    {"prompt_token_ids": [3], "token_ids": [9, 9, 9, 9], "text": "y"}],
    }


def ok_outcome(spec, **kw) -> RunOutcome:
    t = time.time()
    return RunOutcome("ok", None, engine_result(spec), FP, "node-1", t - 1, t, "a" * 40, False, **kw)


def failed_outcome(reason="no live host matches selector (any host)") -> RunOutcome:
    return RunOutcome("failed", reason, None, None, None, None, time.time(), attempts=0)


def test_row_records_the_run_s_own_gpu():
    """Index as the process saw it, UUID, name and CUDA_VISIBLE_DEVICES from the engine's system section;
    a failed run with no result keeps the actor's (null on a CPU worker)."""
    spec = SUITE.specs[0]
    outcome = ok_outcome(spec)
    outcome.result["system"].update(gpu_index=0, gpu_uuid="GPU-77aa5a8f", cuda_visible_devices="1")
    row = build_row(spec, "sr-1", outcome)
    assert (row["gpu_index"], row["gpu_uuid"], row["gpu_name"], row["cuda_visible_devices"]) == (
        0, "GPU-77aa5a8f", "NVIDIA H100 80GB HBM3", "1")
    pa.Table.from_pylist([row], schema=FILE_SCHEMA)
    docs = {f.name: f.metadata[b"doc"] for f in FILE_SCHEMA if f.name in ("gpu_index", "gpu_uuid", "cuda_visible_devices")}
    assert len(docs) == 3 and all(docs.values())
    cpu = RunOutcome("failed", "boom", None, {**FP, "gpu_name": None, "gpu_count": 0, "gpu_index": None,
                                              "gpu_uuid": None, "cuda_visible_devices": None}, "n", 0.0, 1.0)
    row = build_row(spec, "sr-1", cpu)
    assert (row["gpu_index"], row["gpu_uuid"], row["cuda_visible_devices"]) == (None, None, None)


def test_row_maps_the_engine_result_and_leaves_unknowns_null():
    spec = SUITE.specs[0]
    row = build_row(spec, "sr-1", ok_outcome(spec))
    assert list(row) != [] and set(row) == set(COLUMN_NAMES)
    assert row["schema_version"] == SCHEMA_VERSION and row["suite_run_id"] == "sr-1" and row["run_id"] == spec.run_id
    assert (row["ttft_ms"], row["decode_tok_s"], row["itl_p99_ms"], row["itl_ms"]) == (50.0, 117.6, 29.8, [10.0, 11.0, 30.0])
    assert (row["ssd_read_gbps"], row["ssd_read_bytes"], row["weight_h2d_gbps"], row["kv_d2h_gbps"]) == (5.0, 10**9, None, 1e-8)
    assert row["floor_decode_s"] is None and row["attainment_decode"] is None  # no roofline: null, not 0
    assert row["pinned_host_gb"] is None and row["gpu_alloc_gb"] == 1.5 and row["gpu_reserved_gb"] == 2.0
    # the engine's "system" does not know the NVMe device: the actor's fingerprint fills it, None never overrides
    assert (row["nvme_device"], row["nvme_model"], row["host"], row["device"]) == (
        "nvme0n1p4", "SAMSUNG MZQL23T8HCLS", "gpu-7", "cuda")
    assert row["hardware_key"] == hardware_key(FP) and row["hardware_key"].startswith("h100-80gb-hbm3x1-")
    assert row["output_token_ids"] == [[5, 6, 7, 8], [9, 9, 9, 9]] and row["warnings"] == ["page cache was warm"]
    assert json.loads(row["config_json"])["stream"]["mode"] == "gpu" and row["config_key"] == spec.config_key
    assert (row["model"], row["n_layers"], row["mode"], row["batch_size"], row["prompt_len"]) == ("tiny", 4, "gpu", 2, 128)
    assert (row["kv_gpu_gb"], row["kv_cpu_gb"], row["kv_ssd_gb"], row["kv_write_backoffs"]) == (0.5, 2.0, 0.0, 3)
    assert row["kv_ssd_gbps"] is None and row["kv_ssd_bytes"] is None  # no spill channel: null, not 0
    pa.Table.from_pylist([row], schema=FILE_SCHEMA)  # types fit the schema
    spilled = ok_outcome(spec)
    spilled.result["io"]["kv_ssd"] = {"bytes": 3 * 10**8, "busy_s": 0.1, "gbps": 3.0}
    spilled.result["metrics"].update(kv_ssd_gb=1.25, kv_write_backoffs=0)
    row = build_row(spec, "sr-1", spilled)
    kv = (row["kv_ssd_gbps"], row["kv_ssd_bytes"], row["kv_ssd_gb"], row["kv_write_backoffs"])
    assert kv == (3.0, 3 * 10**8, 1.25, 0)
    table = pa.Table.from_pylist([row], schema=FILE_SCHEMA)
    assert table.column("kv_ssd_bytes").type == pa.int64() and table.column("kv_ssd_gb").to_pylist() == [1.25]


def test_failed_row_without_a_host_has_only_what_is_known():
    spec = SUITE.specs[1]
    row = build_row(spec, "sr-1", failed_outcome())
    assert row["status"] == "failed" and row["error"].startswith("no live host")
    for col in ("host", "node_id", "hardware_key", "gpu_name", "ttft_ms", "started_at", "itl_ms", "output_token_ids",
                "n_params", "git_commit"):
        assert row[col] is None, col
    assert (row["mode"], row["batch_size"], row["max_new_tokens"]) == ("mixed", 2, 32)
    on_host = build_row(spec, "sr-1", RunOutcome("failed", "OOM", None, FP, "node-1", 1.0, 2.0))
    assert on_host["hardware_key"] == hardware_key(FP) and on_host["nvme_model"] == FP["nvme_model"]
    assert on_host["ttft_ms"] is None and on_host["started_at"].timestamp() == 1.0
    assert json.loads(row["config_json"])["batch_size"] == 2  # the resolved config even without a result


def test_write_is_one_hidden_temp_renamed_into_a_hive_partition(tmp_path):
    spec = SUITE.specs[0]
    path = write_row(str(tmp_path), build_row(spec, "sr-1", ok_outcome(spec)), "s", "2026-11-26")
    assert path == f"{tmp_path}/date=2026-11-26/suite=s/sr-1__{spec.run_id}.parquet"
    assert [p.name for p in Path(path).parent.iterdir()] == [Path(path).name]  # no temp left behind
    meta = pq.read_schema(path).metadata
    assert meta[b"streambench.schema_version"] == str(SCHEMA_VERSION).encode() and meta[b"streambench.suite"] == b"s"
    table = read_results(str(tmp_path))
    assert table.schema == SCHEMA and table.num_rows == 1
    assert table.column("suite").to_pylist() == ["s"] and table.column("date").to_pylist() == ["2026-11-26"]


@pytest.mark.parametrize("stage", ["write", "move"])
def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch, stage):
    spec = SUITE.specs[0]
    row = build_row(spec, "sr-1", ok_outcome(spec))
    blocker = None
    if stage == "write":
        def half_then_fail(table, where, filesystem=None, **kw):
            filesystem.open_output_stream(where).write(b"PAR1 half a file")
            raise OSError("disk full (simulated)")

        monkeypatch.setattr(results.pq, "write_table", half_then_fail)
    else:  # the rename fails: a directory squats on the final name
        blocker = tmp_path / "date=2026-11-26" / "suite=s" / f"sr-1__{spec.run_id}.parquet" / "x"
        blocker.parent.mkdir(parents=True)
        blocker.write_text("")
    with pytest.raises(OSError):
        write_row(str(tmp_path), row, "s", "2026-11-26")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == ([blocker] if blocker else [])
    if blocker is None:
        assert read_results(str(tmp_path)).num_rows == 0


def test_rewriting_a_run_replaces_its_row_and_recorded_reports_status(tmp_path):
    a, b = SUITE.specs
    write_row(str(tmp_path), build_row(a, "sr-1", failed_outcome("boom")), "s", "2026-11-26")
    write_row(str(tmp_path), build_row(b, "sr-1", ok_outcome(b)), "s", "2026-11-26")
    write_row(str(tmp_path), build_row(b, "other", ok_outcome(b)), "s", "2026-11-26")
    rec = recorded(str(tmp_path), "s", "sr-1")
    assert {k: v.status for k, v in rec.items()} == {a.run_id: "failed", b.run_id: "ok"}
    write_row(str(tmp_path), build_row(a, "sr-1", ok_outcome(a)), "s", "2026-11-26")
    table = read_results(str(tmp_path), suite_run_id="sr-1")
    assert sorted(table.column("status").to_pylist()) == ["ok", "ok"] and table.num_rows == 2
    assert recorded(str(tmp_path), "other-suite", "sr-1") == {} and recorded(str(tmp_path / "none"), "s", "x") == {}


def test_older_schema_files_read_with_missing_columns_null(tmp_path):
    spec = SUITE.specs[0]
    write_row(str(tmp_path), build_row(spec, "new", ok_outcome(spec)), "s", "2026-11-26")
    old_dir = tmp_path / "date=2026-01-01" / "suite=s"
    old_dir.mkdir(parents=True)
    old = pa.table({"schema_version": pa.array([0], pa.int32()), "suite_run_id": ["old"], "run_id": ["r0"],
                    "status": ["ok"], "ttft_ms": [42.0], "retired_column": ["ignored"]})
    pq.write_table(old, old_dir / "old__r0.parquet")
    table = read_results(str(tmp_path))
    assert table.schema == SCHEMA and table.num_rows == 2
    old_row = [r for r in table.to_pylist() if r["suite_run_id"] == "old"][0]
    assert old_row["ttft_ms"] == 42.0 and old_row["schema_version"] == 0
    assert old_row["decode_tok_s"] is None and old_row["itl_ms"] is None and old_row["date"] == "2026-01-01"
    assert old_row["kv_ssd_bytes"] is None and old_row["kv_gpu_gb"] is None  # columns added later read as null


def test_filters_and_columns(tmp_path):
    a, b = SUITE.specs
    write_row(str(tmp_path), build_row(a, "sr-1", ok_outcome(a)), "s", "2026-11-26")
    write_row(str(tmp_path), build_row(b, "sr-1", failed_outcome()), "s", "2026-11-26")
    write_row(str(tmp_path), build_row(a, "sr-2", ok_outcome(a)), "t", "2026-11-27")
    uri = str(tmp_path)
    assert read_results(uri).num_rows == 3
    assert read_results(uri, suite="t").column("suite_run_id").to_pylist() == ["sr-2"]
    assert read_results(uri, suite=["s", "t"], status="failed").column("run_id").to_pylist() == [b.run_id]
    assert read_results(uri, config_key=a.config_key).num_rows == 2
    assert read_results(uri, hardware_key=hardware_key(FP)).num_rows == 2
    assert read_results(uri, since=datetime.now(timezone.utc) + timedelta(hours=1)).num_rows == 0
    assert read_results(uri, until=datetime.now(timezone.utc) + timedelta(hours=1)).num_rows == 3
    import pyarrow.compute as pc

    assert read_results(uri, filter=pc.field("ttft_ms") > 10).num_rows == 2
    cols = read_results(uri, columns=["run_id", "ttft_ms", "suite"])
    assert cols.column_names == ["run_id", "ttft_ms", "suite"] and cols.num_rows == 3
    with pytest.raises(UserError, match="unknown result column 'nope'"):
        read_results(uri, columns=["nope"])
    assert read_results(str(tmp_path / "missing")).num_rows == 0


def test_pandas_and_duckdb_read_the_dataset_directly(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    pd = pytest.importorskip("pandas")
    a, b = SUITE.specs
    write_row(str(tmp_path), build_row(a, "sr-1", ok_outcome(a)), "s", "2026-11-26")
    write_row(str(tmp_path), build_row(b, "sr-1", failed_outcome()), "s", "2026-11-27")
    (tmp_path / "date=2026-11-27" / "suite=s" / ".sr-1__x.parquet.1234.tmp").write_bytes(b"half")  # a write in flight
    df = pd.read_parquet(tmp_path)
    assert len(df) == 2 and set(df["suite"].astype(str)) == {"s"} and df["ttft_ms"].notna().sum() == 1
    got = duckdb.sql(f"select suite, status, ttft_ms, len(itl_ms) as n from read_parquet('{tmp_path}/**/*.parquet', "
                     "hive_partitioning = true) order by status").fetchall()
    assert got == [("s", "failed", None, None), ("s", "ok", 50.0, 3)]


def test_unusable_uri_is_a_user_error():
    with pytest.raises(UserError, match="not a usable filesystem URI"):
        read_results("nosuchscheme://bucket/x")


def test_file_uri_works(tmp_path):
    spec = SUITE.specs[0]
    write_row(f"file://{tmp_path}", build_row(spec, "sr-1", ok_outcome(spec)), "s", "2026-11-26")
    assert read_results(f"file://{tmp_path}").num_rows == 1 and read_results(str(tmp_path)).num_rows == 1
