"""compressed-tensors checkpoints read as they are: W4A16 (`pack-quantized`, int4 in groups), W8A16
(`int-quantized`, int8 per channel) and FP8 weights (`float-quantized`, per channel or per tensor).

The checkpoint is made by the compressed-tensors package itself (its qparams, its quantizer and its
`PackedQuantizationCompressor.compress`, so the on-disk layout is the library's), and the pack's
dequantized weights are compared with the library's own `decompress`. Skipped where the package is
not installed (`pip install --no-deps compressed-tensors loguru`).
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

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import (  # noqa: E402
    FloatQuantizationCompressor,
    IntQuantizationCompressor,
    PackedQuantizationCompressor,
)
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402

GROUP = 32
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


SCHEMES = {  # name → (compressed-tensors format, compressor, weight args)
    "w4a16": ("pack-quantized", PackedQuantizationCompressor,
              dict(num_bits=4, type="int", symmetric=True, strategy="group", group_size=GROUP)),
    "w4a16-asym": ("pack-quantized", PackedQuantizationCompressor,
                   dict(num_bits=4, type="int", symmetric=False, strategy="group", group_size=GROUP)),
    "w8a16": ("int-quantized", IntQuantizationCompressor, dict(num_bits=8, type="int", symmetric=True,
                                                                strategy="channel")),
    "fp8-channel": ("float-quantized", FloatQuantizationCompressor, dict(num_bits=8, type="float", symmetric=True,
                                                                          strategy="channel")),
    "fp8-tensor": ("float-quantized", FloatQuantizationCompressor, dict(num_bits=8, type="float", symmetric=True,
                                                                         strategy="tensor")),
}


def _minmax(t: torch.Tensor, args: dict):
    if args["strategy"] == "group":
        g = t.reshape(t.shape[0], -1, GROUP)
        return g.amin(-1), g.amax(-1)
    if args["strategy"] == "channel":
        return t.amin(-1, keepdim=True), t.amax(-1, keepdim=True)
    return t.amin().reshape(1), t.amax().reshape(1)


def write_ct(base: Path, out: Path, kind: str, scale_dtype=torch.bfloat16, edit=None) -> dict:
    """A compressed-tensors copy of `base` (bf16) in scheme `kind`; returns name → the library's
    decompressed weight."""
    out.mkdir(parents=True)
    fmt, compressor, args = SCHEMES[kind]
    sch = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args))
    tensors, refs = {}, {}
    for f in base.glob("*.safetensors"):
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                t = st.get_tensor(name).to(torch.bfloat16)
                if not any(f".{p}." in name for p in PROJ):
                    tensors[name] = t
                    continue
                scale, zp = calculate_qparams(*_minmax(t, args), sch.weights)
                state = {"weight": t, "weight_scale": scale.to(scale_dtype), "weight_zero_point": zp}
                packed = compressor.compress(state, sch)
                stem = name.removesuffix(".weight")
                tensors.update({f"{stem}.{k}": v.contiguous() for k, v in packed.items()})
                refs[name] = compressor.decompress(packed, sch)["weight"]
    if edit:
        edit(tensors)
    write_published(base, out, tensors, "bfloat16", {
        "quant_method": "compressed-tensors", "format": fmt, "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None,
                                      "weights": sch.weights.model_dump(mode="json")}}})
    return refs


@pytest.fixture(scope="module")
def base(make_ckpt):
    return make_ckpt(layers=2, intermediate_size=768)


@pytest.mark.parametrize("kind", list(SCHEMES))
def test_the_pack_dequantizes_to_the_librarys_decompression(base, tmp_path, kind):
    refs = write_ct(base, tmp_path / "ct", kind)
    pack = ensure_pack(tmp_path / "ct", pack_dir=tmp_path / "p")
    want = {"pack-quantized": "int4", "int-quantized": "int8", "float-quantized": "fp8"}[SCHEMES[kind][0]]
    assert pack.manifest.weight_format == want
    assert {t.dtype for t in pack.manifest.tensors if t.short.endswith(".scales")} == {"bfloat16"}
    got = dict(dequantized_tensors(pack, torch.bfloat16))
    for name, ref in refs.items():
        assert ref.dtype == torch.bfloat16
        assert torch.equal(got[name], ref), (name, (got[name].float() - ref.float()).abs().max())


@pytest.mark.side
def test_bench_run_reads_it_and_modes_agree(base, tmp_path):
    ckpt = tmp_path / "ct"
    write_ct(base, ckpt, "w4a16-asym")
    toks = {}
    for mode in ("gpu", "ssd"):
        out = tmp_path / f"{mode}.json"
        r = bench("run", "--checkpoints", str(ckpt), "--mode", mode, "--prompt-len", "8", "--max-new-tokens", "3",
                  "--temperature", "0", "--no-roofline", "--out-json", str(out), timeout=300)
        assert r.returncode == 0, r.stderr
        doc = json.loads(out.read_text())
        assert doc["model"]["weight_format"] == "int4"
        toks[mode] = [o["token_ids"] for o in doc["outputs"]]
    assert toks["gpu"] == toks["ssd"]



def test_a_truncated_packed_tensor_and_unsupported_schemes_are_one_line(base, tmp_path, bench_here):
    ckpt = tmp_path / "ct"

    def cut(t):
        name = "model.layers.0.self_attn.o_proj.weight_packed"
        t[name] = t[name][:, :-1].contiguous()

    write_ct(base, ckpt, "w4a16", edit=cut)
    r = bench_here("pack", "--checkpoints", str(ckpt))
    one_line_exit_2(r, "tensor model.layers.0.self_attn.o_proj.weight_packed is [256, 31] I32, but a [256, 256] "
                       "weight needs [256, 32] I32")
    cfg = json.loads((ckpt / "config.json").read_text())
    w = cfg["quantization_config"]["config_groups"]["group_0"]["weights"]
    w.update(num_bits=8, type="float", strategy="block")
    cfg["quantization_config"]["format"] = "float-quantized"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    r = bench_here("pack", "--checkpoints", str(ckpt))
    one_line_exit_2(r, "compressed-tensors format 'float-quantized', weights num_bits=8 type='float' "
                       "strategy='block' is not supported")
    w.update(strategy="channel")
    cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "float",
                                                                                   "dynamic": True}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    r = bench_here("pack", "--checkpoints", str(ckpt))
    one_line_exit_2(r, "also quantizes activations (input_activations)", "only weight-only checkpoints are read")
    assert not (ckpt / ".streambench-pack").exists()
