"""Bad input found by the adversarial pass (issue 12): each is one `error:` line, exit code 2, no
traceback and nothing written; before the fix each was a traceback or a silent success.

Most cases run the command in this process (`bench_here`); one per command, at least, is a real `bench`
process, for what only a process shows (what its start-up prints, its exit status)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from benchcli import bench, one_line_exit_2

from worker.errors import UserError
from worker.model.geometry import ModelConfig


def bad_config(ckpt: Path, tmp_path: Path, edit) -> Path:
    """A copy of `ckpt` whose config.json went through `edit(dict) -> object`."""
    out = tmp_path / "bad"
    shutil.copytree(ckpt, out, ignore=shutil.ignore_patterns(".streambench-pack"))
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(edit(cfg)))
    return out


def with_(**kw):
    return lambda c: {**c, **kw}


def without(key):
    return lambda c: {k: v for k, v in c.items() if k != key}


@pytest.mark.parametrize("edit,expected", [
    (lambda c: [c], "a config.json is a JSON object of the model's settings, not a list"),
    (with_(num_attention_heads=0), "num_attention_heads must be >= 1 (got 0)"),
    (without("num_attention_heads"), "required key 'num_attention_heads' is missing"),
    (with_(num_hidden_layers=0), "num_hidden_layers must be >= 1 (got 0)"),
    (with_(num_hidden_layers=-2), "num_hidden_layers must be >= 1 (got -2)"),
    (with_(num_key_value_heads=3), "num_attention_heads (8) must be a multiple of num_key_value_heads (3)"),
    (with_(head_dim=33), "head_dim (33) must be even"),
    (with_(eos_token_id=[5, 99999]), "eos_token_id 99999 is outside the vocabulary (vocab_size 1000)"),
    (with_(hidden_size="wide"), "hidden_size: Input should be a valid integer"),
    (with_(rope_scaling=[1]), "rope_scaling must be an object or null"),
    (with_(torch_dtype="int8", dtype=None), "dtype: Input should be 'bfloat16', 'float16' or 'float32'"),
])
def test_a_bad_model_config_is_refused_where_it_is_read(tiny_ckpt, tmp_path, edit, expected):
    with pytest.raises(UserError) as e:
        ModelConfig.from_hf_dir(bad_config(tiny_ckpt, tmp_path, edit))
    assert expected in str(e.value) and str(e.value).startswith(str(tmp_path / "bad" / "config.json"))


@pytest.mark.parametrize("edit,expected", [
    (lambda c: [c], "not a list"),
    (with_(num_attention_heads=0), "num_attention_heads must be >= 1"),
    (with_(num_hidden_layers=-2), "num_hidden_layers must be >= 1 (got -2)"),
])
def test_bench_run_on_a_bad_config_is_one_line(tiny_ckpt, tmp_path, bench_here, edit, expected):
    ckpt = bad_config(tiny_ckpt, tmp_path, edit)
    r = bench_here("run", "--checkpoints", str(ckpt), "--out-json", str(tmp_path / "r.json"), cwd=tmp_path)
    one_line_exit_2(r, expected)
    assert not (tmp_path / "r.json").exists() and not (ckpt / ".streambench-pack").exists()


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    from packhelp import make_checkpoint

    from worker.pack.packer import pack_checkpoint

    d = tmp_path_factory.mktemp("packed")
    ckpt = make_checkpoint(d / "ckpt")
    pack_checkpoint(ckpt, d / "w.blob", d / "m.json")
    return d


@pytest.mark.parametrize("cmd", ["verify", "probe"])
def test_a_directory_given_as_a_device_is_one_line(packed, tmp_path, cmd):
    args = ["verify", "--manifest", str(packed / "m.json"), "--raw-device", str(tmp_path)] if cmd == "verify" \
        else ["probe", "--path", "/dev/null", "--quick"]
    r = bench(*args)
    one_line_exit_2(r, "is a directory: give the blob file" if cmd == "verify" else
                    "/dev/null is neither a regular file nor a block device")
    assert "9223372036854775807" not in r.stderr


def test_an_unreadable_device_is_one_line(packed, monkeypatch):
    """As root every node opens; what an ordinary user meets is simulated at the one open that fails."""
    import os

    from worker.pack import blob

    real = os.open

    def denied(path, flags, *a):
        if str(path) == str(packed / "w.blob") and not flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, flags, *a)

    monkeypatch.setattr(blob.os, "open", denied)
    with pytest.raises(UserError, match=r"cannot open blob .*w.blob: permission denied"):
        blob.Pack.open(packed / "m.json")


@pytest.fixture(scope="module")
def dataset_with_strays(tmp_path_factory):
    """A results dataset of 8 nights plus a random-bytes `.parquet` and a Parquet file of another schema."""
    import os

    import fakerows
    import pyarrow as pa
    import pyarrow.parquet as pq

    uri = tmp_path_factory.mktemp("strays") / "res"
    rows = fakerows.history(fakerows.suite(), ["h100-a"], nights=8, noise=0.01)
    fakerows.write(str(uri), rows)
    day = next(uri.glob("date=*/suite=*"))
    (day / "garbage.parquet").write_bytes(os.urandom(4096))
    pq.write_table(pa.table({"x": [1, 2, 3]}), day / "someone-elses.parquet")
    return uri, rows


@pytest.mark.parametrize("cmd", ["results", "compare", "regress", "report"])
def test_stray_files_in_the_dataset_are_skipped_with_one_warning(dataset_with_strays, tmp_path, bench_here, cmd):
    uri, rows = dataset_with_strays
    extra = ["--out", str(tmp_path / "r.html")] if cmd == "report" else []
    r = bench_here(cmd, "--results", str(uri), *extra)
    assert r.returncode in (0, 3), (r.returncode, r.stdout, r.stderr)  # regress: never 1 over a bad file
    assert "Traceback" not in r.stderr and "ArrowInvalid" not in r.stderr + r.stdout
    err = " ".join(r.stderr.split())
    assert "skipped 2 file(s)" in err and "garbage.parquet (unreadable" in err and "someone-elses.parquet (no" in err


def test_stray_files_do_not_count_as_runs(dataset_with_strays):
    from orchestrator.results.store import read_results

    uri, rows = dataset_with_strays
    got = read_results(str(uri), columns=["run_id", "status"]).to_pylist()
    assert len(got) == len(rows) and all(r["status"] == "ok" for r in got)


def test_an_empty_matrix_list_is_refused(tiny_ckpt, tmp_path, bench_here):
    suite = tmp_path / "s.yaml"
    suite.write_text(f"name: s\nmodels: [{{name: t, path: {tiny_ckpt}}}]\nmatrix: []\n")
    one_line_exit_2(bench_here("submit", str(suite), "--dry-run"), "matrix: an empty list plans no runs")


@pytest.mark.parametrize("cmd", ["results", "compare"])
def test_reading_a_dataset_that_does_not_exist_is_an_error(tmp_path, bench_here, cmd):
    """(`regress` says "not enough data", exit 3, and `report` writes a page saying there are no runs:
    both what a nightly job wants before its first night.)"""
    one_line_exit_2(bench_here(cmd, "--results", str(tmp_path / "nosuchdir"), cwd=tmp_path),
                    "nosuchdir does not exist")


def test_results_that_is_a_file_fails_before_ray_starts(tiny_ckpt, tmp_path):
    import time

    f = tmp_path / "results.txt"
    f.write_text("not a dataset")
    t0 = time.monotonic()
    r = bench("submit", "--results", str(f))
    one_line_exit_2(r, "results.txt is a file, not a results directory")
    assert time.monotonic() - t0 < 20 and "Ray" not in r.stderr and f.read_text() == "not a dataset"


def test_a_negative_limit_is_refused(dataset_with_strays):
    one_line_exit_2(bench("results", "--results", str(dataset_with_strays[0]), "--limit", "-3"),
                    "Invalid value for '--limit'")


class _Boom:
    """Unpickling this runs code: it leaves a file behind, the proof that a pickle was loaded."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.side
