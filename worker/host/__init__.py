"""The host a run is measured on: what it is, what it can do, and how close a run came to that.

`hostinfo` fingerprints the hardware (the `hardware_key` that makes rows comparable) and the code;
`probe` measures SSD (O_DIRECT), PCIe, HBM and matmul rates once per host; `roofline` turns a run's
bytes and FLOPs into its floor and attainment; `timing` holds the clocks of the measured phases and
the named host-time spans a benchmark can record; `devlock` keeps two engines off one GPU or disk of
the host, whatever started them.
"""
