"""Running a suite on Ray: `connect` (an address, or `embedded`: the local Ray of the default, loopback
only and cleaned up after), `hosts` (nodes → (host,
GPU, NVMe) slots), `actor` (the per-slot worker calling `worker.run`), `scheduler` (dispatch, wait,
retry), `submit` (what `bench submit` does), `lease` (one live submit per suite run id), `jobs`
(detached suites as Ray Jobs) and `progress` (the live view).
"""
