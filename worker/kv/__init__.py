"""The KV cache: the plain all-resident one, and the paged cache with a GPU budget, offload to pinned
CPU memory (and on to the SSD), and top-k block attention.

`static` is the exact all-resident cache; `layout` fixes the block geometry; `paged` is the cache
the model attends through; `kernels` is its device side of a decode step (store the token, score,
select, gather, attend: compiled on CUDA); `topk` scores blocks by a summary of their keys and
selects the ones to attend over and to prefetch; `tracker` is the seed's global block tracker; `fetch` plans one
layer's fetch; `offload` moves blocks between tiers on a side stream (throttled write-back, prefetch
one layer ahead; issued by the compute thread itself where that is device work only); `zerocopy`
maps the pinned CPU tier into the device so a kernel pulls the chosen blocks across PCIe; `spill`
is the SSD tier; `factory` chooses and builds a cache for a run.
"""
