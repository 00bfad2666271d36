"""`bench run` end to end through the console script: a real run, and bad input.

Bad input must end with one `error:` line naming the problem, exit code 2, no traceback, and no
result file written. Two cases, one for each of `cli.main`'s ways to exit 2 (our UserError, Click's
usage error), are real processes; the others run the command in this process (`bench_here`).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import benchcli
import pytest


def bench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return benchcli.bench(*args, cwd=cwd, timeout=300)


def test_run_writes_the_seed_json(tiny_ckpt, tmp_path):
    out = tmp_path / "r.json"
    p = bench("run", "--checkpoints", str(tiny_ckpt), "--mode", "ssd", "--prompt", "Hello, world!",
              "--batch-size", "2", "--max-new-tokens", "5", "--temperature", "0", "--no-roofline",
              "--pack-dir", str(tmp_path / "pack"), "--out-json", str(out), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    assert r["config"]["stream"]["mode"] == "ssd" and r["config"]["batch_size"] == 2
    m = r["metrics"]
    for key in ("ttft_ms", "prefill_ms", "decode_ms", "decode_tok_s", "e2e_ms", "host_rss_gb"):
        assert m[key] > 0, key
    assert len(m["itl_ms"]) == m["decode_steps"] == 4
    assert r["io"]["ssd_read"]["bytes"] > 0
    assert len(r["outputs"]) == 2 and r["outputs"][0] == r["outputs"][1]  # one prompt, cycled
    o = r["outputs"][0]
    assert len(o["token_ids"]) == 5 and isinstance(o["text"], str) and o["prompt_token_ids"]
    assert "TTFT" in p.stdout


@pytest.fixture()
def non_llama(tmp_path):
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    return d


REAL_PROCESS = ("missing-checkpoint", "no-checkpoint")


@pytest.mark.parametrize("case", ["missing-checkpoint", "non-llama", "new-tokens-too-many", "empty-prompt-file",
                                  "no-checkpoint", "bad-mode"])
def test_bad_input_is_one_line_exit_2_nothing_written(case, tiny_ckpt, non_llama, tmp_path, bench_here):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    args = {
        "missing-checkpoint": ["--checkpoints", str(tmp_path / "nope")],
        "non-llama": ["--checkpoints", str(non_llama)],
        "new-tokens-too-many": ["--checkpoints", str(tiny_ckpt), "--max-new-tokens", "64", "--max-seq-len", "64"],
        "empty-prompt-file": ["--checkpoints", str(tiny_ckpt), "--prompts", str(empty)],
        "no-checkpoint": [],
        "bad-mode": ["--checkpoints", str(tiny_ckpt), "--mode", "disk"],
    }[case]
    out = tmp_path / "out.json"
    run = bench if case in REAL_PROCESS else bench_here
    p = run("run", *args, "--out-json", str(out), "--pack-dir", str(tmp_path / "pack"), cwd=tmp_path)
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = [line for line in p.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert not out.exists()
    expected = {"missing-checkpoint": "does not exist", "non-llama": "only Llama",
                "new-tokens-too-many": "max_new_tokens", "empty-prompt-file": "empty",
                "no-checkpoint": "--checkpoints is required", "bad-mode": "disk"}[case]
    assert expected in lines[0]
