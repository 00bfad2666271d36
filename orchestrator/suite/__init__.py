"""Benchmark suites: `load` parses and validates a YAML suite and expands its matrix into the
`spec` objects (ModelSpec, RunSpec) a worker runs; `selector` says which hosts a run may use.
"""
