"""Packed weights: an HF safetensors checkpoint → one aligned, grouped blob + its runtime manifest.

`source` reads what the checkpoint holds from its safetensors headers; `groups` says which tensors
travel together; `manifest` describes a blob and validates it; `blob` reads and writes aligned
extents (O_DIRECT); `blockdev` refuses raw targets that would destroy data; `packer` writes a pack;
`cache` is the per-checkpoint pack cache `bench run` uses, and `bench verify`.
"""
