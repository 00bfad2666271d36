"""AWQ int4 GEMM checkpoints, read as they are (no user-visible conversion).

The tests build the checkpoint in AWQ's exact on-disk layout here (AutoAWQ's quantization and its
interleaved packing, written out independently of the engine), then check that the pack dequantizes
to exactly AWQ's own values, that every mode agrees bit for bit, that fp32 equals HF on the
dequantized checkpoint, and that broken or unsupported AWQ checkpoints are one-line errors.
(The compressed-tensors package has no AWQ decompressor, so the reference is computed here.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from benchcli import bench, one_line_exit_2
from packhelp import write_published
from safetensors import safe_open

from worker.pack.cache import ensure_pack
from worker.quant.export import dequantized_tensors

GROUP = 64
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def awq_quantize(w: torch.Tensor, group: int):
    """AutoAWQ's zero-point quantization of a Linear weight (out, in): int values, zeros, fp16 scales
    per (out, group), and the dense values they stand for, in float32."""
    out, inn = w.shape
    g = w.float().reshape(out, inn // group, group)
    mx, mn = g.amax(-1), g.amin(-1)
    scales = ((mx - mn).clamp(min=1e-5) / 15).half()
    s = scales.float()
    zeros = (-torch.round(mn / s)).clamp(0, 15)
    q = (torch.round(g / s[..., None]) + zeros[..., None]).clamp(0, 15)
    dense = ((q - zeros[..., None]) * s[..., None]).reshape(out, inn)
    return q.reshape(out, inn).int(), zeros.int(), scales, dense


def pack_awq(intweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's packing: (R, C) ints → (R, C/8) int32, nibble i of column block holds ORDER[i]."""
    packed = torch.zeros(intweight.shape[0], intweight.shape[1] // 8, dtype=torch.int32)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            packed[:, col] |= intweight[:, col * 8 + ORDER[i]] << (i * 4)
    return packed


def write_awq(base: Path, out: Path, edit=None) -> dict[str, torch.Tensor]:
    """An AWQ (gemm, group GROUP, fp16) copy of checkpoint `base`; returns name → dense reference."""
    out.mkdir(parents=True)
    tensors, refs = {}, {}
    for f in base.glob("*.safetensors"):
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                t = st.get_tensor(name)
                if any(f".{p}." in name for p in PROJ):
                    q, z, s, dense = awq_quantize(t, GROUP)
                    stem = name.removesuffix(".weight")
                    tensors[f"{stem}.qweight"] = pack_awq(q.t().contiguous())
                    tensors[f"{stem}.qzeros"] = pack_awq(z.t().contiguous())
                    tensors[f"{stem}.scales"] = s.t().contiguous()
                    refs[name] = dense
                else:
                    tensors[name] = t.half()
    if edit:
        edit(tensors)
    write_published(base, out, tensors, "float16", {"quant_method": "awq", "bits": 4, "group_size": GROUP,
                                                    "version": "gemm", "zero_point": True})
    return refs


@pytest.fixture(scope="module")
def base(make_ckpt):
    return make_ckpt(layers=3, intermediate_size=768)


@pytest.fixture(scope="module")
def awq(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("awq") / "ckpt"
    return out, write_awq(base, out)


def test_the_pack_dequantizes_to_awqs_own_values(awq, tmp_path):
    ckpt, refs = awq
    pack = ensure_pack(ckpt, pack_dir=tmp_path)
    m = pack.manifest
    assert m.weight_format == "int4" and m.group_size == GROUP and m.dtype == "float16"
    assert {t.dtype for t in m.tensors if t.short.endswith(".scales")} == {"float16"}
    got = dict(dequantized_tensors(pack, torch.float32))
    assert set(refs) <= set(got)
    for name, ref in refs.items():
        assert torch.equal(got[name], ref), name


def _logits(ckpt, **flat):
    from worker.engine import build_engine
    from worker.generate import generate
    from worker.run import resolve_config
    from worker.text.prompts import prompt_ids_for
    from worker.text.checkpoint import load_tokenizer

    cfg = resolve_config({"checkpoints": str(ckpt), "temperature": 0, "max_new_tokens": 4, "prompt_len": 20,
                          "max_seq_len": 48, **flat})
    engine = build_engine(cfg, ensure_pack(ckpt, dtype=None if cfg.dtype == "auto" else cfg.dtype,
                                           weights=cfg.weights), torch.device("cpu"))
    try:
        ids = prompt_ids_for(load_tokenizer(ckpt), cfg)
        return generate(engine.model, engine.new_cache(1, 48), ids, 4, 0.0, 1.0, 0, (), 0, torch.device("cpu"),
                        keep_logits=True)
    finally:
        engine.close()


def test_every_mode_equals_gpu_mode_on_an_awq_checkpoint(awq):
    ref = _logits(awq[0], mode="gpu", dtype="float32")
    for flat in (dict(mode="cpu"), dict(mode="ssd", staging_mb=1), dict(mode="mixed", gpu_cached_layers=1,
                                                                         cpu_cache_layers=1)):
        got = _logits(awq[0], dtype="float32", **flat)
        assert all(torch.equal(a, b) for a, b in zip(got.logits, ref.logits)), flat


def test_fp32_equals_hf_on_the_dequantized_awq_checkpoint(awq, tmp_path):
    from transformers import LlamaForCausalLM

    from worker.engine import build_engine
    from worker.model.step import Step
    from worker.quant.export import dequantize_pack
    from worker.run import resolve_config

    ckpt = awq[0]
    pack = ensure_pack(ckpt, dtype="float32")
    hf = LlamaForCausalLM.from_pretrained(dequantize_pack(pack, tmp_path / "deq"), dtype=torch.float32).eval()
    engine = build_engine(resolve_config({"checkpoints": str(ckpt), "dtype": "float32"}), pack, torch.device("cpu"))
    ids = torch.randint(0, 980, (2, 23), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf(ids).logits
    got = engine.model.forward(ids, Step(torch.arange(23).expand(2, 23), 23), engine.new_cache(2, 32))
    assert (got - ref).norm() / ref.norm() < 1e-5


def test_bench_run_reads_it_without_being_asked(awq, tmp_path):
    out = tmp_path / "r.json"
    r = bench("run", "--checkpoints", str(awq[0]), "--mode", "cpu", "--prompt-len", "8", "--max-new-tokens", "2",
              "--temperature", "0", "--no-roofline", "--pack-dir", str(tmp_path / "p"), "--out-json", str(out),
              timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["model"]["weight_format"] == "int4"



def _truncate(tensors):
    name = "model.layers.1.mlp.down_proj.qweight"
    tensors[name] = tensors[name][:-1].contiguous()


def test_a_truncated_awq_tensor(base, tmp_path, bench_here):
    ckpt = tmp_path / "awq"
    write_awq(base, ckpt, edit=_truncate)
    r = bench_here("pack", "--checkpoints", str(ckpt))
    one_line_exit_2(r, "tensor model.layers.1.mlp.down_proj.qweight is [767, 32] I32, but a [256, 768] weight "
                       "needs [768, 32] I32")
    assert not (ckpt / ".streambench-pack" / "float16.int4-g64.blob").exists()


def test_an_unsupported_awq_variant_or_another_format(base, tmp_path, bench_here):
    ckpt = tmp_path / "awq"
    write_awq(base, ckpt)
    r = bench_here("pack", "--checkpoints", str(ckpt), "--weight-format", "int8")
    one_line_exit_2(r, "holds awq int4 (group 64) weights; it packs only as it is")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"]["version"] = "gemv"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    r = bench_here("pack", "--checkpoints", str(ckpt))
    one_line_exit_2(r, "version='gemv'", "only 4-bit GEMM with zero points")
    assert not (ckpt / ".streambench-pack").exists()
