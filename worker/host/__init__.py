"""The host a run is measured on: what it is, what it can do, and how close a run came to that.

`hostinfo` fingerprints the hardware (the `hardware_key` that makes rows comparable) and the code;
`probe` measures SSD (O_DIRECT), PCIe, HBM and matmul rates once per host; `adjacent` measures the
disk again just before and just after a run that streams from it, with the SSD tier's own reader, for
that run's floor; `roofline` turns a run's bytes and FLOPs into its floor and attainment (and marks a
floor the run beat as suspect); `timing` holds the clocks of the measured phases and the named
host-time spans a benchmark can record; `walltime` says where a run's wall time went (its setup
phases and the measured round); `devlock` keeps two engines off one GPU or disk of the host,
whatever started them; `reuse` keeps one engine between a suite's runs that would build the same one
(`reuse: weights`), and says what makes two runs' engines the same; `interp` sets the interpreter's
own pauses (garbage collector, thread switch interval) for the measured rounds, on request;
`bytecode` keeps torch's compiled bytecode under the cache directory where its install has none;
`cudactx` makes the device's CUDA context beside the run's first steps, before the fill needs it.
"""
