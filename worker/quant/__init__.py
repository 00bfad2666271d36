"""Weight formats: which bytes a pack holds for each projection, and how the compute gets dense weights back.

In data-flow order: `formats` names the formats (`native`, `int8`, `int4`) and the parts each
quantized tensor is stored as (shapes, dtypes; the manifest validates against it); `quantize` turns
a dense weight into those parts on the CPU (`worker.pack.quantized` runs it once per checkpoint
tensor and hands the parts' bytes to the packer window by window), or `published` reads a
pre-quantized checkpoint's own parts (AWQ int4 GEMM) into the same layout without re-quantizing;
`dequant` is the one function every mode's compute calls on the device to turn a group's parts
back into dense weights, so the small bytes are what crosses the SSD and PCIe and every mode still
runs the same kernels; `export` writes a pack's dequantized weights as a plain HF checkpoint
(`bench dequantize`), the reference HF runs on; `accuracy` is what a format costs: a quantized
run's teacher-forced agreement with the native checkpoint (`bench run --accuracy-ref native`).
"""
