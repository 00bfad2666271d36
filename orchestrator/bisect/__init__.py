"""`bench bisect`: which commit made one (config, hardware) pair slower. In the order it runs: `pair`
(the pair, its metric and the default good and bad commits, from the results dataset), `commits`
(git: resolve, good..bad, each commit's tree as a zip), `measure` (the Ray side: a slot with the
pair's hardware, each commit's tree as the task's working_dir, one result row per run) running
`remote` (standard library only, pickled by value: the commit's own `bench run` in its tree), and
`search` (good and bad first, then the binary search with the noise test; pure logic).
"""
