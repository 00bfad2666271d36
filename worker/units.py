"""The units every part shares, defined once: decimal GB for bandwidths and sizes reported to users
(GB/s as disks and PCIe are specified), binary MiB/GiB for buffers, and PAGE, the 4 KiB alignment
O_DIRECT needs of offsets, sizes and buffers (every extent of a pack and of the KV spill file)."""

GB = 1e9
MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096
