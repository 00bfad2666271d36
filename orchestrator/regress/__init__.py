"""Comparing runs: `metrics` (which way is better), `stats` (robust summaries and the calibrated noise
test), `compare` (hosts or commits side by side), `gate` (what counts as a regression), `check`
(`bench regress`), `history` (suite-run medians over nights, each night judged against its own past:
data only, the report draws it) and `render` (numbers and markdown).
"""