@pytest.mark.parametrize("shards", ["renamed", "without-index", "kept"])
def test_the_peer_never_loads_a_pickle(tiny_ckpt, tmp_path, bench_here, shards):
    import pickle

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt, ignore=shutil.ignore_patterns(".streambench-pack"))
    marker = tmp_path / "pickle-ran"
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": _Boom(str(marker))}))
    if shards == "renamed":  # only the pickle looks like weights
        for f in ckpt.glob("*.safetensors"):
            f.rename(f.with_suffix(".st"))
    if shards != "kept":  # shards without their index: transformers would fall back to the pickle
        (ckpt / "model.safetensors.index.json").unlink(missing_ok=True)
    run = bench if shards == "kept" else bench_here  # the run of the peer is a real process, the refusals run here
    r = run("run", "--checkpoints", str(ckpt), "--engine", "accelerate", "--mode", "cpu", "--prompt-len", "4",
            "--max-new-tokens", "2", "--max-seq-len", "16", "--out-json", str(tmp_path / "r.json"), cwd=tmp_path)
    assert not marker.exists()
    if shards == "kept":
        assert r.returncode == 0, r.stderr  # the safetensors are what it loads
    else:
        one_line_exit_2(r, {"renamed": "has no *.safetensors files",
                            "without-index": "safetensors only: transformers finds no model.safetensors"}[shards])


