"""Results on object storage (`--results s3://...`), against an S3-compatible server started on
loopback (moto's server mode), through the same pyarrow filesystem code a real bucket sees."""

from __future__ import annotations

import logging
import time

import pytest
from benchcli import bench

moto_server = pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    import os

    import pyarrow.fs as pafs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server._server.server_address[:2]
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", region="us-east-1",
                      allow_bucket_creation=True).create_dir("bench")
    yield f"s3://bench/results?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    server.stop()
    for k, v in old.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_rows_written_read_and_resumed_on_s3(s3):
    import fakerows

    from orchestrator.cluster.lease import claim
    from orchestrator.results.store import check_writable, read_results, recorded

    check_writable(s3)
    rows = fakerows.history(fakerows.suite(), ["h100-a"], nights=6, noise=0.01)
    with claim(s3, rows[-1]["suite_run_id"]):  # the claim lives in the bucket too, and readers skip it
        fakerows.write(s3, rows)
        got = read_results(s3, columns=["run_id", "suite_run_id", "status"]).to_pylist()
    assert len(got) == len(rows) and {r["run_id"] for r in got} == {r["run_id"] for r in rows}
    last = rows[-1]["suite_run_id"]
    done = recorded(s3, "nightly", last)
    assert set(done) == {r["run_id"] for r in rows if r["suite_run_id"] == last}
    assert all(v.status == "ok" for v in done.values())


def test_the_cli_reads_an_s3_dataset(s3):
    t0 = time.monotonic()
    r = bench("results", "--results", s3, "--format", "json")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count('"run_id"') > 10
    r = bench("regress", "--results", s3)
    assert r.returncode == 0 and "no regression" in r.stdout, (r.stdout, r.stderr)  # 5 quiet nights, then a 6th
    assert time.monotonic() - t0 < 60
