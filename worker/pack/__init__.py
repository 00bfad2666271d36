"""Packed weights: an HF safetensors checkpoint → one aligned, grouped blob + its runtime manifest.

`source` reads what the checkpoint holds from its safetensors headers; `groups` says which tensors
travel together; `manifest` describes a blob and validates it; `blob` reads and writes aligned
extents (O_DIRECT); `blockdev` refuses targets that would destroy data; `packer` writes a pack (a
quantized format's bytes come from `quantized`, which reads and quantizes each weight once); `verify` tells whether a
blob still holds what was packed (full checksums rarely, each group's edges every load, `bench
verify`); `cache` is the per-checkpoint pack cache `bench run` uses.
"""
