"""Weight streaming: SSD → pinned CPU → GPU tiers (the seed's WSM, done as small parts).

`plan` decides where each layer lives, `hostmem` allocates page-locked buffers, `ssd` reads extents
with O_DIRECT on a thread pool, `cpu_tier` keeps layers in RAM (fixed subset or rolling ring),
`gpu_tier` owns the preallocated group slots, and `streamer` runs the loop
prefetch → wait → compute → release that the model drives.
"""
