"""What the cluster does: suites → RunSpecs → pinned Ray actors → one Parquet row per run.

Modules, in the order data flows: `suite` (YAML → validated RunSpecs), `selector` / `hosts` (Ray nodes
→ (host, GPU, NVMe) slots), `actor` (the per-slot worker calling `worker.bench.run`), `scheduler`
(dispatch, wait, retry), `schema` / `results` (the versioned Arrow schema, atomic Parquet writes and
`read_results`), `submit` / `cluster` / `jobs` (what `bench submit` does), `progress` (the live view).
"""
