"""The pieces of the `bench` command line that `cli.py` assembles: `options` (flags generated from the
run config, and the options commands share), `console` (the one pair of consoles and JSON output),
`commands` (the cluster commands), `analysis` (compare, regress, report), `bisect` (the first bad
commit of a regressed pair) and `interrupts` (Ctrl-C: one interrupt, never a stray traceback).
"""
