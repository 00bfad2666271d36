"""The Llama forward, exactly as HF transformers computes it, over weights and a KV cache it does not own.

`geometry` reads the model's shape from config.json; `step` says what a forward takes (`Step`, the
weight-source and cache protocols); `rope` and `attention` are the position and decode-attention
math; `llama` is the per-layer loop wait → compute → release; `compiled` is the one torch.compile
setting every compiled function shares (its kernels kept on disk per host and commit by
`compile_cache`, each function whole per input signature by `aot`, so a later process need not trace it
again), and `graphs` replays the all-resident decode step as CUDA graphs.
"""