def test_version_names_the_package_and_the_checkouts_commit():
    import re
    import subprocess

    from worker import __version__

    r = bench("--version")
    assert r.returncode == 0 and r.stdout.startswith(f"streambench {__version__}"), r
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    if head.returncode == 0:  # a checkout: its commit is named
        assert re.search(rf"\(commit {head.stdout.strip()[:12]}", r.stdout), r.stdout


@pytest.mark.parametrize("flag,value,expected", [
    ("--group-prefetch-depth", "0", "group_prefetch_depth must be >= 1 (got 0)"),
    ("--out-json", "DIR", "--out-json DIR is a directory: give a file name"),
    ("--topk-key-bits", "5", "topk_key_bits must be <= 4 (got 5)"),
    ("--topk-key-bits", "0", "topk_key_bits must be >= 1 (got 0)"),
])
def test_run_flags_checked_before_any_work(tiny_ckpt, tmp_path, bench_here, flag, value, expected):
    value = value.replace("DIR", str(tmp_path))
    r = bench_here("run", "--checkpoints", str(tiny_ckpt), flag, value, "--pack-dir", str(tmp_path / "pack"),
                   cwd=tmp_path)
    one_line_exit_2(r, expected.replace("DIR", str(tmp_path)))
    assert not (tmp_path / "pack").exists()  # nothing packed, nothing measured


def test_out_json_that_is_not_a_regular_file_is_refused(tiny_ckpt, tmp_path):
    """(A device node as --out-json was replaced by the JSON: the write is temp file + rename.)"""
    import os

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    r = bench("run", "--checkpoints", str(tiny_ckpt), "--out-json", str(fifo), "--pack-dir", str(tmp_path / "pack"),
              cwd=tmp_path)
    one_line_exit_2(r, "exists and is not a regular file")
    assert fifo.is_fifo() and not (tmp_path / "pack").exists()


def test_out_json_on_a_full_disk_fails_before_the_run(tmp_path, monkeypatch):
    import errno
    import os

    from worker import files as result

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(result.os, "fsync", full)
    with pytest.raises(UserError, match="r.json cannot be written .No space left on device"):
        result.check_output_file(tmp_path / "r.json", "--out-json")
    assert list(tmp_path.iterdir()) == []  # the probe is gone too
    monkeypatch.undo()
    result.check_output_file(tmp_path / "r.json", "--out-json")
    assert not os.path.exists(tmp_path / "r.json")


def test_a_full_disk_is_one_line_and_leaves_no_partial_checkpoint(tmp_path, monkeypatch, capsys):
    """Found on the H200: `bench make-model` on a full disk ended in an OSError traceback."""
    import errno
    import os

    from benchcli import bench_inprocess

    import worker.synth.checkpoints as checkpoints

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoints, "write_weights", full)
    out = tmp_path / "m"
    r = bench_inprocess(monkeypatch, capsys, "-v", "WARNING", "make-model", str(out), "--preset", "tiny",
                        "--layers", "1")
    one_line_exit_2(r, "no space left on device", "bench make-model", "free space")
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor its temporary directory


def test_other_os_errors_keep_their_traceback(tmp_path, monkeypatch, capsys):
    """Only a full disk is the user's to fix; another I/O failure may be a bug and must stay visible."""
    import errno

    from benchcli import bench_inprocess

    import worker.synth.checkpoints as checkpoints

    def broken(*a, **kw):
        raise OSError(errno.EIO, "input/output error")

    monkeypatch.setattr(checkpoints, "write_weights", broken)
    with pytest.raises(OSError):
        bench_inprocess(monkeypatch, capsys, "make-model", str(tmp_path / "m"), "--preset", "tiny", "--layers", "1")
