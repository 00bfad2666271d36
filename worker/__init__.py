"""streambench engine: what one GPU host does. Never imports Ray.

In the order a run flows: `config` (the typed run config; `envs` is the one reader of the
environment, `errors` the one-line user errors) → `run` (one benchmark run: pack, build, warm up,
measure) → `text/` (the tokenizer, and the batch as fed) → `pack/` (checkpoint → aligned blob +
manifest; `quant/` its weight formats, dequantized inside the compute) → `engine` (model + weight
source + KV cache for a mode) over `model/` (the Llama forward),
`stream/` (weights SSD → pinned CPU → GPU) and `kv/` (the paged, offloading KV cache) → `generate`
with `sampling` (prefill, then decode; the warm-up and measured rounds) → `host/` (fingerprint,
probe, the disk next to the run, roofline, clocks, where the wall time went) → `result` (the run's
JSON document), written through `files` (whole or not at all). `peer` runs the same spec on HF
transformers + accelerate; `synth/` makes synthetic checkpoints; `units` defines GB, MiB and the
4 KiB page once.
"""

__version__ = "0.1.0"
