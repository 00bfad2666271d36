"""The quantizer against references computed here, and what a quantized pack holds.

The error bounds are the formats' promises: int8 |w - deq| <= s / 2 per output channel, int4
|w - deq| <= s / 2 per group of inputs. The references dequantize with plain Python integer and
bit arithmetic, not the engine's functions, and the nibble order is checked on hand-made values.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from worker.pack import packer
from worker.pack.blob import Pack
from worker.pack.cache import ensure_pack
from worker.pack.groups import GroupKey
from worker.pack.manifest import ALIGNMENT
from worker.pack.source import read_index
from worker.quant.dequant import dense_int4, dense_int8
from worker.quant.formats import WeightSpec
from worker.quant.quantize import pack_nibbles, quantize, round_up_bf16

SLOP = 1 + 1e-6  # float32 rounding of w / s and of (q - z) * s


def _weights(out=48, inn=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g) * 0.02
    w[3] = 0  # an all-zero row
    w[5, 7] = 1.5  # an outlier
    w[6] = w[6].abs() + 0.01  # a row of one sign only
    w[7] = -w[7].abs() - 0.01
    return w


def _unpack_ref(p: torch.Tensor) -> torch.Tensor:
    """Nibbles → values by integer arithmetic: byte b holds column 2j in b % 16 and 2j+1 in b // 16."""
    rows = []
    for row in p.tolist():
        vals = []
        for b in row:
            vals += [b % 16, b // 16]
        rows.append(vals)
    return torch.tensor(rows, dtype=torch.float64)


def test_int8_round_trip_within_half_a_scale_per_channel():
    w = _weights()
    parts = quantize("int8", w, 128)
    q, s = parts["qweight"], parts["scales"]
    assert q.dtype == torch.int8 and q.shape == w.shape and s.dtype == torch.float32 and s.shape == (48,)
    assert q.abs().max() <= 127
    deq = q.double() * s.double()[:, None]
    err = (w.double() - deq).abs()
    assert (err <= s.double()[:, None] / 2 * SLOP).all(), (err / s.double()[:, None]).max()
    assert torch.equal(deq[3], torch.zeros(256, dtype=torch.float64))
    assert torch.equal(dense_int8(((q, s),), torch.float32).double(), deq.float().double())


@pytest.mark.parametrize("group", [128, 32, 2])
def test_int4_round_trip_within_half_a_scale_per_group(group):
    w = _weights()
    parts = quantize("int4", w, group)
    p, s, z = parts["qweight"], parts["scales"], parts["zeros"]
    ng = 256 // group
    assert p.dtype == torch.uint8 and p.shape == (48, 128)
    assert s.dtype == torch.bfloat16 and s.shape == (48, ng) and z.dtype == torch.uint8 and z.shape == (48, ng)
    q = _unpack_ref(p).reshape(48, ng, group)
    assert q.min() >= 0 and q.max() <= 15 and z.max() <= 15
    deq = ((q - z.double()[..., None]) * s.double()[..., None]).reshape(48, 256)
    err = (w.double() - deq).abs().reshape(48, ng, group)
    bound = s.double()[..., None] / 2 * SLOP
    assert (err <= bound).all(), (err / bound).max()
    assert torch.equal(deq[3], torch.zeros(256, dtype=torch.float64))
    assert torch.equal(dense_int4(((p, s, z),), torch.float32), deq.float())


def test_fp8_round_trip_within_half_an_e4m3_step():
    """e4m3 keeps 3 mantissa bits: |w - deq| <= 2^-4 |w| for normal values, half the subnormal step
    (2^-10 s) below; the row's max |w| maps to 448 exactly representable, so nothing saturates."""
    w = _weights()
    parts = quantize("fp8", w, 128)
    q, s = parts["qweight"], parts["scales"]
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (48,)
    deq = q.double() * s.double()[:, None]
    err = (w.double() - deq).abs()
    bound = torch.maximum(w.double().abs() * 2.0**-4, s.double()[:, None] * 2.0**-10) * SLOP
    assert (err <= bound).all(), (err / bound).max()
    assert torch.isfinite(q.float()).all() and q.float().abs().max() <= 448
    from worker.quant.dequant import dense_fp8

    assert torch.equal(dense_fp8(((q, s),), torch.float32).double(), deq.float().double())


def test_nibble_order_on_hand_made_values():
    q = torch.tensor([[1, 2, 3, 4], [15, 0, 7, 8]], dtype=torch.uint8)
    assert pack_nibbles(q).tolist() == [[0x21, 0x43], [0x0F, 0x87]]
    # range [0, 15] → scale exactly 1, zero 0; range [-3, 12] → scale 1, zero 3
    w = torch.tensor([[0.0, 15.0, 5.0, 10.0], [-3.0, 12.0, 0.0, 1.0]])
    parts = quantize("int4", w, 4)
    assert parts["scales"].float().tolist() == [[1.0], [1.0]]
    assert parts["zeros"].tolist() == [[0], [3]]
    assert parts["qweight"].tolist() == [[0xF0, 0xA5], [0xF0, 0x43]]
    assert dense_int4(((parts["qweight"], parts["scales"], parts["zeros"]),), torch.float32).tolist() == w.tolist()


def test_int4_scale_is_rounded_up_to_bfloat16():
    x = torch.tensor([0.1, 1.0, 3e-5, 0.3333333, 7.77])
    b = round_up_bf16(x)
    assert (b.float() >= x).all()
    below = (b.view(torch.int16) - 1).view(torch.bfloat16).float()
    assert (below < x).all()  # the smallest bfloat16 not below x


def test_rows_are_quantized_alone(monkeypatch):
    """The packer quantizes in blocks of rows: any block size gives the same bytes."""
    w = _weights(out=37)
    whole = quantize("int4", w, 64)
    import worker.quant.quantize as qz

    monkeypatch.setattr(qz, "ROWS_PER_BLOCK_BYTES", 5 * 4 * 256)  # blocks of 5 rows
    blocks = quantize("int4", w, 64)
    assert all(torch.equal(whole[k], blocks[k]) for k in whole)


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt(layers=2, intermediate_size=768)


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8"])
def test_packed_parts_are_the_quantizers_bytes_across_small_windows(ckpt, tmp_path, monkeypatch, fmt):
    """Windows far smaller than a tensor: every part assembled from many fills equals quantize()."""
    monkeypatch.setattr(packer, "WINDOW", 2 * ALIGNMENT)
    monkeypatch.setattr(packer, "POOL_WINDOWS", 6)
    spec = WeightSpec(fmt, 128)
    pack = ensure_pack(ckpt, pack_dir=tmp_path, weights=spec)
    index = read_index(ckpt)
    from safetensors import safe_open

    group = pack.read_group(GroupKey(1, "ffn"))
    with safe_open(index["model.layers.1.mlp.down_proj.weight"].file, framework="pt") as st:
        ref = quantize(fmt, st.get_tensor("model.layers.1.mlp.down_proj.weight"), 128)
        norm = st.get_tensor("model.layers.1.post_attention_layernorm.weight")
    for suffix, t in ref.items():
        assert torch.equal(group[f"down_proj.{suffix}"], t), suffix
    assert torch.equal(group["post_attention_layernorm"], norm)  # native tensors as they were


def test_formats_coexist_in_one_cache_and_native_is_unchanged(ckpt, tmp_path):
    packs = {fmt: ensure_pack(ckpt, pack_dir=tmp_path, weights=WeightSpec(fmt, 128))
             for fmt in ("native", "int8", "int4")}
    packs["fp8"] = ensure_pack(ckpt, pack_dir=tmp_path, weights=WeightSpec("fp8"))
    packs["int4-head"] = ensure_pack(ckpt, pack_dir=tmp_path, weights=WeightSpec("int4", 128, quantize_head=True))
    names = {k: p.manifest_path.name for k, p in packs.items()}
    assert names == {"native": "float32.manifest.json", "int8": "float32.int8.manifest.json",
                     "int4": "float32.int4-g128.manifest.json", "int4-head": "float32.int4-g128-head.manifest.json",
                     "fp8": "float32.fp8.manifest.json"}
    native = json.loads(packs["native"].manifest_path.read_text())
    assert "weight_format" not in native and all("format" not in t for t in native["tensors"])
    sizes = {k: p.manifest.blob_size for k, p in packs.items()}
    assert sizes["native"] > sizes["int8"] == sizes["fp8"] > sizes["int4"] > sizes["int4-head"]
    for fmt in ("int8", "int4", "fp8"):
        m = packs[fmt].manifest
        assert m.weight_format == fmt
        q = [t for t in m.tensors if t.format == fmt]
        assert {t.short.split(".")[0] for t in q} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"}
        assert all(t.format == "native" for t in m.tensors if t.group == "resident")
        for g in m.groups:  # one aligned extent per group, its tensors inside it
            assert g.offset % ALIGNMENT == 0 and g.nbytes % ALIGNMENT == 0
        assert Pack.open(packs[fmt].manifest_path).n_params() == packs["native"].n_params()
    head = [t for t in packs["int4-head"].manifest.tensors if t.group == "resident"]
    assert {t.short for t in head} == {"embed_tokens", "norm", "lm_head.qweight", "lm_head.scales", "lm_head.zeros"}


def test_the_floor_counts_the_quantized_bytes(ckpt, tmp_path):
    from worker.config import StreamConfig
    from worker.host.roofline import pass_bytes
    from worker.stream.plan import place

    placement = place("cpu", 2, StreamConfig(mode="cpu"))
    got = {}
    for fmt in ("native", "int4"):
        m = ensure_pack(ckpt, pack_dir=tmp_path, weights=WeightSpec(fmt, 128, quantize_head=fmt == "int4")).manifest
        got[fmt] = pass_bytes(m, placement)
        layers = sum(g.nbytes for g in m.groups if g.name != "resident")
        assert got[fmt]["h2d"] == layers
        head = sum(t.nbytes for t in m.group_tensors("resident") if t.short.split(".")[0] in ("lm_head", "norm"))
        assert got[fmt]["hbm"] == layers + head
    assert got["int4"]["h2d"] < got["native"]["h2d"] / 4


@pytest.mark.side
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("cc")), reason="Inductor's CPU backend needs a C compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_dequantization_equals_eager(dtype):
    """Compiled runs (CUDA in production) dequantize through `compiled` with fullgraph=True: no graph
    break, and the same bits as the eager function (one product, one cast)."""
    from worker.model.compiled import compiled

    w = _weights(out=40)
    p4, p8 = quantize("int4", w, 32), quantize("int4", w[:16], 32)
    i8 = quantize("int8", w, 32)
    parts4 = ((p4["qweight"], p4["scales"], p4["zeros"]), (p8["qweight"], p8["scales"], p8["zeros"]))
    assert torch.equal(compiled(dense_int4)(parts4, dtype), dense_int4(parts4, dtype))
    parts8 = ((i8["qweight"], i8["scales"]),)
    assert torch.equal(compiled(dense_int8)(parts8, dtype), dense_int8(parts8, dtype))
