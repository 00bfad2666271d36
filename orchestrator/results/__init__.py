"""The results dataset: `schema` (one versioned Arrow row per run), `store` (atomic Parquet writes into
a hive-partitioned dataset, `read_results`), `query` (which rows a command looks at, and readable
names for configs and hardware).
"""
