"""`--accuracy-ref native`: a quantized run's teacher-forced agreement with the native weights.

The KL and top-1 functions against values computed by hand; the comparison itself against an
identity (a native engine against HF on the same checkpoint: agreement 1, KL ~0, which catches an
off-by-one in the positions compared); an int8 run close to native but not equal; the measured
numbers unchanged by the check; a native run with the flag refused; the row's columns.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from orchestrator.cluster.actor import RunOutcome
from orchestrator.results.schema import COLUMN_NAMES, build_row
from orchestrator.suite.load import parse_suite
from worker.quant.accuracy import divergence, measure_accuracy, summarize
from worker.engine import build_engine
from worker.generate import generate
from worker.pack.cache import ensure_pack
from worker.run import resolve_config, run

CPU = torch.device("cpu")


def test_kl_and_top1_by_hand():
    # p = (1/4, 3/4), q = (1/2, 1/2): KL = 1/4 ln(1/2) + 3/4 ln(3/2) = 3/4 ln 3 - ln 2; argmax 1 vs 0 (tie: 0)
    ref = torch.tensor([[0.0, math.log(3.0)], [2.0, -1.0]])
    got = torch.tensor([[0.0, 0.0], [2.0, -1.0]])
    kl, agree = divergence(ref, got)
    assert kl[0].item() == pytest.approx(0.75 * math.log(3) - math.log(2), rel=1e-6)
    assert kl[1].item() == 0.0
    assert agree.tolist() == [False, True]
    s = summarize(ref, got)
    assert s["positions"] == 2 and s["top1_agreement"] == 0.5
    assert s["mean_kl"] == pytest.approx((0.75 * math.log(3) - math.log(2)) / 2, rel=1e-6)
    # shifting logits by a constant changes no distribution
    assert divergence(ref + 7.0, ref)[0].abs().max().item() < 1e-6


def test_native_engine_against_hf_is_the_identity(tiny_ckpt):
    cfg = resolve_config({"checkpoints": str(tiny_ckpt), "mode": "gpu"})
    engine = build_engine(cfg, ensure_pack(tiny_ckpt), CPU)
    prompts = [list(range(5, 17)), list(range(40, 47))]
    gen = generate(engine.model, engine.new_cache(2, 64), prompts, 9, 0.0, 1.0, 0, (), 0, CPU)
    acc = measure_accuracy(engine, str(tiny_ckpt), prompts, gen.token_ids, 64, torch.float32, CPU)
    assert acc["positions"] == 18
    assert acc["top1_agreement"] == 1.0 and abs(acc["mean_kl"]) < 1e-6, acc


def _run(ckpt, tmp_path, **flat):
    base = {"checkpoints": str(ckpt), "mode": "cpu", "prompt_len": 24, "max_new_tokens": 12, "batch_size": 2,
            "temperature": 0, "roofline": False, "pack_dir": str(tmp_path / "pack"),
            "out_json": str(tmp_path / f"r{len(list(tmp_path.glob('r*.json')))}.json")}
    return run(resolve_config({**base, **flat}))


@pytest.fixture(scope="module")
def int8_runs(tiny_ckpt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("acc")
    return _run(tiny_ckpt, tmp, weight_format="int8", accuracy_ref="native"), _run(tiny_ckpt, tmp,
                                                                                  weight_format="int8")


def test_int8_agrees_closely_but_not_exactly(int8_runs):
    r, _ = int8_runs
    acc = r["accuracy"]
    assert acc["ref"] == "native" and acc["dtype"] == "float32"
    assert acc["positions"] == sum(len(o["token_ids"]) for o in r["outputs"]) == 24
    assert acc["top1_agreement"] >= 0.9, acc
    assert 0 < acc["mean_kl"] < 0.01, acc
    assert r["setup"]["accuracy_s"] > 0


def test_the_check_changes_no_measured_output(int8_runs):
    with_acc, without = int8_runs
    assert without["accuracy"] is None and without["setup"]["accuracy_s"] == 0
    assert [o["token_ids"] for o in with_acc["outputs"]] == [o["token_ids"] for o in without["outputs"]]
    assert with_acc["metrics"]["decode_steps"] == without["metrics"]["decode_steps"]


def test_row_has_the_accuracy_columns(int8_runs, tiny_ckpt):
    r, plain = int8_runs
    suite = parse_suite(f"name: acc\nmodels: [{{name: tiny, path: {tiny_ckpt}}}]\n"
                        "defaults: {weight_format: int8, accuracy_ref: native}\n")
    t = time.time()
    row = build_row(suite.specs[0], "acc-1", RunOutcome("ok", None, r, {"hostname": "box"}, "n", t - 1, t, "a" * 40,
                                                        False))
    assert {"accuracy_ref", "accuracy_positions", "top1_agreement", "mean_kl", "setup_accuracy_s"} <= set(COLUMN_NAMES)
    acc = r["accuracy"]
    assert (row["accuracy_ref"], row["accuracy_positions"], row["top1_agreement"], row["mean_kl"]) == (
        "native", acc["positions"], acc["top1_agreement"], acc["mean_kl"])
    row = build_row(suite.specs[0], "acc-1", RunOutcome("ok", None, plain, {"hostname": "box"}, "n", t - 1, t,
                                                        "a" * 40, False))
    assert row["accuracy_ref"] is None and row["top1_agreement"] is None


def test_native_with_accuracy_ref_is_refused_one_line_exit_2(tiny_ckpt, tmp_path, bench_here):
    out = tmp_path / "out.json"
    p = bench_here("run", "--checkpoints", str(tiny_ckpt), "--accuracy-ref", "native", "--out-json", str(out),
                   "--pack-dir", str(tmp_path / "pack"), cwd=tmp_path)
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = [line for line in p.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "accuracy_ref" in lines[0] and "weight_format" in lines[0], lines[0]
    assert not out.exists()


def test_prequantized_checkpoint_has_no_native_reference(tiny_ckpt, tmp_path):
    from worker.quant.accuracy import check_reference
    from worker.errors import UserError

    d = tmp_path / "awq"
    d.mkdir()
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "awq"}}))
    with pytest.raises(UserError, match="pre-quantized"):
        check_reference(str(d))
