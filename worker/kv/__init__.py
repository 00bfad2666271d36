"""The paged KV cache: blocks of tokens per (batch row, layer), a GPU budget, offload to pinned CPU
memory (and on to the SSD), and top-k block attention.

`layout` fixes the block geometry, `paged` is the cache the model attends through, `offload` moves
blocks between tiers on a side stream (throttled write-back, prefetch one layer ahead), `spill` is
the SSD tier, `topk` scores blocks by their key bounds, `tracker` is the seed's global block tracker
and `factory` chooses and builds a cache for a run.
"""
