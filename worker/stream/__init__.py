"""Weight sources: all-resident, or streamed SSD → pinned CPU → GPU (the seed's WSM, done as small parts).

`resident` is `gpu` mode's source and the reference the others equal bit for bit; `upload` reads
the groups that live on the device and copies them there beside the rest of the build (both use
it). For the streamer: `plan` decides where each layer lives, `hostmem` allocates page-locked
buffers, `ssd` reads extents with O_DIRECT on a thread pool (buffered where `pagecache` finds them
cached), `staging` feeds SSD-homed groups through pinned buffers, `cpu_tier` keeps layers in RAM
(fixed subset or rolling ring; `fill` loads the fixed subset, pinning behind the reads, a range at a
time as `registrar` hands them out), `pieces` is what the GPU tier copies, `gpu_tier` owns the
preallocated group slots, `devsync` gives CPU stand-ins for streams and events, `host_table` maps
the host-kept embedding table into the device, `iostats` counts bytes and busy time, and `streamer`
runs the loop prefetch → wait → compute → release that the model drives.
"""
