"""Weight formats: which bytes a pack holds for each projection, and how the compute multiplies by them.

In data-flow order: `formats` names the formats (`native`, `int8`, `int4`) and the parts each
quantized tensor is stored as (shapes, dtypes; the manifest validates against it); `quantize` turns
a dense weight into those parts on the CPU (`worker.pack.quantized` runs it once per checkpoint
tensor and hands the parts' bytes to the packer window by window), or `published` reads a
pre-quantized checkpoint's own parts (AWQ int4 GEMM) into the same layout without re-quantizing;
`dequant` hands the compute a group's projections as weights (dense, or their parts) and turns
parts back into dense weights; `matmul` (its `linear`) is every projection's matmul in every mode, and the
one place that picks how: `fused` (Triton `kernels`, and `kernels_int4`'s int4 variants) dequantizes
in registers inside the matmul for decode-sized inputs on CUDA, otherwise the parts are dequantized
to a dense scratch weight first.
So the small bytes are what crosses the SSD and PCIe, and every mode runs the same kernels on the
same shapes; `export` writes a pack's dequantized weights as a plain HF checkpoint
(`bench dequantize`), the reference HF runs on; `accuracy` is what a format costs: a quantized
run's teacher-forced agreement with the native checkpoint (`bench run --accuracy-ref native`).
"""
