"""Comparing runs: `metrics` (which way is better, and each metric's practical floor), `stats` (robust
summaries, and the noise test calibrated on each pair's run-to-run and night-to-night spread),
`compare` (hosts or commits side by side), `gate` (what counts as a regression), `check` (`bench
regress`), `changepoints` (when a pair's level changed, over its whole history), `history`
(suite-run medians over nights, each night judged against its own past: data only, the report draws
it) and `render` (numbers and markdown).
"""
