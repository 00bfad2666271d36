"""What the cluster does: suites → RunSpecs → pinned Ray actors → one Parquet row per run → gate.

In the order data flows: `suite/` (YAML → validated RunSpecs, host selectors), `cluster/` (Ray
connection, hosts and slots, the per-slot actor, the scheduler, `bench submit`, detached jobs,
live progress), `results/` (the versioned Arrow schema, the Parquet store, queries), `regress/`
(metrics, robust statistics, comparison tables, the nightly gate), `bisect/` (the first bad commit of a
regressed pair, run at each commit on the cluster), `report/` (the HTML report) and
`cli/` (the `bench` command line's pieces; `cli.py` holds the group).
"""
