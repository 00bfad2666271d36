"""Bad input around weight formats: each is one `error:` line naming what is wrong and how to fix it,
exit code 2, no traceback, and nothing written (no pack, no cache directory, no output directory).

Most cases run the command in this process (`bench_here`); the odd group size and the end-to-end test
are real `bench` processes, for what only a process shows (what its start-up prints, its exit status)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from benchcli import bench, one_line_exit_2

from worker.config import RunConfig
from worker.errors import UserError
from worker.pack.cache import ensure_pack
from worker.quant.formats import WeightSpec


@pytest.fixture()
def fresh(tiny_ckpt, tmp_path) -> Path:
    """A copy of the tiny checkpoint with no pack cache yet (hidden 256, intermediate 688)."""
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, out, ignore=shutil.ignore_patterns(".streambench-pack"))
    return out


@pytest.mark.parametrize("cmd", ["run", "pack"])
def test_an_unknown_weight_format(fresh, bench_here, cmd):
    r = bench_here(cmd, "--checkpoints", str(fresh), "--weight-format", "int3")
    one_line_exit_2(r, "--weight-format", "'int3' is not one of 'native', 'int8', 'int4', 'fp8'")
    assert not (fresh / ".streambench-pack").exists()


def test_an_unknown_weight_format_as_a_suite_key():
    with pytest.raises(UserError) as e:
        RunConfig.from_flat({"weight_format": "fp4"}, where="suite smoke, point 1")
    assert "weight_format" in str(e.value) and "'native', 'int8', 'int4' or 'fp8'" in str(e.value)
    from orchestrator.suite.load import parse_suite

    with pytest.raises(UserError) as e:
        parse_suite("name: q\nmodels: [{name: t, preset: tiny}]\ndefaults: {weight_format: int3}\n", source="q.yaml")
    assert str(e.value).startswith("q.yaml") and "weight_format: Input should be 'native'" in str(e.value)
    specs = parse_suite("name: q\nmodels: [{name: t, preset: tiny}]\nmatrix: {weight_format: [native, int4]}\n",
                        source="q.yaml").specs
    assert [s.flat["weight_format"] for s in specs] == ["native", "int4"] and specs[0].config_key != specs[1].config_key


@pytest.mark.parametrize("cmd", ["run", "pack"])
def test_a_group_size_that_does_not_divide_the_input_dimension(fresh, bench_here, cmd):
    r = bench_here(cmd, "--checkpoints", str(fresh), "--weight-format", "int4", "--quant-group-size", "128")
    one_line_exit_2(r, "quant_group_size 128 does not divide the input dimension 688 of down_proj",
                    "choose a group size that divides it (e.g. 16)")
    assert not (fresh / ".streambench-pack").exists()


def test_an_odd_group_size(fresh):
    r = bench("pack", "--checkpoints", str(fresh), "--weight-format", "int4", "--quant-group-size", "7")
    one_line_exit_2(r, "quant_group_size must be an even number")
    r = bench("run", "--checkpoints", str(fresh), "--weight-format", "int4", "--quant-group-size", "7")
    one_line_exit_2(r, "quant_group_size must be even")
    assert not (fresh / ".streambench-pack").exists()


@pytest.fixture()
def int8_pack(fresh, tmp_path):
    pack = ensure_pack(fresh, pack_dir=tmp_path / "packs", weights=WeightSpec("int8"))
    pack.close()
    return pack.manifest_path


def _edit(manifest: Path, edit) -> None:
    d = json.loads(manifest.read_text())
    edit(d)
    manifest.write_text(json.dumps(d))


def _truncate_qweight(d):
    t = next(t for t in d["tensors"] if t["short"] == "q_proj.qweight")
    t["shape"][0] -= 1
    t["nbytes"] -= t["shape"][1]


def _drop_scales(d):
    d["tensors"] = [t for t in d["tensors"] if t["short"] != "down_proj.scales"]


@pytest.mark.parametrize("edit,expected", [
    (_truncate_qweight, "q_proj.qweight (int8) is [255, 256] int8, but a [256, 256] weight needs [256, 256] int8"),
    (_drop_scales, "down_proj (int8) has parts ['qweight'], expected ['qweight', 'scales']"),
])
@pytest.mark.parametrize("cmd", ["verify", "run"])
def test_a_truncated_quantized_tensor_in_a_pack(fresh, int8_pack, tmp_path, bench_here, edit, expected, cmd):
    _edit(int8_pack, edit)
    out = tmp_path / "r.json"
    extra = ["--checkpoints", str(fresh), "--weight-format", "int8", "--out-json", str(out),
             "--no-roofline"] if cmd == "run" else []
    r = bench_here(cmd, "--manifest", str(int8_pack), *extra)
    one_line_exit_2(r, expected, "re-pack with `bench pack`")
    assert not out.exists()


def test_a_truncated_quantized_blob(int8_pack, bench_here):
    blob = int8_pack.with_name(int8_pack.name.replace(".manifest.json", ".blob"))
    with open(blob, "r+b") as f:
        f.truncate(blob.stat().st_size - 4096)
    r = bench_here("verify", "--manifest", str(int8_pack))
    one_line_exit_2(r, "bytes but its manifest says", "re-pack with `bench pack`")


def test_a_manifest_of_another_format_than_asked(fresh, int8_pack, tmp_path, bench_here):
    r = bench_here("run", "--checkpoints", str(fresh), "--manifest", str(int8_pack), "--weight-format", "int4",
                   "--quant-group-size", "16",
                   "--out-json", str(tmp_path / "r.json"), "--no-roofline")
    one_line_exit_2(r, "holds int8 weights but int4 (group 16) was asked", "pass --weight-format int8")
    assert not (tmp_path / "r.json").exists()


def test_an_unknown_quant_method(fresh, bench_here):
    cfg = json.loads((fresh / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (fresh / "config.json").write_text(json.dumps(cfg))
    for cmd in ("pack", "run"):
        r = bench_here(cmd, "--checkpoints", str(fresh))
        one_line_exit_2(r, "quantization_config.quant_method 'gptq' is not supported",
                        "(supported: 'awq', 'compressed-tensors')",
                        "pack it with --weight-format int8 or int4")
    assert not (fresh / ".streambench-pack").exists()


def test_the_peer_refuses_a_weight_format(fresh, bench_here):
    r = bench_here("run", "--checkpoints", str(fresh), "--engine", "accelerate", "--weight-format", "int8")
    one_line_exit_2(r, "weight_format int8 is for the streaming engine")


def test_dequantize_never_writes_over_anything(fresh, tmp_path, bench_here):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    for out, expected in ((tmp_path / "full", "exists and is not an empty directory"),
                          (fresh, "exists and is not an empty directory"),
                          (tmp_path / "nowhere" / "deq", "does not exist")):
        r = bench_here("dequantize", "--checkpoints", str(fresh), "--weight-format", "int8", "--out", str(out))
        one_line_exit_2(r, expected)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert not (fresh / ".streambench-pack").exists()  # refused before packing


@pytest.mark.side
def test_bench_pack_run_and_dequantize_end_to_end(fresh, tmp_path):
    r = bench("pack", "--checkpoints", str(fresh), "--weight-format", "int4", "--quant-group-size", "16")
    assert r.returncode == 0 and "int4 weights" in r.stdout, r.stderr
    out = tmp_path / "r.json"
    r = bench("run", "--checkpoints", str(fresh), "--weight-format", "int4", "--quant-group-size", "16", "--mode",
              "cpu", "--prompt-len", "8", "--max-new-tokens", "3", "--temperature", "0", "--no-roofline",
              "--out-json", str(out), timeout=300)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc["model"]["weight_format"] == "int4" and doc["config"]["weight_format"] == "int4"
    assert doc["model"]["weight_bytes"] < 0.5 * doc["model"]["n_params"] * 4  # native head and embeddings: fp32
    r = bench("dequantize", "--checkpoints", str(fresh), "--weight-format", "int4", "--quant-group-size", "16",
              "--out", str(tmp_path / "deq"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "deq" / "config.json").exists() and not list(tmp_path.glob(".deq.tmp*"))
