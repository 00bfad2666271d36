"""Synthetic checkpoints in the real HF format, so tests and benchmarks need no downloads.

`presets` holds the geometries (torch-free, so suites validate fast); `checkpoints` writes random
weights, config.json and a locally built tokenizer (`bench make-model`).
"""
