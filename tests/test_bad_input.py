"""Bad input found by the adversarial pass (issue 12): each is one `error:` line, exit code 2, no
traceback and nothing written; before the fix each was a traceback or a silent success."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from benchcli import bench

from worker.errors import UserError
from worker.model.geometry import ModelConfig


def one_line_exit_2(r, expected: str) -> None:
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr, r.stderr
    assert expected in " ".join(lines[0].split()), lines[0]


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
def test_bench_run_on_a_bad_config_is_one_line(tiny_ckpt, tmp_path, edit, expected):
    ckpt = bad_config(tiny_ckpt, tmp_path, edit)
    r = bench("run", "--checkpoints", str(ckpt), "--out-json", str(tmp_path / "r.json"), cwd=tmp_path)
    one_line_exit_2(r, expected)
    assert not (tmp_path / "r.json").exists() and not (ckpt / ".streambench-pack").exists()
