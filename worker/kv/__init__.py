"""The KV cache: the plain all-resident one, and the paged cache with a GPU budget, offload to pinned
CPU memory (and on to the SSD), and top-k block attention.

`static` is the exact all-resident cache; `layout` fixes the block geometry; `paged` is the cache
the model attends through; `fetch` plans one layer's fetch; `offload` moves blocks between tiers on
a side stream (throttled write-back, prefetch one layer ahead); `spill` is the SSD tier; `topk`
scores blocks by their key bounds; `tracker` is the seed's global block tracker; `factory` chooses
and builds a cache for a run.
"""
